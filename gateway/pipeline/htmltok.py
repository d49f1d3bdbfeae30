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
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_WS = "\t\n\f\r "
_TAG_NAME_RE = re.compile(r"[A-Za-z][^\t\n\f\r />]*")
_BEFORE_ATTR_RE = re.compile(r"[\t\n\f\r /]*")
_ATTR_NAME_RE = re.compile(r"=?[^\t\n\f\r />=]*")
_EQ_RE = re.compile(r"[\t\n\f\r ]*=[\t\n\f\r ]*")
_UNQUOTED_RE = re.compile(r"[^\t\n\f\r >]*")
_RAWTEXT = frozenset({"script", "style", "xmp", "iframe", "noembed", "noframes", "title", "textarea"})
_RAW_END_RE = {name: re.compile(rf"</{name}[\t\n\f\r />]", re.I) for name in _RAWTEXT}
_COMMENT_END_RE = re.compile(r"--!?>")
_COND_OPEN_RE = re.compile(r"<!--\[if\b[^\]>]*\]>", re.I)


@dataclass(frozen=True, slots=True)
class Attr:
    """One attribute: its lower-cased name and where its value lies (empty span when valueless)."""

    name: str
    value_start: int
    value_end: int
    quote: str          # '"', "'" or "" (unquoted or no value)


@dataclass(slots=True)
class Tag:
    """A start or end tag spanning ``[start, end)`` of the document (``end`` is after ``>``)."""

    name: str
    start: int
    end: int
    is_end: bool
    attrs: list[Attr] = field(default_factory=list)

    def get(self, name: str) -> Attr | None:
        """The first attribute called `name` (already lower-case), or None."""
        for a in self.attrs:
            if a.name == name:
                return a
        return None


def _ascii_lower(s: str) -> str:
    return s.lower() if s.isascii() else "".join(c.lower() if "A" <= c <= "Z" else c for c in s)


def _parse_tag(s: str, j: int, is_end: bool) -> Tag | None:
    """The tag starting at ``s[j]`` (``<`` or ``</``), or None if the document ends inside it."""
    name_at = j + 2 if is_end else j + 1
    m = _TAG_NAME_RE.match(s, name_at)
    assert m is not None  # the caller checked for a letter
    tag = Tag(_ascii_lower(m.group()), j, -1, is_end)
    seen: set[str] = set()
    i = m.end()
    n = len(s)
    while True:
        i = _BEFORE_ATTR_RE.match(s, i).end()  # type: ignore[union-attr]
        if i >= n:
            return None
        if s[i] == ">":
            tag.end = i + 1
            return tag
        nm = _ATTR_NAME_RE.match(s, i)
        assert nm is not None
        name = _ascii_lower(nm.group())
        i = nm.end()
        eq = _EQ_RE.match(s, i)
        if eq is None:
            attr = Attr(name, i, i, "")
        else:
            i = eq.end()
            if i >= n:
                return None
            q = s[i]
            if q in "\"'":
                close = s.find(q, i + 1)
                if close < 0:
                    return None
                attr = Attr(name, i + 1, close, q)
                i = close + 1
            else:
                um = _UNQUOTED_RE.match(s, i)
                assert um is not None
                attr = Attr(name, i, um.end(), "")
                i = um.end()
        if name not in seen:
            seen.add(name)
            tag.attrs.append(attr)


def tokenize(s: str) -> list[Tag]:
    """Every start and end tag of `s`, in document order."""
    tags: list[Tag] = []
    n = len(s)
    i = 0
    find = s.find
    startswith = s.startswith
    while i < n:
        j = find("<", i)
        if j < 0 or j + 1 >= n:
            break
        c = s[j + 1]
        if c == "!":
            if startswith("<!--", j):
                cm = _COND_OPEN_RE.match(s, j)
                if cm is not None:          # Outlook renders what follows: keep tokenizing
                    i = cm.end()
                    continue
                if startswith(">", j + 4):
                    i = j + 5
                    continue
                if startswith("->", j + 4):
                    i = j + 6
                    continue
                end = _COMMENT_END_RE.search(s, j + 4)
                if end is None:
                    break
                i = end.end()
                continue
            if startswith("<![CDATA[", j):
                k = find("]]>", j + 9)
                if k < 0:
                    break
                i = k + 3
                continue
            k = find(">", j + 2)            # <!DOCTYPE ...>, <![endif]-->, other bogus comments
            if k < 0:
                break
            i = k + 1
            continue
        if c == "?":
            k = find(">", j + 2)
            if k < 0:
                break
            i = k + 1
            continue
        if c == "/":
            if j + 2 >= n:
                break
            c2 = s[j + 2]
            if c2 == ">":
                i = j + 3
                continue
            if not ("a" <= c2 <= "z" or "A" <= c2 <= "Z"):
                k = find(">", j + 2)        # bogus comment
                if k < 0:
                    break
                i = k + 1
                continue
            tag = _parse_tag(s, j, True)
            if tag is None:
                break
            tags.append(tag)
            i = tag.end
            continue
        if "a" <= c <= "z" or "A" <= c <= "Z":
            tag = _parse_tag(s, j, False)
            if tag is None:
                break
            tags.append(tag)
            i = tag.end
            if tag.name in _RAWTEXT:
                em = _RAW_END_RE[tag.name].search(s, i)
                if em is None:
                    break
                i = em.start()
            elif tag.name == "plaintext":
                break
            continue
        i = j + 1
    return tags


def insertion_point(s: str, tags: list[Tag] | None = None) -> int:
    """Where content appended to the document's body goes: before the last ``</body>``,
    else before the last ``</html>``, else at the end (before trailing whitespace)."""
    if tags is None:
        tags = tokenize(s)
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
