"""The attendees of a meeting invitation: ATTENDEE and ORGANIZER of an iCalendar (RFC 5545) text.

Only what the CRM needs from a ``text/calendar`` part: who is invited. One pass over
the text, linear in its size and capped, never raising:

- content lines are unfolded (RFC 5545 §3.1: a line break followed by one space or
  tab continues the line; CRLF, LF and a lone CR all end a line);
- of the lines named ``ATTENDEE`` or ``ORGANIZER`` (case-insensitive, any component),
  the value is taken when it is a ``mailto:`` URI (``%40``-style escapes undone), the
  ``CN`` parameter (quoted or not, RFC 6868 ``^n ^' ^^`` escapes undone) is its name;
- at most :data:`MAX_BYTES` of text are read, :data:`MAX_LINES` ATTENDEE/ORGANIZER
  lines looked at and :data:`MAX_ATTENDEES` addresses returned; addresses are compared
  case-insensitively and kept once, in order.

Why not the ``icalendar`` package: it builds the whole calendar (every component,
property and value type) with no size caps, for two properties read here; the
parser's contract is bounded work on hostile bytes, which sixty lines keep.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from urllib.parse import unquote

MAX_BYTES = 1024 * 1024
MAX_ATTENDEES = 500
MAX_LINE = 64 * 1024
MAX_LINES = 4 * MAX_ATTENDEES

_START_RE = re.compile(r"(?im)^(?:ATTENDEE|ORGANIZER)(?=[;:])")
_CN_RE = re.compile(r'(?i);CN=(?:"([^"]*)"|([^;:"]*))')
_ADDR_RE = re.compile(r"^[^\s@<>()\[\],;:\"]+@[^\s@<>()\[\],;:\"]+\.[^\s@<>()\[\],;:\"]+$")
_CARET = {"n": " ", "'": '"', "^": "^"}
_CARET_RE = re.compile(r"\^([n'^])")


def _value_start(line: str) -> int:
    """Where the value starts: after the first ``:`` outside a quoted parameter value."""
    quoted = False
    for i, c in enumerate(line):
        if c == '"':
            quoted = not quoted
        elif c == ":" and not quoted:
            return i + 1
    return -1


def _content_lines(text: str) -> Iterator[str]:
    """The unfolded ATTENDEE and ORGANIZER lines of `text`, each cut at `MAX_LINE`, at
    most `MAX_LINES` of them: the text is unfolded with two C-level replaces, then the
    lines are found by one regex scan for their names at the start of a line."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = text.replace("\n ", "").replace("\n\t", "")
    pos = 0
    for _ in range(MAX_LINES):
        m = _START_RE.search(text, pos)
        if m is None:
            return
        end = text.find("\n", m.end())
        end = len(text) if end < 0 else end
        yield text[m.start():min(end, m.start() + MAX_LINE)]
        pos = end


def attendees(text: str) -> list[tuple[str, str]]:
    """(address, name) of every ATTENDEE and ORGANIZER with a ``mailto:`` value."""
    out: list[tuple[str, str]] = []
    seen: set[str] = set()
    for line in _content_lines(text[:MAX_BYTES]):
        start = _value_start(line)
        if start < 0:
            continue
        value = line[start:].strip()
        if value[:7].lower() != "mailto:":
            continue
        address = unquote(value[7:]).strip().strip("<>")
        key = address.lower()
        if not _ADDR_RE.match(address) or len(address) > 320 or key in seen:
            continue
        params = line[:start - 1]
        m = _CN_RE.search(params)
        name = (m.group(1) if m and m.group(1) is not None else (m.group(2) if m else "")) or ""
        name = " ".join(_CARET_RE.sub(lambda c: _CARET[c.group(1)], name).split())
        if name.lower() == key or name.lower() == f"mailto:{key}":
            name = ""
        seen.add(key)
        out.append((address, name))
        if len(out) >= MAX_ATTENDEES:
            break
    return out
