"""Migrations carry frozen copies of what they compute: the copies still agree with the live code.

Revision 0002 keys the messages it upgrades (``dedupe_key``, ``thread_id``,
``subject_key``) with copies of the store's keying written into the revision file, and
both revisions declare their time columns with a copy of ``UTCDateTime``'s DDL. These
tests fail when the live functions change, so such a change is a decision (a new
revision that re-keys old rows, or not), never a silent change of what 0002 does.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import cast

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import gateway.crm.migrations
from gateway.crm.models import UTCDateTime
from gateway.records import message_id_key, subject_key

VERSIONS = Path(gateway.crm.migrations.__file__).parent / "versions"


def _revision(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"_frozen_{name}", VERSIONS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


R0001 = _revision("0001_initial")
R0002 = _revision("0002_crm")

#: pieces that exercise every branch of the keying: brackets, folding whitespace, case,
#: reply/forward prefixes in several languages with counters, list tags, NUL, a lone surrogate
_PIECES = st.sampled_from([
    "<", ">", "@", " ", "\t", "\r\n ", "\x00", "\ud800", "\u00a0", "\u3000", ":", "\uff1a",
    "Re", "RE", "re", "Fwd", "FW", "AW", "WG", "SV", "VS", "Odp", "Antw", "Réf", "RIF", "TR",
    "回复", "转发", "[2]", "(3)", "[sales]", "[", "]", "Example.COM", "mail", "Hello World",
    "x" * 120,
])
_TEXT = st.lists(st.one_of(_PIECES, st.text(max_size=8)), max_size=12).map("".join)
PROPS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPS
@given(mid=st.one_of(st.none(), _TEXT))
@example(mid="<Relayed.1@MAIL.Example.COM>")
@example(mid="  <a b@X.ORG> <second@y>")
@example(mid="no-brackets@Host")
@example(mid="")
def test_frozen_message_id_key_agrees_with_the_live_one(mid: str | None) -> None:
    assert R0002.message_id_key(mid) == message_id_key(mid)


@PROPS
@given(subject=_TEXT)
@example(subject="Re:  re[2]: Fwd: Hello  world")
@example(subject="[sales] AW: Angebot")
@example(subject="回复\uff1a报价")
@example(subject="RE: " + "x" * 600)
@example(subject="")
def test_frozen_subject_key_agrees_with_the_live_one(subject: str) -> None:
    assert R0002.subject_key(subject) == subject_key(subject)[0]


@pytest.mark.parametrize("revision", [R0001, R0002], ids=["0001", "0002"])
@pytest.mark.parametrize("backend", ["postgresql", "sqlite"])
def test_frozen_time_column_has_the_models_ddl(revision: ModuleType, backend: str) -> None:
    dialect = sa.create_mock_engine(f"{backend}://", executor=print).dialect
    frozen = cast(Callable[[], sa.DateTime], revision.UTCDateTime)()
    assert frozen.compile(dialect=dialect) == UTCDateTime().compile(dialect=dialect)


R0007 = _revision("0007_search")
R0010 = _revision("0010_search_bcc")


def test_0010_downgrade_restores_the_index_of_0007() -> None:
    """0010's downgrade builds 0007's triggers and generated column: the same DDL."""
    assert R0010.sqlite_triggers(R0010.ADDRESSES_0007) == R0007.sqlite_triggers()
    assert R0010.pg_document(R0010.ADDRESSES_0007) == R0007._pg_document()
    assert R0010.sqlite_triggers() != R0007.sqlite_triggers()
