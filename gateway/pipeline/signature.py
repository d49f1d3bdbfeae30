"""Append a rendered signature or disclaimer to one body part, once.

Input is text that the policy's ``render_template`` has already filled in
(``{user.*}``, ``{company.name}``): an HTML variant, a plain-text variant or both. A
missing variant is derived from the other (HTML -> text by dropping tags; text ->
HTML by escaping and turning line breaks into ``<br>``).

Where it goes:

- text/plain: at the end of the part. A signature is preceded by the usual ``-- ``
  separator line; a disclaimer by a blank line. Line breaks follow the message's.
- text/html: before the last ``</body>`` (else ``</html>``, else at the end), wrapped
  in ``<div data-mailgw-signature="ID">`` / ``<div data-mailgw-disclaimer="ID">``.
  The open pixel, added later, comes after it.

"Added once": the block is not added to a part that already carries it, so a reply
quoting a message that got it does not get a second copy. A part carries a block when

1. (HTML) it contains the marker attribute with the block's ID — the first 12 hex
   digits of SHA-256 over the block's rendered HTML, so another user's signature
   does not count — or
2. the block's visible text (of its HTML variant in an HTML part, of its text
   variant in a plain-text part), normalised, occurs in the part's visible text,
   normalised. Normalising drops tags, script/style/title content and comments (for
   HTML), resolves character references, strips quote markers (``>`` at the start
   of a line), collapses all whitespace to one space and case-folds. This catches
   quoted copies whose markup a mail client rewrote (Gmail and Outlook drop
   ``data-`` attributes when quoting) and a signature the user's own client added.
"""

from __future__ import annotations

import hashlib
import html
import re
from dataclasses import dataclass
from typing import Literal

from gateway.mail.text import html_to_text
from gateway.pipeline.htmltok import insertion_point

Kind = Literal["signature", "disclaimer"]
_QUOTE_RE = re.compile(r"^[ \t]*(?:>[ \t]?)+", re.M)
_WS_RE = re.compile(r"\s+")
_NL_RE = re.compile(r"\r\n|\r|\n")


@dataclass(frozen=True)
class Block:
    """A rendered signature or disclaimer."""

    kind: Kind
    html: str | None = None
    text: str | None = None

    @property
    def empty(self) -> bool:
        return not ((self.html or "").strip() or (self.text or "").strip())

    def html_variant(self) -> str:
        if self.html is not None:
            return self.html
        return "<br>".join(html.escape(line, quote=False) for line in _NL_RE.split(self.text or ""))

    def text_variant(self) -> str:
        if self.text is not None:
            return self.text
        return html_to_text(self.html or "").strip("\r\n")

    @property
    def block_id(self) -> str:
        return hashlib.sha256(self.html_variant().encode("utf-8")).hexdigest()[:12]

    @property
    def marker(self) -> str:
        return f'data-mailgw-{self.kind}="{self.block_id}"'


def _norm(text: str) -> str:
    return _WS_RE.sub(" ", _QUOTE_RE.sub("", text)).strip().casefold()


def carries(doc: str, is_html: bool, block: Block) -> bool:
    """Whether the part already carries the block (see the module docstring)."""
    if is_html and block.marker in doc:
        return True
    want = _norm(html_to_text(block.html_variant()) if is_html else block.text_variant())
    if not want:
        return True
    have = _norm(html_to_text(doc) if is_html else doc)
    return want in have


def add_to_text(doc: str, block: Block, nl: str) -> str | None:
    """`doc` (text/plain) with the block appended, or None when it already carries it."""
    if block.empty or carries(doc, False, block):
        return None
    text = nl.join(_NL_RE.split(block.text_variant().strip("\r\n")))
    # keep the part's own ending: a trailing line break only if it had one
    ends = doc.endswith(("\n", "\r"))
    out = doc if not doc or ends else doc + nl
    end = nl if ends else ""
    if block.kind == "signature":
        return f"{out}-- {nl}{text}{end}"
    return f"{out}{nl}{text}{end}"


def add_to_html(doc: str, block: Block, nl: str) -> str | None:
    """`doc` (text/html) with the block inserted before the body's end, or None when it
    already carries it."""
    if block.empty or carries(doc, True, block):
        return None
    at = insertion_point(doc)
    inner = nl.join(_NL_RE.split(block.html_variant()))
    div = f"<div {block.marker}>{inner}</div>"
    return doc[:at] + div + doc[at:]
