"""The one MIME walker: cut an entity's bytes into its parts, byte for byte.

Parsing (`gateway.mail.parse`, which cuts attached messages out of the exact bytes) and
rewriting (`gateway.pipeline.mime`, which edits a few text parts and re-emits the rest
untouched) walk a message's structure with these functions, so both see the same
parts. An entity (the message or a body part) is its header block, the empty line and
its body, as `gateway.mail.headers.split_entity` cuts them; a multipart body is cut by
`cut_multipart` into gaps and parts, and joining them back gives the body exactly.
Which boundary an entity has is the caller's business (both ask the stdlib `email`
package on the header block), so nothing here decodes anything.

Delimiter rule (RFC 2046 section 5.1.1, read leniently): a delimiter line starts at the
beginning of the body or just after an LF and is ``--`` + boundary, then ``--`` for the
close delimiter, then only spaces or tabs, then any number of CRs, then LF or the end
of the body. The line ending before a delimiter line belongs to the delimiter, so a
part's bytes stop before it. The first close delimiter ends the parts (what follows is
the epilogue); without one, the last part runs to the end of the body.

Every function here is linear in the size of its input.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

from gateway.mail.headers import split_entity


class Delimiter(NamedTuple):
    """One delimiter line of a multipart body, as offsets into it."""

    start: int
    """Where the line starts (its ``--``)."""
    end: int
    """Where the next line starts (len(body) when the delimiter is the last line)."""
    close: bool
    """A close delimiter (``--boundary--``)."""


def boundary_bytes(boundary: str) -> bytes:
    """A boundary parameter as the bytes it stands for in the body (the stdlib hands
    8-bit header bytes back as surrogates)."""
    return boundary.encode("utf-8", "surrogateescape")


def delimiters(body: bytes, boundary: bytes) -> Iterator[Delimiter]:
    """The delimiter lines of `body` for `boundary`, in order, up to the first close one.

    Found with bytes.find: a regular expression with ``^`` in MULTILINE mode is ten
    times slower on a large body."""
    needle = b"--" + boundary
    if body.startswith(needle):
        pos = 0
    else:
        found = body.find(b"\n" + needle)
        pos = -1 if found < 0 else found + 1
    while pos >= 0:
        after = pos + len(needle)
        nl = body.find(b"\n", after)
        line_end = len(body) if nl < 0 else nl
        rest = body[after:line_end]
        close = rest.startswith(b"--")
        tail = rest[2:] if close else rest
        if not tail.rstrip(b"\r").strip(b" \t"):
            yield Delimiter(pos, len(body) if nl < 0 else nl + 1, close)
            if close:
                return
        found = body.find(b"\n" + needle, line_end)
        pos = -1 if found < 0 else found + 1


def cut_multipart(body: bytes, boundary: bytes) -> tuple[list[bytes], list[bytes]]:
    """(parts, gaps) of a multipart body: each part's exact bytes (its header block, empty
    line and body), and the bytes around them (preamble and first delimiter line, each
    line ending and delimiter line between two parts, the last one and the epilogue).
    ``gaps[0] + parts[0] + gaps[1] + ... + parts[-1] + gaps[-1] == body``; no parts:
    ``([], [body])``."""
    spans: list[tuple[int, int]] = []
    start: int | None = None
    for delim in delimiters(body, boundary):
        if start is not None:
            end = delim.start
            if end > start:     # the line ending before the delimiter belongs to it
                end -= 2 if body[end - 2:end] == b"\r\n" else 1
            spans.append((start, end))
        start = None if delim.close else delim.end
    if start is not None:
        spans.append((start, len(body)))
    parts = [body[s:e] for s, e in spans]
    gaps: list[bytes] = []
    pos = 0
    for s, e in spans:
        gaps.append(body[pos:s])
        pos = e
    gaps.append(body[pos:])
    return parts, gaps


def entity_at(raw: bytes, path: Sequence[int],
              boundary_of: Callable[[bytes], bytes | None]) -> bytes | None:
    """The exact bytes of the entity at `path` (part indexes from the top-level multipart
    down), or None where the bytes cannot be followed. `boundary_of` gets an entity's
    header block and names its boundary (None: not a multipart one can walk)."""
    entity = raw
    for index in path:
        header, _, body = split_entity(entity)
        boundary = boundary_of(header)
        if boundary is None:
            return None
        parts, _ = cut_multipart(body, boundary)
        if index >= len(parts):
            return None
        entity = parts[index]
    return entity
