"""Queue ids: the 26-character, time-sortable id of every spooled message and recipient copy.

The layout is a ULID's (48-bit millisecond time, then 80 random bits) written in
Crockford base 32; tracking tokens carry the same id in its 16-byte binary form.
"""

from __future__ import annotations

import secrets
import time

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
#: Crockford's digits -> the digits `int(..., 32)` reads (a tracking token parses its copy's
#: id several times per copy: a loop over the characters was most of a token's cost)
_TO_BASE32 = str.maketrans(_CROCKFORD, "0123456789abcdefghijklmnopqrstuv")


def queue_id_text(value: int) -> str:
    """A 128-bit value as a queue id: 26 Crockford base-32 characters (the ULID text form)."""
    out = []
    for _ in range(26):
        out.append(_CROCKFORD[value & 31])
        value >>= 5
    return "".join(reversed(out))


def queue_id_value(qid: str) -> int:
    """The 128-bit value of a queue id; ValueError for anything that is not one."""
    if not valid_queue_id(qid):
        raise ValueError(f"not a queue id: {qid!r}")
    value = int(qid.translate(_TO_BASE32), 32)
    if value >> 128:
        raise ValueError(f"not a queue id: {qid!r}")
    return value


def new_queue_id(now: float | None = None) -> str:
    """A globally unique, time-sortable id (ULID layout: 48-bit ms time + 80 random bits)."""
    ms = int((time.time() if now is None else now) * 1000)
    return queue_id_text((ms << 80) | secrets.randbits(80))


def valid_queue_id(qid: str) -> bool:
    return len(qid) == 26 and not qid.strip(_CROCKFORD)  # nothing left: every character is one
