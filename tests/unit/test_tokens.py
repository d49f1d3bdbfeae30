"""Tracking tokens: round trip, tamper detection, key rotation."""

from __future__ import annotations

from datetime import timedelta

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.ids import new_queue_id
from gateway.tracking.tokens import TokenSigner

KEY = b"k" * 32


def test_round_trip_click_and_open() -> None:
    s = TokenSigner([KEY])
    qid = new_queue_id()
    url = "https://example.com/p?a=1&b=2#x"
    d = s.verify(s.click_token(qid, 7, url))
    assert d is not None and (d.kind, d.copy_id, d.link, d.url) == ("click", qid, 7, url)
    o = s.verify(s.open_token(qid))
    assert o is not None and (o.kind, o.copy_id, o.link, o.url) == ("open", qid, 0, None)


def test_every_altered_byte_is_refused() -> None:
    s = TokenSigner([KEY])
    tok = s.click_token(new_queue_id(), 1, "https://example.com/")
    for i in range(len(tok)):
        for c in "A_-.0":
            if tok[i] != c:
                forged = tok[:i] + c + tok[i + 1:]
                # one spelling only: even a change of unused base64 bits is refused
                assert s.verify(forged) is None, (i, c)
    assert s.verify(tok[:-1]) is None
    assert s.verify(tok[:10]) is None
    assert s.verify("") is None
    assert s.verify("x" * 10000) is None


def test_other_key_refused_and_rotation_verifies_old() -> None:
    old, new = TokenSigner([b"o" * 32]), TokenSigner([b"n" * 32, b"o" * 32])
    tok = old.open_token(new_queue_id())
    assert TokenSigner([b"n" * 32]).verify(tok) is None
    assert new.verify(tok) is not None


def test_bad_queue_id_and_short_key() -> None:
    s = TokenSigner([KEY])
    with pytest.raises(ValueError):
        s.open_token("not-a-ulid")
    with pytest.raises(ValueError):
        s.open_token("Z" * 26)
    with pytest.raises(ValueError):
        TokenSigner([b"short"])


#: tokens come from anyone's mail client: each generated one gets a time budget (as in
#: tests/unit/test_mail_hostile.py), far above the microseconds a verify takes
@settings(max_examples=300, deadline=timedelta(milliseconds=500),
          suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(["open", "click", "honeypot"]), st.integers(0, 65535),
       st.text(max_size=60), st.integers(0, 3), st.data())
def test_a_token_has_exactly_one_accepted_spelling(kind: str, link: int, url: str, side: int,
                                                   data: st.DataObject) -> None:
    """Any other text for the same bytes (padding, unused low bits, skipped characters,
    percent-encoding) is refused: one copy's hit cannot be recorded under two URLs."""
    s = TokenSigner([KEY])
    tok = s.make(kind, new_queue_id(), 0 if kind == "open" else link,  # type: ignore[arg-type]
                 None if kind == "open" else "https://example.com/" + url)
    assert s.verify(tok) is not None
    body, mac = tok.split(".")
    parts = [body, mac]
    part = parts[side % 2]
    variant = data.draw(st.sampled_from(["pad", "bits", "junk", "case-pct"]))
    if variant == "pad":
        part += "=" * data.draw(st.integers(1, 3))
    elif variant == "bits":
        alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
        last = alphabet.index(part[-1])
        unused = {2: 4, 3: 2, 0: 0}[len(part) % 4]   # low bits the last character does not use
        if unused == 0:
            part += "="
        else:
            flip = data.draw(st.integers(1, (1 << unused) - 1))
            part = part[:-1] + alphabet[last ^ flip]
    elif variant == "junk":
        at = data.draw(st.integers(0, len(part)))
        part = part[:at] + data.draw(st.sampled_from(["+", "/", " ", "!", "\n", "%"])) + part[at:]
    else:
        at = data.draw(st.integers(0, len(part) - 1))
        part = part[:at] + f"%{ord(part[at]):02X}" + part[at + 1:]
    parts[side % 2] = part
    assert s.verify(".".join(parts)) is None


def test_non_ascii_and_oversized_tokens_are_refused() -> None:
    s = TokenSigner([KEY])
    tok = s.open_token(new_queue_id())
    assert s.verify("\u0410" + tok) is None
    assert s.verify(tok[:3] + "\u00e9" + tok[3:]) is None
    assert s.verify(tok + "." + tok) is None
    assert s.verify("." + tok) is None


# --- hostile tokens: anyone can request /o/<token> and /c/<token> ---------------------

_TOKEN_CHARS = st.sampled_from([*"Aa0_-.=%+/ ", "é", "\x00", "AAAA", "."])


@settings(max_examples=500, deadline=timedelta(milliseconds=500),
          suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.lists(_TOKEN_CHARS, max_size=80).map("".join), st.text(max_size=300),
                 st.binary(max_size=200).map(lambda b: b.decode("latin-1"))))
def test_any_text_verifies_to_none_without_raising(text: str) -> None:
    assert TokenSigner([KEY]).verify(text) is None


@pytest.mark.parametrize("text", ["A" * 1_000_000, "." * 1_000_000, "A" * 500_000 + "." + "A" * 500_000,
                                  "é" * 1_000_000, "=" * 1_000_000])
def test_a_megabyte_token_is_refused_at_once(text: str) -> None:
    import time

    start = time.perf_counter()
    assert TokenSigner([KEY]).verify(text) is None
    assert time.perf_counter() - start < 0.5
