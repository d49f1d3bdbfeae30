"""Queue ids: text <-> value, and what counts as one."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.ids import _CROCKFORD, new_queue_id, queue_id_text, queue_id_value, valid_queue_id


def _value_by_characters(qid: str) -> int:
    value = 0
    for c in qid:
        value = (value << 5) | _CROCKFORD.index(c)
    return value


@given(st.integers(min_value=0, max_value=2**128 - 1))
def test_text_and_value_round_trip(value: int) -> None:
    qid = queue_id_text(value)
    assert valid_queue_id(qid) and queue_id_value(qid) == value == _value_by_characters(qid)


@given(st.text(alphabet=_CROCKFORD + "ilouILOU_ +-0x\u0663\u00e9abz", min_size=24, max_size=28))
def test_validity_is_26_crockford_characters(qid: str) -> None:
    ok = len(qid) == 26 and all(c in _CROCKFORD for c in qid)
    assert valid_queue_id(qid) == ok
    if ok and _value_by_characters(qid) < 2**128:
        assert queue_id_value(qid) == _value_by_characters(qid)
    else:
        with pytest.raises(ValueError):
            queue_id_value(qid)


def test_new_ids_are_valid_and_sort_by_time() -> None:
    a, b = new_queue_id(1_000.0), new_queue_id(2_000.0)
    assert valid_queue_id(a) and valid_queue_id(b) and a < b
    assert queue_id_value(a) >> 80 == 1_000_000
