"""Rewrite the ``href`` of ``<a>`` and ``<area>`` in one HTML body to signed click-tracking URLs.

Only the characters of each rewritten ``href`` value change (plus one hidden honeypot
link); every other character of the document is kept, because `htmltok` reports
value positions and this module replaces exactly those ranges.

Which links are rewritten: the ``href`` of an ``<a>`` or ``<area>`` start tag whose
URL — after HTML character references are resolved the way a browser resolves them
in an attribute (``&amp;`` -> ``&``, ``&#38;``, ``&#x26;``; ``&copy=`` stays as is),
leading/trailing whitespace stripped and tabs/newlines removed — is an absolute
``http``/``https`` URL with a host, and that is not:

- on a tag carrying ``data-notrack`` (any value);
- already under ``base_url`` (tracked before: a forwarded or quoted message);
- one of the message's ``List-Unsubscribe`` URLs (compared exactly);
- matched by a ``skip_links`` glob. Globs are matched case-insensitively against the
  whole URL, and also against it without its ``scheme://``, so ``*.example.com/*``
  and ``https://example.com/unsubscribe*`` both work;

so ``mailto:``, ``tel:``, ``sms:``, ``javascript:``, ``#anchors`` and relative URLs
are never touched. Links are numbered 1, 2, … in document order among the rewritten
ones (the token's link number; 0 is the open pixel's), at most 65535 per part.

The redirect goes to the URL the author meant: the token carries the resolved URL,
not the ``&amp;``-escaped attribute text (Postal #907).

With click tracking on and at least one link rewritten, one honeypot link is added:
an empty ``<a>`` (no text, ``display:none``, ``aria-hidden``, ``tabindex=-1``) that a
person can neither see nor have announced, pointing at a ``honeypot`` token (link
number 0, the first rewritten URL: a scanner that follows it lands where a real
link would take it). It goes just after ``<body ...>``, or before the first
rewritten link when there is no body tag. Only machines follow it.
"""

from __future__ import annotations

import html
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from html.entities import html5
from urllib.parse import urlsplit

from gateway.pipeline.htmltok import body_start, insertion_point, tokenize
from gateway.policy.rules import url_skipped
from gateway.tracking.tokens import TokenSigner

MAX_LINKS = 65535
_CHARREF_RE = re.compile(r"&(#[0-9]+;?|#[xX][0-9a-fA-F]+;?|[^\t\n\f <&#;]{1,32};?)")
_URL_WS_RE = re.compile(r"[\t\n\r]")
_URL_STRIP = "".join(chr(c) for c in range(0x21))   # C0 controls and space (WHATWG URL)
_LIST_UNSUB_RE = re.compile(r"<([^>]*)>")
_LINK_TAGS = frozenset({"a", "area", "body", "html"})  # body, html: the pixel's place too


def _replace_charref(m: re.Match[str]) -> str:
    s = m.group(1)
    if s[0] == "#":
        return html.unescape(m.group())         # numeric: the HTML5 rules, incl. cp1252 for 0x80-0x9F
    if s in html5:
        return html5[s]
    # a reference without ';' followed by '=' or an alphanumeric stays literal in attributes
    for x in range(len(s) - 1, 1, -1):
        if s[:x] in html5:
            nxt = s[x]
            if nxt == "=" or (nxt.isascii() and nxt.isalnum()):
                return m.group()
            return html5[s[:x]] + s[x:]
    return m.group()


def unescape_attr(value: str) -> str:
    """An attribute value's text with character references resolved as a browser does."""
    if "&" not in value:
        return value
    return _CHARREF_RE.sub(_replace_charref, value)


def clean_url(value: str) -> str:
    """The URL a browser navigates to for the raw attribute text `value`."""
    return _URL_WS_RE.sub("", unescape_attr(value).strip(_URL_STRIP))


def list_unsubscribe_urls(values: Iterable[str]) -> frozenset[str]:
    """The ``<...>`` URLs of ``List-Unsubscribe`` header values."""
    out: set[str] = set()
    for v in values:
        out.update(u.strip() for u in _LIST_UNSUB_RE.findall(v))
    return frozenset(out)


@dataclass(frozen=True)
class LinkPolicy:
    """What the rewriter needs besides the document: one per recipient copy."""

    base_url: str                     # e.g. https://t.example.com (no trailing slash needed)
    copy_id: str
    signer: TokenSigner
    skip_links: tuple[str, ...] = ()
    unsubscribe: frozenset[str] = frozenset()
    honeypot: bool = True
    first_link: int = 1               # link number of the first link rewritten in this part

    @property
    def root(self) -> str:
        return self.base_url.rstrip("/")


@dataclass
class Rewritten:
    """The outcome for one document: its new text and what changed."""

    text: str
    links: dict[int, str] = field(default_factory=dict)    # link number -> original URL
    honeypot: bool = False
    #: where `htmltok.insertion_point` is in `text` (so the pixel stage need not tokenize
    #: the document again); None when nothing was rewritten
    insertion_point: int | None = None


def _skipped(url: str, tag_has_notrack: bool, policy: LinkPolicy) -> bool:
    if tag_has_notrack:
        return True
    try:
        parts = urlsplit(url)
    except ValueError:
        return True
    if parts.scheme.lower() not in ("http", "https") or not parts.netloc:
        return True
    low = url.lower()
    if low.startswith(policy.root.lower() + "/"):
        return True
    if url in policy.unsubscribe:
        return True
    return url_skipped(url, policy.skip_links)


def _attr_escape(text: str) -> str:
    return text.replace("&", "&amp;").replace('"', "&quot;").replace("'", "&#39;").replace("<", "&lt;")


def honeypot_markup(url: str) -> str:
    """The hidden link a person never sees or hears; `url` is the full tracking URL."""
    return (f'<a href="{_attr_escape(url)}" style="display:none !important" '
            f'aria-hidden="true" tabindex="-1"></a>')


def rewrite_links(doc: str, policy: LinkPolicy) -> Rewritten:
    """Replace every trackable ``href`` value in `doc` by ``<base_url>/c/<click token>``."""
    root = policy.root
    tags = tokenize(doc, _LINK_TAGS)
    edits: list[tuple[int, int, str]] = []
    out = Rewritten(doc)
    number = policy.first_link
    first_tag_start: int | None = None
    first_url = ""
    for tag in tags:
        if tag.is_end or tag.name not in ("a", "area"):
            continue
        href = tag.get("href")
        if href is None or href.value_start == href.value_end:
            continue
        if number > MAX_LINKS:
            break
        url = clean_url(doc[href.value_start:href.value_end])
        if _skipped(url, tag.get("data-notrack") is not None, policy):
            continue
        token = policy.signer.click_token(policy.copy_id, number, url)
        edits.append((href.value_start, href.value_end, _attr_escape(f"{root}/c/{token}")))
        out.links[number] = url
        if first_tag_start is None:
            first_tag_start, first_url = tag.start, url
        number += 1
    if not edits:
        return out
    if policy.honeypot and first_tag_start is not None:
        at = body_start(tags)
        if at is None or at > first_tag_start:
            at = first_tag_start
        token = policy.signer.make("honeypot", policy.copy_id, 0, first_url)
        edits.append((at, at, honeypot_markup(f"{root}/c/{token}")))
        edits.sort(key=lambda e: (e[0], e[1]))
        out.honeypot = True
    pieces: list[str] = []
    pos = 0
    at = insertion_point(doc, tags)  # edits change no tag boundary: it moves by their growth
    shift = 0
    for start, end, new in edits:
        pieces.append(doc[pos:start])
        pieces.append(new)
        pos = end
        if end <= at:
            shift += len(new) - (end - start)
    pieces.append(doc[pos:])
    out.text = "".join(pieces)
    out.insertion_point = at + shift
    return out
