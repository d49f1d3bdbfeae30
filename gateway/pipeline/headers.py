"""Byte-level header edits that leave the body untouched: split, read, strip, prepend.

The relay must deliver a message no policy changes byte for byte (plus trace headers
on top), so nothing here re-serialises a message through the `email` package.
"""

from __future__ import annotations

import re
import secrets
import time
from email.utils import getaddresses

_FIELD_RE = re.compile(rb"^([!-9;-~]+)[ \t]*:", re.ASCII)


def split_message(data: bytes) -> tuple[bytes, bytes]:
    """(header block including its final CRLF, body after the blank line)."""
    if data.startswith(b"\r\n"):
        return b"", data[2:]
    idx = data.find(b"\r\n\r\n")
    if idx < 0:
        return data if data.endswith(b"\r\n") or not data else data + b"\r\n", b""
    return data[: idx + 2], data[idx + 4:]


def _fields(header: bytes) -> list[tuple[bytes | None, bytes]]:
    """Split a header block into (lower-case name or None, raw bytes incl. continuation lines)."""
    out: list[tuple[bytes | None, bytes]] = []
    for line in header.splitlines(keepends=True):
        if line[:1] in (b" ", b"\t") and out:
            name, raw = out[-1]
            out[-1] = (name, raw + line)
            continue
        m = _FIELD_RE.match(line)
        out.append((m.group(1).lower() if m else None, line))
    return out


def get_header(header: bytes, name: str) -> str | None:
    """The unfolded value of the first field `name`, decoded leniently, or None."""
    want = name.lower().encode()
    for fname, raw in _fields(header):
        if fname == want:
            value = raw.split(b":", 1)[1]
            value = re.sub(rb"\r?\n[ \t]", b" ", value).strip()
            return value.decode("utf-8", "replace")
    return None


def get_all(header: bytes, name: str) -> list[str]:
    want = name.lower().encode()
    out = []
    for fname, raw in _fields(header):
        if fname == want:
            value = raw.split(b":", 1)[1]
            out.append(re.sub(rb"\r?\n[ \t]", b" ", value).strip().decode("utf-8", "replace"))
    return out


def strip_fields(header: bytes, names: set[str]) -> bytes:
    """Remove every field whose name is in `names` (case-insensitive), with its continuations."""
    want = {n.lower().encode() for n in names}
    return b"".join(raw for fname, raw in _fields(header) if fname not in want)


def addresses(header: bytes, name: str) -> list[str]:
    return [a for _, a in getaddresses(get_all(header, name)) if a]


def make_message_id(hostname: str) -> str:
    return f"<{time.strftime('%Y%m%d%H%M%S', time.gmtime())}.{secrets.token_hex(8)}@{hostname}>"
