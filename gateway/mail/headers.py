"""The one header/body split and the one header-field scanner, over raw message bytes.

Everything that needs "where does the header block end" or "which fields does it hold"
asks this module: the relay (trace headers, Bcc removal), the MIME walker, the parser
behind ingest and IMAP sync, DKIM signing, DSNs and the SMTP client. Nothing here
re-serialises a message through the `email` package, so a message no policy changes
is delivered byte for byte (plus trace headers on top).

Line rule: a line ends at LF, written CRLF or bare LF. A bare CR (one not followed by
LF) is an ordinary byte inside a line: it neither ends a line nor makes an empty one.
(The relay refuses bare CR and LF at the SMTP edge, so relayed mail is CRLF throughout;
ingest and IMAP bring whatever a sender wrote.)

Split rule: the header block ends at the first empty line, whichever of CRLF CRLF or
LF LF (or LF CRLF, CRLF LF) comes first. The header block keeps its last line's line
ending; the empty line itself is returned apart (`split_entity`); the body is every
byte after it. A message that begins with an empty line has an empty header block;
one without an empty line is all header block and has no body.

Field rule: a field starts on a line that begins with a name (printable ASCII except
":", at least one character), optional spaces or tabs, then ":". A line that begins
with a space or tab continues the entry before it. Any other line is kept as an entry
without a name (`Field.name is None`), with its continuation lines, so that the
entries of a block put back together are the block itself. A bare CR does not end a
line here either (`bytes.splitlines`, and the stdlib's parser, would end one there).
"""

from __future__ import annotations

import re
import secrets
import time
from email.utils import getaddresses
from typing import NamedTuple

#: One entry: an optional field name and colon, the rest of its line, its continuation lines.
_ENTRY_RE = re.compile(rb"(?:([!-9;-~]+)[ \t]*:)?[^\n]*\n?(?:[ \t][^\n]*\n?)*")
_FOLD_RE = re.compile(rb"\r?\n[ \t]")


# --- the split ----------------------------------------------------------------------


def header_end(data: bytes) -> int:
    """Offset just past the header block (past its last line's LF), where the empty
    line starts; 0 when `data` begins with an empty line, len(data) when it has none."""
    if data.startswith((b"\r\n", b"\n")):
        return 0
    crlf = data.find(b"\n\r\n")
    if crlf < 0:
        lf = data.find(b"\n\n")
        return len(data) if lf < 0 else lf + 1
    # Look for an LF LF only before the LF CRLF: never scan a whole body for it.
    lf = data.find(b"\n\n", 0, crlf + 2)
    return (crlf if lf < 0 else lf) + 1


def split_entity(data: bytes) -> tuple[bytes, bytes, bytes]:
    """(header block with its last line ending, the empty line, body): joined, they are
    `data`. The empty line is b"\\r\\n", b"\\n", or b"" when there is none (then the
    body is b"" too)."""
    end = header_end(data)
    if data.startswith(b"\r\n", end):
        return data[:end], b"\r\n", data[end + 2:]
    if data.startswith(b"\n", end):
        return data[:end], b"\n", data[end + 1:]
    return data, b"", b""


def split_message(data: bytes) -> tuple[bytes, bytes]:
    """(header block ending in a line ending, body after the empty line).

    Without an empty line the whole message is the header block, and CRLF is added
    when it does not already end in a line ending."""
    header, blank, body = split_entity(data)
    if blank or not header or header.endswith(b"\n"):
        return header, body
    return header + b"\r\n", body


def header_block(data: bytes) -> bytes:
    """The header lines without the line ending of the last one (and without the empty
    line); all of `data` when it has no empty line."""
    header, blank, _ = split_entity(data)
    if not blank:
        return header
    return header[:-2] if header.endswith(b"\r\n") else header[:-1]


def body_start(data: bytes) -> int:
    """Offset of the first body byte (after the empty line); len(data) when no body."""
    end = header_end(data)
    if data.startswith(b"\r\n", end):
        return end + 2
    if data.startswith(b"\n", end):
        return end + 1
    return len(data)


# --- the field scanner --------------------------------------------------------------


class Field(NamedTuple):
    """One entry of a header block: a field with its continuation lines, exactly as written."""

    name: bytes | None
    """The field name as written; None for a line that is not a field (and its continuations)."""
    raw: bytes
    """The entry's bytes: its first line, its continuation lines, their line endings."""
    key: bytes | None
    """The name lower-cased, for comparing (None for a line that is not a field)."""

    @property
    def value(self) -> bytes:
        """Everything after the first colon, folds and line endings kept."""
        return self.raw[self.raw.find(b":") + 1:] if self.name is not None else b""


def fields(header: bytes) -> list[Field]:
    """Every entry of a header block, in order; their `raw` bytes joined are `header`.
    Linear in len(header): one match of `_ENTRY_RE` per entry, which never backtracks
    (each line is taken whole, then a continuation line must start with a space or tab)."""
    new = tuple.__new__  # Field(...) without NamedTuple's Python-level __new__: this is hot
    out: list[Field] = []
    for m in _ENTRY_RE.finditer(header):
        start, end = m.span()
        if start == end:    # the empty match at the end of the block
            break
        name = m.group(1)
        out.append(new(Field, (name, m.group(), None if name is None else name.lower())))
    return out


def unfold(value: bytes) -> bytes:
    """A raw field value unfolded as a reader shows it: each line break and the first
    space or tab after it become one space; stripped."""
    return _FOLD_RE.sub(b" ", value).strip()


def get_header(header: bytes, name: str) -> str | None:
    """The unfolded value of the first field `name`, decoded leniently, or None."""
    want = name.lower().encode()
    for f in fields(header):
        if f.key == want:
            return unfold(f.value).decode("utf-8", "replace")
    return None


def get_all(header: bytes, name: str) -> list[str]:
    """The unfolded values of every field `name`, in order, decoded leniently."""
    want = name.lower().encode()
    return [unfold(f.value).decode("utf-8", "replace") for f in fields(header) if f.key == want]


def field_span(header: bytes, name: bytes) -> tuple[int, int] | None:
    """Byte span of the first field `name` with its continuation lines (line endings included)."""
    want = name.lower()
    pos = 0
    for f in fields(header):
        if f.key == want:
            return pos, pos + len(f.raw)
        pos += len(f.raw)
    return None


# --- edits --------------------------------------------------------------------------


def strip_fields(header: bytes, names: set[str]) -> bytes:
    """Remove every field whose name is in `names` (case-insensitive), with its continuations."""
    want = {n.lower().encode() for n in names}
    return b"".join(f.raw for f in fields(header) if f.key not in want)


def set_field(header: bytes, name: bytes, value: bytes, nl: bytes) -> bytes:
    """`header` with its first field `name` replaced by ``Name: value`` (the name as
    written there) and any further ones removed; added at the end when absent."""
    want = name.lower()
    out: list[bytes] = []
    done = False
    for f in fields(header):
        if f.key != want:
            out.append(f.raw)
        elif not done:
            assert f.name is not None
            out.append(f.name + b": " + value + nl)
            done = True
    if not done:
        out.append(name + b": " + value + nl)
    return b"".join(out)


def addresses(header: bytes, name: str) -> list[str]:
    """The addr-specs of every field `name` (empty ones left out)."""
    return [a for _, a in getaddresses(get_all(header, name)) if a]


def make_message_id(hostname: str) -> str:
    """A new Message-ID: UTC time stamp, 64 random bits, `hostname`."""
    return f"<{time.strftime('%Y%m%d%H%M%S', time.gmtime())}.{secrets.token_hex(8)}@{hostname}>"
