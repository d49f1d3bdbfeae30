"""Frozen copies of the header/body splitters, field scanners and boundary scanners that
`gateway.mail.headers` and `gateway.mail.mime` replaced, kept as oracles for
tests/unit/test_mail_headers.py (which states where each may differ from the new code).

Copied verbatim from the modules they lived in, renamed by origin:

- ``headers_*``: gateway/pipeline/headers.py (relay: split, read, strip fields);
- ``parse_*``: gateway/mail/parse.py (ingest and IMAP parser: split, fields, boundaries);
- ``mime_*``: gateway/pipeline/mime.py (rewriter: split, boundaries, field edits);
- ``transport_header_block``, ``dsn_header_block``: gateway/delivery/transport.py, dsn.py;
- ``dkim_parse``: gateway/pipeline/dkim.py (the header/body cut before canonicalisation).

Do not "fix" anything here: these are what the code did.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import dkim

from gateway.mail.parse import HEADER_BLOCK_LIMIT, HEADER_VALUE_LIMIT

_H_FIELD_RE = re.compile(rb"^([!-9;-~]+)[ \t]*:", re.ASCII)
_M_FIELD_RE = re.compile(rb"^([!-9;-~]+)[ \t]*:", re.ASCII)
_P_NAME_RE = re.compile(rb"[!-9;-~]+")


def headers_split_message(data: bytes) -> tuple[bytes, bytes]:
    """(header block including its final CRLF, body after the blank line)."""
    if data.startswith(b"\r\n"):
        return b"", data[2:]
    idx = data.find(b"\r\n\r\n")
    if idx < 0:
        return data if data.endswith(b"\r\n") or not data else data + b"\r\n", b""
    return data[: idx + 2], data[idx + 4:]


def headers_fields(header: bytes) -> list[tuple[bytes | None, bytes]]:
    """Split a header block into (lower-case name or None, raw bytes incl. continuation lines)."""
    out: list[tuple[bytes | None, bytes]] = []
    for line in header.splitlines(keepends=True):
        if line[:1] in (b" ", b"\t") and out:
            name, raw = out[-1]
            out[-1] = (name, raw + line)
            continue
        m = _H_FIELD_RE.match(line)
        out.append((m.group(1).lower() if m else None, line))
    return out


def headers_get_header(header: bytes, name: str) -> str | None:
    """The unfolded value of the first field `name`, decoded leniently, or None."""
    want = name.lower().encode()
    for fname, raw in headers_fields(header):
        if fname == want:
            value = raw.split(b":", 1)[1]
            value = re.sub(rb"\r?\n[ \t]", b" ", value).strip()
            return value.decode("utf-8", "replace")
    return None


def headers_get_all(header: bytes, name: str) -> list[str]:
    want = name.lower().encode()
    out: list[str] = []
    for fname, raw in headers_fields(header):
        if fname == want:
            value = raw.split(b":", 1)[1]
            out.append(re.sub(rb"\r?\n[ \t]", b" ", value).strip().decode("utf-8", "replace"))
    return out


def headers_strip_fields(header: bytes, names: set[str]) -> bytes:
    """Remove every field whose name is in `names` (case-insensitive), with its continuations."""
    want = {n.lower().encode() for n in names}
    return b"".join(raw for fname, raw in headers_fields(header) if fname not in want)


def parse_header_block_end(raw: bytes) -> int:
    """Offset just past the header block (its last line's newline), before the blank line."""
    if raw.startswith((b"\r\n", b"\n")):
        return 0
    crlf = raw.find(b"\n\r\n")
    # Look for a bare-LF blank line only before the CRLF one: never scan a whole body.
    lf = raw.find(b"\n\n", 0, crlf + 2 if crlf >= 0 else len(raw))
    ends = [i for i in (crlf, lf) if i >= 0]
    return min(ends) + 1 if ends else len(raw)


def parse_body_start(raw: bytes) -> int:
    """Offset of the first body byte (after the blank line), len(raw) if there is no body."""
    end = parse_header_block_end(raw)
    if raw.startswith(b"\r\n", end):
        return end + 2
    if raw.startswith(b"\n", end):
        return end + 1
    return len(raw)


def parse_fields(block: bytes, defects: list[str]) -> dict[str, list[bytes]]:
    """Header name (lower-case) -> raw values (unfolded bytes), in order."""
    if len(block) > HEADER_BLOCK_LIMIT:
        defects.append(f"header block of {len(block)} bytes truncated to {HEADER_BLOCK_LIMIT}")
        block = block[:HEADER_BLOCK_LIMIT]
    out: dict[str, list[bytes]] = {}
    cur: list[bytes] | None = None
    name = ""
    bad = 0

    def finish() -> None:
        if cur is None:
            return
        value = b"".join(cur).strip()
        if len(value) > HEADER_VALUE_LIMIT:
            defects.append(f"{name} header of {len(value)} bytes truncated")
            value = value[:HEADER_VALUE_LIMIT]
        out.setdefault(name, []).append(value)

    lines = block.split(b"\n")
    if lines and lines[0].startswith(b"From ") and b":" not in lines[0][:5]:
        lines = lines[1:]  # an mbox "From " separator line
    for line in lines:
        if line.endswith(b"\r"):
            line = line[:-1]
        if not line:
            continue
        if line[0] in (32, 9):
            if cur is not None:
                cur.append(line)
            continue
        finish()
        cur = None
        colon = line.find(b":")
        fname = line[:colon].rstrip(b" \t") if colon > 0 else b""
        if not fname or not _P_NAME_RE.fullmatch(fname):
            bad += 1
            continue
        name = fname.decode("ascii").lower()
        cur = [line[colon + 1 :]]
    finish()
    if bad:
        defects.append(f"{bad} malformed header line(s) ignored")
    return out


def parse_clean_head(head: bytes) -> bytes:
    """The header block as the stdlib parser should see it: lines that are not fields
    (no colon, 8-bit or spaces in the name) dropped with their continuation lines, and
    "Name : value" rewritten "Name: value". `parse_fields` reads the same way, so the MIME
    walk and the header info agree; where the stdlib would take a bad line for the start
    of the body, we skip the line instead. Returns `head` itself when nothing changes."""
    lines = head.split(b"\n")
    out: list[bytes] = []
    changed = False
    keep = False
    for index, line in enumerate(lines):
        bare = line[:-1] if line.endswith(b"\r") else line
        if not bare:
            out.append(line)
            continue
        if index == 0 and bare.startswith(b"From ") and b":" not in bare[:5]:
            out.append(line)  # mbox separator: the stdlib knows it
            continue
        if bare[0] in (32, 9):
            if keep:
                out.append(line)
            else:
                changed = True
            continue
        colon = bare.find(b":")
        name = bare[:colon] if colon > 0 else b""
        stripped = name.rstrip(b" \t")
        keep = bool(stripped) and _P_NAME_RE.fullmatch(stripped) is not None
        if not keep:
            changed = True
            continue
        if stripped != name:
            line = stripped + line[colon:]
            changed = True
        out.append(line)
    return b"\n".join(out) if changed else head


def parse_boundary_split(body: bytes, boundary: bytes) -> list[bytes]:
    """The parts of a multipart body, as exact bytes (each part's headers and body),
    between `--boundary` lines; the line break before a delimiter belongs to it."""
    parts: list[bytes] = []
    start: int | None = None
    for line_start, closing, next_line in parse_delimiters(body, b"--" + boundary):
        if start is not None:
            end = line_start
            if body[end - 2 : end] == b"\r\n":
                end -= 2
            elif body[end - 1 : end] == b"\n":
                end -= 1
            parts.append(body[start : max(start, end)])
        if closing:
            start = None
            break
        start = next_line
    if start is not None:
        parts.append(body[start:])
    return parts


def parse_delimiters(body: bytes, needle: bytes) -> Iterator[tuple[int, bool, int]]:
    """(line start, is the close delimiter, start of the next line) for every line that is
    `needle`, optionally `--`, then only spaces/tabs (bytes.find: a regex with `^` in
    MULTILINE mode is ten times slower on a large body)."""
    pos = 0 if body.startswith(needle) else body.find(b"\n" + needle)
    if pos > 0:
        pos += 1
    while pos >= 0:
        after = pos + len(needle)
        nl = body.find(b"\n", after)
        line_end = len(body) if nl < 0 else nl
        rest = body[after:line_end]
        closing = rest.startswith(b"--")
        tail = rest[2:] if closing else rest
        if not tail.rstrip(b"\r").strip(b" \t"):
            yield pos, closing, len(body) if nl < 0 else nl + 1
        found = body.find(b"\n" + needle, line_end)
        pos = -1 if found < 0 else found + 1


_M_DELIM_TAIL_RE = re.compile(rb"(--)?[ \t]*(?:\r?\n|\r?\Z)")


def mime_delimiters(body: bytes, dash_boundary: bytes) -> list[tuple[int, int, bool]]:
    """(line start, end of the line incl. its line ending, is close delimiter) for every
    delimiter line ``--boundary`` [``--``] [transport padding] of a multipart body."""
    out: list[tuple[int, int, bool]] = []
    pos = 0
    n = len(dash_boundary)
    while True:
        k = body.find(dash_boundary, pos)
        if k < 0:
            return out
        if k == 0 or body[k - 1] == 0x0A:
            m = _M_DELIM_TAIL_RE.match(body, k + n)
            if m is not None:
                out.append((k, m.end(), m.group(1) is not None))
        pos = k + n


def mime_split_entity(data: bytes) -> tuple[bytes, bytes, bytes]:
    """(header block with its last line ending, the blank line, body)."""
    if data.startswith(b"\r\n"):
        return b"", b"\r\n", data[2:]
    if data.startswith(b"\n"):
        return b"", b"\n", data[1:]
    i = data.find(b"\n\r\n")
    k = data.find(b"\n\n", 0, len(data) if i < 0 else i)     # only before the CRLF blank line
    if i < 0 and k < 0:
        return data, b"", b""
    if k < 0 or (0 <= i < k):
        return data[: i + 1], b"\r\n", data[i + 3:]
    return data[: k + 1], b"\n", data[k + 2:]


def mime_set_field(header: bytes, name: bytes, value: bytes, nl: bytes) -> bytes:
    """`header` with field `name` replaced by ``name: value`` (added at the end when absent)."""
    lines = header.splitlines(keepends=True)
    out: list[bytes] = []
    done = False
    skipping = False
    for line in lines:
        if skipping and line[:1] in (b" ", b"\t"):
            continue
        skipping = False
        m = _M_FIELD_RE.match(line)
        if m and m.group(1).lower() == name.lower():
            skipping = True
            if not done:
                out.append(m.group(1) + b": " + value + nl)
                done = True
            continue
        out.append(line)
    if not done:
        out.append(name + b": " + value + nl)
    return b"".join(out)


def mime_field_span(header: bytes, name: bytes) -> tuple[int, int] | None:
    """Byte span of the first field `name` with its continuation lines (line endings included)."""
    pos = 0
    lines = header.splitlines(keepends=True)
    for idx, line in enumerate(lines):
        m = _M_FIELD_RE.match(line)
        if m and m.group(1).lower() == name.lower():
            end = pos + len(line)
            for cont in lines[idx + 1:]:
                if cont[:1] not in (b" ", b"\t"):
                    break
                end += len(cont)
            return pos, end
        pos += len(line)
    return None


def mime_cut(body: bytes, boundary: bytes) -> tuple[list[bytes], list[bytes]] | None:
    """(children, segments) as the old `Entity._parse_multipart` cut them; None when it
    found no delimiter."""
    matches = mime_delimiters(body, b"--" + boundary)
    if not matches:
        return None
    children: list[bytes] = []
    segments: list[bytes] = []
    pos = 0
    for idx, (_, line_end, close) in enumerate(matches):
        if close:
            segments.append(body[pos:])
            pos = len(body)
            break
        start = line_end
        if idx + 1 < len(matches):
            end = matches[idx + 1][0]
            if end > start:
                end -= 2 if body[end - 2:end] == b"\r\n" else 1
        else:
            end = len(body)
        segments.append(body[pos:start])
        children.append(body[start:end])
        segments.append(body[start:end])
        pos = end
    if pos < len(body):
        segments.append(body[pos:])
    return children, segments


def transport_header_block(data: bytes) -> bytes:
    for sep in (b"\r\n\r\n", b"\n\n"):
        i = data.find(sep)
        if i >= 0:
            return data[:i]
    return data


def dsn_header_block(data: bytes) -> bytes:
    """The original's header lines (without the blank line that ends them)."""
    if data.startswith((b"\r\n", b"\n")):
        return b""
    starts_body = re.search(rb"\r?\n\r?\n", data)
    return data[:starts_body.start()] if starts_body else data


def dkim_parse(message: bytes) -> tuple[list[list[bytes]], bytes]:
    idx = message.find(b"\r\n\r\n")
    if idx < 0 or message.count(b"\n") != message.count(b"\r\n"):
        headers, body = dkim.rfc822_parse(message)
        return headers, body
    headers, _ = dkim.rfc822_parse(message[:idx + 2])
    return headers, message[idx + 4:]
