"""Reference HTML tokenizer for differential tests: a plain state-machine loop, slow but obvious.

`gateway.pipeline.htmltok` finds tags with one regular expression (possessive and
atomic groups) for speed; this module walks the same WHATWG tokenizer states one step
at a time, and the tests check that both find the same tags, ends and attribute spans.
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
_RAW_END_RE = {name: re.compile("</" + "".join(f"[{c.upper()}{c}]" for c in name) + "[\t\n\f\r />]")
               for name in _RAWTEXT}
_COMMENT_END_RE = re.compile(r"--!?>")
_COND_OPEN_RE = re.compile(r"<!--\[[Ii][Ff]\b[^\]>]*\]>")


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
        space = _BEFORE_ATTR_RE.match(s, i)
        assert space is not None  # the pattern matches the empty string
        i = space.end()
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
