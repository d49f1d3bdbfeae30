"""Find the start and end tags of an HTML document, with the exact position of every attribute value.

The outbound stages edit HTML by replacing a few character ranges (an ``href`` value)
or inserting markup at one position (before ``</body>``); everything else must stay as
the author wrote it. So this is not a parser that builds a tree and re-serialises it,
but a tokenizer that reports where tags and attribute values are, following the
WHATWG tokenizer closely enough that what it calls a tag is what a mail client's
HTML engine calls a tag:

- comments ``<!-- ... -->`` (also the abrupt ``<!-->`` and ``<!--->``), ``<!DOCTYPE>``
  and other ``<!...>`` / ``<?...>`` bogus comments hide whatever they contain;
- ``<![CDATA[ ... ]]>`` hides its content;
- downlevel-hidden conditional comments (``<!--[if mso]> ... <![endif]-->``) are
  *not* treated as comments: Outlook renders their content, so the opener and the
  closer are skipped and the markup between them is tokenized like any other. The
  downlevel-revealed form (``<!--[if !mso]><!--> ... <!--<![endif]-->``) already
  consists of complete comments around normal markup;
- ``<script>``, ``<style>``, ``<xmp>``, ``<iframe>``, ``<noembed>``, ``<noframes>``
  (raw text), ``<title>``, ``<textarea>`` (escapable raw text) contain no tags up
  to their end tag; ``<plaintext>`` runs to the end of the document;
- tag and attribute names are ASCII-lower-cased; attribute values may be double-
  quoted, single-quoted or unquoted; ``/`` between attributes is ignored; the first
  of duplicate attributes wins (as in browsers);
- a tag cut off by the end of the document (or an unterminated quoted value) is not
  a tag, exactly as in browsers.

``<noscript>`` is tokenized as normal markup: mail clients do not run scripts.
Positions are ``str`` indices into the decoded document.

For speed one regular expression finds every construct that starts with ``<`` (the
engine skips the text in between) and scans a whole tag; its possessive and atomic
groups never backtrack, so it takes the tokenizer's states in order: a quote opens a
quoted value only right after ``=``, an open quote runs to the end of the document,
and the first ``>`` outside a quoted value ends the tag. Attributes are parsed only
for the tags whose attributes are asked for. ``tests/support/htmltok_reference.py``
is the same tokenizer written as a plain state-machine loop; the tests check both
agree.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field

_WS = "\t\n\f\r "
_TAG_BODY = r"""
    (?: [\t\n\f\r /]++
      | (?> =[^\t\n\f\r />=]*+ | [^\t\n\f\r />=]++ )
        (?: [\t\n\f\r ]*+ = [\t\n\f\r ]*+
            (?: "[^"]*+" | '[^']*+' | [^\t\n\f\r >"'][^\t\n\f\r >]*+ | (?=>) | ["'].*+ ) )?+
    )*+ >"""
# Everything that starts with "<" and means something, in the tokenizer's order of
# precedence (one leading literal "<" lets the engine skip text quickly). A match of an
# "open_*" group or of "cut" means the document ends inside that construct: nothing
# after it is markup.
_SCAN_RE = re.compile(r"""<(?:
      (?P<cond> !--\[[Ii][Ff]\b[^\]>]*\]> )             # Outlook conditional: keep going
    | !--(?: > | -> | .*?--!?> )                        # comment (also <!--> and <!--->)
    | (?P<open_comment> !-- )
    | !\[CDATA\[ .*? \]\]>
    | (?P<open_cdata> !\[CDATA\[ )
    | (?: [!?] | /(?![A-Za-z>]) ) [^>]* >               # <!DOCTYPE>, <![endif]-->, <?..>, </ x>
    | (?P<open_bogus> [!?] | /(?![A-Za-z>]) )
    | />
    | (?P<slash>/?)(?P<name>[A-Za-z][^\t\n\f\r />]*+)""" + _TAG_BODY + r"""
    | (?P<cut> /?[A-Za-z] ) )
    """, re.S | re.X)
_STOP = frozenset({"open_comment", "open_cdata", "open_bogus", "cut"})
_ATTR_RE = re.compile(r"""
    [\t\n\f\r /]*+
    ( =[^\t\n\f\r />=]*+ | [^\t\n\f\r />=]*+ )
    (?: [\t\n\f\r ]*+ = [\t\n\f\r ]*+
        (?: "([^"]*+)" | '([^']*+)' | ([^\t\n\f\r >"'][^\t\n\f\r >]*+) | (?=>) ) )?+
    """, re.X)
_RAWTEXT = frozenset({"script", "style", "xmp", "iframe", "noembed", "noframes", "title", "textarea"})
_TERM = r"[\t\n\f\r />]"         # what ends a tag name


def _ci(name: str) -> str:
    """A pattern matching `name` with ASCII case folded only (``re.I`` would also let
    U+017F match "s" and U+212A match "k"; HTML lower-cases ASCII only)."""
    return "".join(f"[{c.upper()}{c.lower()}]" if c.isalpha() else re.escape(c) for c in name)


_RAW_END_RE = {name: re.compile(f"</{_ci(name)}{_TERM}") for name in _RAWTEXT}


@dataclass(frozen=True, slots=True)
class Attr:
    """One attribute: its lower-cased name and where its value lies (empty span when valueless)."""

    name: str
    value_start: int
    value_end: int
    quote: str          # '"', "'" or "" (unquoted or no value)


@dataclass(slots=True)
class Tag:
    """A start or end tag spanning ``[start, end)`` of the document (``end`` is after ``>``).

    Attributes are parsed on first use (most tags' attributes are never looked at)."""

    name: str
    start: int
    end: int
    is_end: bool
    doc: str = field(repr=False)
    attrs_start: int = field(repr=False)
    _attrs: list[Attr] | None = field(default=None, repr=False)

    @property
    def attrs(self) -> list[Attr]:
        if self._attrs is None:
            self._attrs = _parse_attrs(self.doc, self.attrs_start, self.end)
        return self._attrs

    def get(self, name: str) -> Attr | None:
        """The first attribute called `name` (already lower-case), or None."""
        for a in self.attrs:
            if a.name == name:
                return a
        return None


def _ascii_lower(s: str) -> str:
    return s.lower() if s.isascii() else "".join(c.lower() if "A" <= c <= "Z" else c for c in s)


def _parse_attrs(s: str, pos: int, end: int) -> list[Attr]:
    """The attributes between `pos` and the tag's closing ``>`` at ``end - 1``."""
    out: list[Attr] = []
    seen: set[str] = set()
    last = end - 1
    while pos < last:
        m = _ATTR_RE.match(s, pos, end)
        assert m is not None        # every part is optional
        raw_name = m.group(1)
        if not raw_name:
            break
        name = _ascii_lower(raw_name)
        if m.start(2) >= 0:
            attr = Attr(name, m.start(2), m.end(2), '"')
        elif m.start(3) >= 0:
            attr = Attr(name, m.start(3), m.end(3), "'")
        elif m.start(4) >= 0:
            attr = Attr(name, m.start(4), m.end(4), "")
        else:
            attr = Attr(name, m.end(), m.end(), "")
        if name not in seen:
            seen.add(name)
            out.append(attr)
        pos = m.end()
    return out


@functools.lru_cache(maxsize=16)
def _filtered_re(names: frozenset[str]) -> re.Pattern[str]:
    """One match per tag called one of `names`: everything before it (text, comments,
    other tags, raw text elements with their content) is skipped inside the match, so
    the regex engine, not Python, walks the document. A construct the document ends
    inside swallows the rest, and then nothing matches any more."""
    wanted = "|".join(_ci(n) for n in sorted(names, key=len, reverse=True))
    raw = "".join(
        rf"| <{_ci(n)}(?={_TERM}) (?: {_TAG_BODY} (?: .*?(?=</{_ci(n)}{_TERM}) | .*+ ) | .*+ )"
        for n in sorted(_RAWTEXT))
    return re.compile(rf"""
        (?: [^<]++
          | <!--\[[Ii][Ff]\b[^\]>]*\]>
          | <!--(?: > | -> | .*?--!?> ) | <!--.*+
          | <!\[CDATA\[ .*? \]\]> | <!\[CDATA\[.*+
          | <(?: [!?] | /(?![A-Za-z>]) ) (?: [^>]*+> | .*+ )
          | </>
          {raw}
          | <{_ci("plaintext")}(?={_TERM}).*+
          | </?(?!(?:{wanted}){_TERM})[A-Za-z][^\t\n\f\r />]*+ (?: {_TAG_BODY} | .*+ )
          | <(?![A-Za-z!?/])
        )*+
        (?: <(?P<slash>/?)(?P<name>{wanted})(?={_TERM}) {_TAG_BODY} | <.*+ )
        """, re.S | re.X)


def tokenize(s: str, names: frozenset[str] | None = None) -> list[Tag]:
    """Every start and end tag of `s` in document order (only those called one of `names`)."""
    tags: list[Tag] = []
    if names is not None and not names & _RAWTEXT and "plaintext" not in names:
        rx = _filtered_re(names)
        pos, n = 0, len(s)
        while pos < n:
            m = rx.match(s, pos)
            if m is None or m.start("name") < 0:
                break
            tags.append(Tag(m.group("name").lower(), m.start("slash") - 1, m.end(),
                            m.start("slash") != m.end("slash"), s, m.end("name")))
            pos = m.end()
        return tags
    pos = 0
    while True:
        raw_name = ""
        end = pos
        for m in _SCAN_RE.finditer(s, pos):
            kind = m.lastgroup
            if kind != "name":
                if kind in _STOP:
                    return tags
                continue
            raw = m.group("name")
            name = raw.lower() if raw.isascii() else _ascii_lower(raw)
            is_end = m.start("slash") != m.end("slash")
            if names is None or name in names:
                tags.append(Tag(name, m.start(), m.end(), is_end, s, m.end("name")))
            if not is_end and (name in _RAWTEXT or name == "plaintext"):
                raw_name, end = name, m.end()
                break
        if not raw_name or raw_name == "plaintext":
            return tags
        em = _RAW_END_RE[raw_name].search(s, end)
        if em is None:
            return tags
        pos = em.start()


_END_NAMES = frozenset({"body", "html"})


def insertion_point(s: str, tags: list[Tag] | None = None) -> int:
    """Where content appended to the document's body goes: before the last ``</body>``,
    else before the last ``</html>``, else at the end (before trailing whitespace)."""
    if tags is None:
        tags = tokenize(s, _END_NAMES)
    for name in ("body", "html"):
        for t in reversed(tags):
            if t.is_end and t.name == name:
                return t.start
    return len(s.rstrip(_WS))


def body_start(tags: list[Tag]) -> int | None:
    """The position just after the first ``<body ...>`` start tag, or None."""
    for t in tags:
        if not t.is_end and t.name == "body":
            return t.end
    return None
