"""The attendees of a meeting invitation: ATTENDEE and ORGANIZER of an iCalendar (RFC 5545) text.

Only what the CRM needs from a ``text/calendar`` part: who is invited. One pass over
the text, linear in its size and capped, never raising:

- content lines are unfolded (RFC 5545 §3.1: a line break followed by one space or
  tab continues the line; CRLF, LF and a lone CR all end a line);
- of the lines named ``ATTENDEE`` or ``ORGANIZER`` (case-insensitive, any component),
  the value is taken when it is a ``mailto:`` URI (``%40``-style escapes undone), the
  ``CN`` parameter (quoted or not, RFC 6868 ``^n ^' ^^`` escapes undone) is its name;
- at most :data:`MAX_BYTES` of text are read and :data:`MAX_ATTENDEES` addresses
  returned; addresses are compared case-insensitively and kept once, in order.

Why not the ``icalendar`` package: it builds the whole calendar (every component,
property and value type) with no size caps, for two properties read here; the
parser's contract is bounded work on hostile bytes, which forty lines keep.
"""

from __future__ import annotations

import re
from urllib.parse import unquote

MAX_BYTES = 1024 * 1024
MAX_ATTENDEES = 500
MAX_LINE = 64 * 1024

_FOLD_RE = re.compile(r"(?:\r\n|\r|\n)[ \t]")
_LINE_RE = re.compile(r"\r\n|\r|\n")
_NAME_RE = re.compile(r"(?i)(ATTENDEE|ORGANIZER)(?=[;:])")
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


def attendees(text: str) -> list[tuple[str, str]]:
    """(address, name) of every ATTENDEE and ORGANIZER with a ``mailto:`` value."""
    out: list[tuple[str, str]] = []
    seen: set[str] = set()
    unfolded = _FOLD_RE.sub("", text[:MAX_BYTES])
    for line in _LINE_RE.split(unfolded):
        if not _NAME_RE.match(line):
            continue
        line = line[:MAX_LINE]
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
