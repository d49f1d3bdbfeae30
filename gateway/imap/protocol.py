"""IMAP4rev1 wire format (RFC 3501): read one response with its literals, parse it, build commands.

Pure functions and one reader; no state and no policy. The client (`client.py`) sends
commands built with `quote_astring`/`uid_set`, reads with `read_response` and interprets the
`Response` values.

A response is read as a list of chunks: text lines and, after a line ending in
`{N}` (or `~{N}`, RFC 3516), exactly N literal bytes. Literals never go through the
tokenizer, so message bodies with unbalanced parentheses, quotes or lines that look
like responses cannot confuse it (the bugs behind aioimaplib #118 and friends), and a
response of any number of lines is parsed without recursion.

Parsed values: atoms and quoted strings are `str`, literals are `bytes`, parenthesized
lists are `list`, `NIL` is `None`. Section specifiers keep their brackets in the atom
(`BODY[HEADER.FIELDS (FROM TO)]`).

Hostile answers: everything here is linear in the bytes read, and whatever the server
sends that we cannot read raises `ProtocolError` (never `ValueError` or `IndexError`).
Numbers are read with `parse_number`: ASCII digits only (`str.isdigit` takes "²"), at
most 20 of them and no larger than the bound of their kind (`NUMBER_MAX`, `UID_MAX`).
A sequence set is counted before it is expanded (`uid_ranges`, `parse_uid_set(limit=)`),
so `1:4294967295` costs nothing until someone asks for four billion numbers.
"""

from __future__ import annotations

import asyncio
import base64
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta, timezone
from typing import Any

__all__ = [
    "Literal",
    "ProtocolError",
    "Response",
    "decode_mailbox",
    "encode_mailbox",
    "format_internaldate",
    "format_search_date",
    "parse_internaldate",
    "parse_number",
    "parse_response",
    "parse_uid_set",
    "quote_astring",
    "read_response",
    "uid_ranges",
    "uid_set",
]

NUMBER_MAX = 2**63 - 1
"""The largest number we read (RFC 9051 number64; a mod-sequence is at most this)."""
UID_MAX = 2**32 - 1
"""The largest UID, sequence number or literal size (RFC 3501 nz-number / number)."""


class ProtocolError(Exception):
    """The server sent something that is not IMAP (or exceeds our limits)."""


def parse_number(text: str | bytes, *, limit: int = NUMBER_MAX, what: str = "number") -> int:
    """ASCII digits -> int, at most `limit`; anything else raises `ProtocolError`.

    `int()` alone would take "²" (`isdigit` is true for it, `int` then raises
    ValueError), " 12", "1_000" and "+5", and raises ValueError past 4,300 digits."""
    if isinstance(text, bytes):
        text = text.decode("ascii", "replace")
    if not (text.isascii() and text.isdigit()) or len(text) > 20:
        raise ProtocolError(f"not a {what}: {text[:40]!r}")
    value = int(text)
    if value > limit:
        raise ProtocolError(f"{what} {text[:40]} is larger than {limit}")
    return value


@dataclass(frozen=True)
class Literal:
    """A command argument sent as a literal (`{N}` + bytes), for 8-bit or CR/LF data."""

    data: bytes


@dataclass
class Response:
    """One server response.

    `tag` is `*` (untagged), `+` (continuation) or the command tag. `kind` is the upper-case
    keyword: a status (`OK`, `NO`, `BAD`, `BYE`, `PREAUTH`) or a data kind (`CAPABILITY`,
    `LIST`, `SEARCH`, `ESEARCH`, `FLAGS`, `STATUS`, `ENABLED`, `VANISHED`, `EXISTS`,
    `RECENT`, `EXPUNGE`, `FETCH`). `number` is the leading number of `* 3 EXISTS` or
    `* 12 FETCH (...)`. Status responses have `code`/`code_args` (the bracketed response
    code, e.g. `UIDVALIDITY` / `"3857529045"`) and `text`; data responses have `data`.
    """

    tag: str
    kind: str
    number: int | None = None
    code: str | None = None
    code_args: str = ""
    text: str = ""
    data: list[Any] = field(default_factory=list)

    def describe(self) -> str:
        """The server's words: `[CODE args] text`, for error messages."""
        code = f"[{self.code}{' ' + self.code_args if self.code_args else ''}] " if self.code else ""
        return f"{self.kind} {code}{self.text}".strip()


_STATUS = frozenset({"OK", "NO", "BAD", "BYE", "PREAUTH"})
_LITERAL_AT_END = re.compile(rb"~?\{(\d+)\+?\}\r\n$")


async def read_response(reader: asyncio.StreamReader, *, max_literal: int = 64 * 1024 * 1024
                        ) -> list[bytes | bytearray]:
    """Read one complete response: text chunks (without CRLF at the very end) and literals.

    Raises `asyncio.IncompleteReadError` on EOF, `ProtocolError` on a line longer than the
    reader's limit or a literal above `max_literal`. Chunks alternate: text, literal, text, ...
    """
    chunks: list[bytes | bytearray] = []
    while True:
        try:
            line = await reader.readuntil(b"\r\n")
        except asyncio.LimitOverrunError as exc:
            raise ProtocolError(f"response line longer than {exc.consumed} bytes") from None
        m = _LITERAL_AT_END.search(line)
        if m is None:
            chunks.append(line[:-2])
            return chunks
        size = parse_number(m.group(1), limit=UID_MAX, what="literal size")
        if size > max_literal:
            raise ProtocolError(f"literal of {size} bytes exceeds the limit of {max_literal}")
        chunks.append(line[:m.start()])
        chunks.append(await reader.readexactly(size))


# -- parsing ---------------------------------------------------------------------------

_TOKEN = re.compile(
    rb"""[ ]*(?:
        (?P<open>\()
      | (?P<close>\))
      | "(?P<quoted>(?:[^"\\\r\n]|\\.)*)"
      | (?P<atom>[^\s()"\[\]{]+(?:\[[^\]]*\][^\s()]*)?|\[[^\]]*\][^\s()]*)
    )""",
    re.VERBOSE,
)
_UNESCAPE = re.compile(rb"\\(.)")


def _tokens(chunks: Sequence[bytes | bytearray], start: int) -> list[Any]:
    """Parse the text chunks (from byte offset `start` of the first) into nested values."""
    stack: list[list[Any]] = [[]]
    for i, chunk in enumerate(chunks):
        if i % 2 == 1:  # a literal
            stack[-1].append(bytes(chunk))
            continue
        pos = start if i == 0 else 0
        end = len(chunk)
        while pos < end:
            m = _TOKEN.match(chunk, pos)
            if m is None or m.end() == pos:
                if chunk[pos:].strip() == b"":
                    break
                raise ProtocolError(f"cannot parse at {bytes(chunk[pos:pos + 40])!r}")
            pos = m.end()
            kind = m.lastgroup
            if kind == "open":
                new: list[Any] = []
                stack[-1].append(new)
                stack.append(new)
            elif kind == "close":
                if len(stack) == 1:
                    raise ProtocolError("unbalanced ')' in response")
                stack.pop()
            elif kind == "quoted":
                raw = _UNESCAPE.sub(rb"\1", m.group("quoted"))
                stack[-1].append(raw.decode("utf-8", "surrogateescape"))
            else:
                atom = m.group("atom").decode("utf-8", "surrogateescape")
                stack[-1].append(None if atom.upper() == "NIL" else atom)
    if len(stack) != 1:
        raise ProtocolError("unbalanced '(' in response")
    return stack[0]


_CODE = re.compile(r"^\[([^\]\s]+)(?: ([^\]]*))?\] ?(.*)$", re.S)


def _status(tag: str, kind: str, rest: str, number: int | None = None) -> Response:
    m = _CODE.match(rest)
    if m:
        return Response(tag, kind, number, m.group(1).upper(), m.group(2) or "", m.group(3))
    return Response(tag, kind, number, text=rest)


def parse_response(chunks: Sequence[bytes | bytearray]) -> Response:
    """Turn the chunks from `read_response` into a `Response`."""
    first = bytes(chunks[0])
    if first.startswith(b"+"):
        return Response("+", "CONTINUE", text=first[1:].strip().decode("utf-8", "replace"))
    tag_b, sp, rest = first.partition(b" ")
    if not sp or not tag_b:
        raise ProtocolError(f"malformed response {first[:80]!r}")
    tag = tag_b.decode("ascii", "replace")
    word_b, _, after = rest.partition(b" ")
    word = word_b.decode("ascii", "replace").upper()
    number: int | None = None
    if tag == "*" and word.isascii() and word.isdigit():
        number = parse_number(word, limit=UID_MAX, what="message number")
        word_b, _, after = after.partition(b" ")
        word = word_b.decode("ascii", "replace").upper()
    if word in _STATUS:
        # status text is free-form: never tokenized (may hold unbalanced quotes/parens);
        # literals in status responses do not occur in practice, keep them as text
        text = after.decode("utf-8", "replace")
        for extra in chunks[1:]:
            text += bytes(extra).decode("utf-8", "replace")
        return _status(tag, word, text, number)
    if tag != "*":
        raise ProtocolError(f"tagged response without status: {first[:80]!r}")
    offset = len(first) - len(after)
    data = _tokens(chunks, offset) if after or len(chunks) > 1 else []
    return Response(tag, word, number, data=data)


# -- building commands -----------------------------------------------------------------

_ATOM_SAFE = re.compile(r"^[!#$&'+,\-./0-9:;<=>?@A-Z^_`a-z|}~]+$")


def quote_astring(value: str) -> str | Literal:
    """An IMAP astring for `value`: an atom, a quoted string, or a literal (8-bit, CR, LF)."""
    if value and _ATOM_SAFE.match(value) and value.upper() != "NIL":
        return value
    if any(ord(c) > 0x7E or c in "\r\n\0" for c in value):
        return Literal(value.encode("utf-8"))
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def uid_set(uids: Iterable[int]) -> str:
    """Compress UIDs into an IMAP sequence set: [1, 2, 3, 5, 9, 10] -> `1:3,5,9:10`."""
    ordered = sorted(set(uids))
    if not ordered:
        raise ValueError("an empty UID set cannot be sent")
    parts: list[str] = []
    start = prev = ordered[0]
    for u in ordered[1:]:
        if u == prev + 1:
            prev = u
            continue
        parts.append(str(start) if start == prev else f"{start}:{prev}")
        start = prev = u
    parts.append(str(start) if start == prev else f"{start}:{prev}")
    return ",".join(parts)


def uid_ranges(text: str, *, largest: int | None = None, low: int = 1,
               high: int = UID_MAX) -> list[tuple[int, int]]:
    """`1:3,5` -> [(1, 3), (5, 5)]: the ranges of a sequence set, each clipped to
    [low, high] (ranges outside it are dropped), without expanding anything; `*` needs
    `largest`. A member that is not a UID (0, > `UID_MAX`, not ASCII digits) raises
    `ProtocolError`."""
    out: list[tuple[int, int]] = []

    def num(s: str) -> int:
        if s == "*":
            if largest is None:
                raise ProtocolError("'*' in a UID set without a largest UID")
            return largest
        value = parse_number(s, limit=UID_MAX, what="UID")
        if value == 0:
            raise ProtocolError("UID 0 in a sequence set")
        return value

    for part in text.split(","):
        if not part:
            continue
        a, _, b = part.partition(":")
        lo, hi = num(a), num(b) if b else num(a)
        if lo > hi:
            lo, hi = hi, lo
        lo, hi = max(lo, low), min(hi, high)
        if lo <= hi:
            out.append((lo, hi))
    return out


def parse_uid_set(text: str, *, largest: int | None = None, limit: int | None = None,
                  low: int = 1, high: int = UID_MAX) -> list[int]:
    """`1:3,5` -> [1, 2, 3, 5] (members outside [low, high] left out); `*` needs
    `largest`. More than `limit` members raises `ProtocolError` before anything is
    expanded."""
    ranges = uid_ranges(text, largest=largest, low=low, high=high)
    if limit is not None:
        total = sum(hi - lo + 1 for lo, hi in ranges)
        if total > limit:
            raise ProtocolError(f"a sequence set of {total} UIDs (more than {limit})")
    out: list[int] = []
    for lo, hi in ranges:
        out.extend(range(lo, hi + 1))
    return out


# -- mailbox names (modified UTF-7, RFC 3501 5.1.3) -------------------------------------

def encode_mailbox(name: str) -> str:
    """Unicode mailbox name -> modified UTF-7 as sent on the wire."""
    out: list[str] = []
    pending: list[str] = []

    def flush() -> None:
        if pending:
            b64 = base64.b64encode("".join(pending).encode("utf-16-be")).rstrip(b"=")
            out.append("&" + b64.replace(b"/", b",").decode("ascii") + "-")
            pending.clear()

    for ch in name:
        if 0x20 <= ord(ch) <= 0x7E:
            flush()
            out.append("&-" if ch == "&" else ch)
        else:
            pending.append(ch)
    flush()
    return "".join(out)


_MUTF7 = re.compile(r"&([A-Za-z0-9+,]*)-")


def decode_mailbox(name: str) -> str:
    """Modified UTF-7 -> Unicode; invalid sequences are left as they are."""

    def dec(m: re.Match[str]) -> str:
        seg = m.group(1)
        if not seg:
            return "&"
        try:
            raw = base64.b64decode(seg.replace(",", "/") + "=" * (-len(seg) % 4))
            return raw.decode("utf-16-be")
        except (ValueError, UnicodeDecodeError):
            return m.group(0)

    return _MUTF7.sub(dec, name)


# -- dates -----------------------------------------------------------------------------

_MONTHS = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]
_INTERNALDATE = re.compile(r"^\s?(\d{1,2})-([A-Za-z]{3})-(\d{4}) (\d\d):(\d\d):(\d\d) ([+-])(\d\d)(\d\d)$")


def parse_internaldate(text: str) -> datetime | None:
    """`17-Jul-1996 02:44:25 -0700` -> aware datetime (None when malformed)."""
    m = _INTERNALDATE.match(text)
    if m is None:
        return None
    try:
        month = _MONTHS.index(m.group(2).capitalize()) + 1
        offset = timedelta(hours=int(m.group(8)), minutes=int(m.group(9)))
        tz = timezone(offset if m.group(7) == "+" else -offset)
        return datetime(int(m.group(3)), month, int(m.group(1)), int(m.group(4)),
                        int(m.group(5)), int(m.group(6)), tzinfo=tz)
    except ValueError:
        return None


def format_internaldate(when: datetime) -> str:
    """An aware (or UTC-assumed naive) datetime -> `"17-Jul-1996 02:44:25 -0700"` (quoted)."""
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    off = when.utcoffset() or timedelta(0)
    sign = "-" if off < timedelta(0) else "+"
    minutes = abs(int(off.total_seconds())) // 60
    return (f'"{when.day:02d}-{_MONTHS[when.month - 1]}-{when.year:04d} '
            f'{when:%H:%M:%S} {sign}{minutes // 60:02d}{minutes % 60:02d}"')


def format_search_date(when: date | datetime) -> str:
    """A date for SEARCH SINCE/BEFORE: `1-Feb-2024` (the day, no time)."""
    return f"{when.day}-{_MONTHS[when.month - 1]}-{when.year:04d}"
