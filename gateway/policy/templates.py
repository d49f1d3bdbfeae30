"""Signature and disclaimer templates: find the `.html`/`.txt` variants, check placeholders, render.

A policy names a template by a path relative to the policies directory:

- `templates/sales.html`: the HTML variant is that file; `templates/sales.txt`, if it
  exists, is the text variant.
- `templates/legal.txt`: the text variant is that file; `templates/legal.html`, if it
  exists, is the HTML variant.
- `templates/sales` (no suffix): `sales.html` and/or `sales.txt`; at least one must exist.

HTML parts get the HTML variant, text parts the text variant. When a template has only
one variant the other is derived from it: text becomes HTML by escaping it and turning
line breaks into `<br>`; HTML becomes text by dropping tags and decoding entities.

Placeholders are `{user.name}`, `{user.title}`, `{user.phone}`, `{user.email}` (the
SMTP AUTH login) and `{company.name}` (config `company.name`). Any `{word}` or
`{word.word}` (spaces inside the braces allowed) is a placeholder, and one not in that
list is a validation error naming the template file and line; other braces (CSS
`p {margin: 0}`) are left alone. Values are HTML-escaped in the HTML variant. Mail
without a user (a trusted network) renders the `user.*` placeholders empty. A file's
trailing line breaks are dropped.
"""

from __future__ import annotations

import html
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

from gateway.config import Company, User
from gateway.errors import Problem

PLACEHOLDERS = ("user.name", "user.title", "user.phone", "user.email", "company.name")
MAX_TEMPLATE_SIZE = 256 * 1024
_PLACEHOLDER_RE = re.compile(r"\{\s*([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)\s*\}")


def placeholder_values(user: User | None, company: Company) -> dict[str, str]:
    return {
        "user.name": user.name if user else "",
        "user.title": user.title if user else "",
        "user.phone": user.phone if user else "",
        "user.email": user.email if user else "",
        "company.name": company.name,
    }


def render_template(text: str, user: User | None, company: Company, *, html_escape: bool = False
                    ) -> str:
    """Replace the known placeholders in `text` (HTML-escaped when `html_escape`).

    Unknown placeholders are left as written (validation rejects them in template files).
    """
    values = placeholder_values(user, company)
    if html_escape:
        values = {k: html.escape(v, quote=True) for k, v in values.items()}

    def sub(m: re.Match[str]) -> str:
        return values.get(m.group(1), m.group(0))

    return _PLACEHOLDER_RE.sub(sub, text)


def text_to_html(text: str) -> str:
    """A text variant as HTML: escaped, line breaks as `<br>`."""
    lines = html.escape(text, quote=False).replace("\r\n", "\n").rstrip("\n").split("\n")
    return "<br>\n".join(lines)


class _TextExtractor(HTMLParser):
    _BREAKS = frozenset({"br", "p", "div", "tr", "li", "h1", "h2", "h3", "h4", "h5", "h6",
                         "table", "blockquote"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.out: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in ("style", "script", "head", "title"):
            self._skip += 1
        elif tag in self._BREAKS:
            self.out.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in ("style", "script", "head", "title"):
            self._skip = max(0, self._skip - 1)
        elif tag in self._BREAKS and tag != "br":
            self.out.append("\n")

    def handle_data(self, data: str) -> None:
        if not self._skip:
            self.out.append(re.sub(r"\s+", " ", data))


def html_to_text(markup: str) -> str:
    """An HTML variant as plain text: tags dropped, entities decoded, blank runs squeezed."""
    p = _TextExtractor()
    p.feed(markup)
    p.close()
    lines = [ln.strip() for ln in "".join(p.out).split("\n")]
    text = "\n".join(lines)
    return re.sub(r"\n{3,}", "\n\n", text).strip("\n")


@dataclass(frozen=True)
class Template:
    """A signature or disclaimer with its HTML and/or text variant (at least one)."""

    name: str                      # as written in the policy, e.g. "templates/sales.html"
    html: str | None
    text: str | None
    html_path: Path | None = None
    text_path: Path | None = None
    _renders: dict[tuple[str, ...], str] = field(
        default_factory=dict, repr=False, compare=False, hash=False)

    def _cached(self, kind: str, user: User | None, company: Company,
                make: Callable[[], str]) -> str:
        key = (kind, *placeholder_values(user, company).values())
        out = self._renders.get(key)
        if out is None:
            if len(self._renders) > 4096:
                self._renders.clear()
            out = self._renders[key] = make()
        return out

    def render_html(self, user: User | None, company: Company) -> str:
        """The HTML to insert into `text/html` parts (values escaped)."""
        if self.html is not None:
            markup = self.html
            return self._cached("html", user, company,
                                lambda: render_template(markup, user, company, html_escape=True))
        text = self.text or ""
        return self._cached("html", user, company,
                            lambda: text_to_html(render_template(text, user, company)))

    def render_text(self, user: User | None, company: Company) -> str:
        """The text to insert into `text/plain` parts."""
        if self.text is not None:
            text = self.text
            return self._cached("text", user, company,
                                lambda: render_template(text, user, company))
        markup = self.html or ""
        return self._cached("text", user, company, lambda: html_to_text(
            render_template(markup, user, company, html_escape=True)))

    @property
    def files(self) -> list[Path]:
        return [p for p in (self.html_path, self.text_path) if p is not None]

    def describe(self) -> str:
        """`templates/sales.html (+ .txt)` for explain output."""
        both = self.html is not None and self.text is not None
        if not both:
            return self.name
        other = ".txt" if self.name.endswith(".html") else ".html"
        return f"{self.name} (+ {other})" if self.name.endswith((".html", ".txt")) else \
            f"{self.name} (.html + .txt)"


def check_placeholders(path: Path, text: str) -> list[Problem]:
    """Every `{placeholder}` in `text` that is not in PLACEHOLDERS, with its line."""
    problems = []
    for m in _PLACEHOLDER_RE.finditer(text):
        if m.group(1) not in PLACEHOLDERS:
            line = text.count("\n", 0, m.start()) + 1
            allowed = ", ".join("{" + p + "}" for p in PLACEHOLDERS)
            problems.append(Problem(str(path), line, m.group(0),
                                    f"unknown placeholder; templates may use {allowed}"))
    return problems


def _read(path: Path) -> tuple[str | None, list[Problem]]:
    try:
        size = path.stat().st_size
        if size > MAX_TEMPLATE_SIZE:
            return None, [Problem(str(path), None, "", f"template is {size} bytes; "
                                  f"the limit is {MAX_TEMPLATE_SIZE}")]
        text = path.read_bytes().decode("utf-8-sig").rstrip("\r\n")
    except UnicodeDecodeError as exc:
        return None, [Problem(str(path), None, "", f"template is not UTF-8: {exc.reason}")]
    except OSError as exc:
        return None, [Problem(str(path), None, "", f"cannot read: {exc.strerror or exc}")]
    return text, check_placeholders(path, text)


def resolve_template(name: str, base: Path) -> tuple[Path | None, Path | None, str | None]:
    """(html path, text path, error) for a template name; paths that do not exist are None."""
    p = Path(name).expanduser()
    if not p.is_absolute():
        p = base / p
    suffix = p.suffix
    if suffix not in ("", ".html", ".txt"):
        return None, None, (f"{name}: a template is a .html or .txt file, or a name without "
                            "suffix for name.html and name.txt")
    stem = p.with_suffix("") if suffix else p
    html_p = stem.with_name(stem.name + ".html")
    text_p = stem.with_name(stem.name + ".txt")
    if suffix and not p.is_file():
        return None, None, f"template {name} not found ({p})"
    found_html = html_p if html_p.is_file() else None
    found_text = text_p if text_p.is_file() else None
    if found_html is None and found_text is None:
        return None, None, f"template {name} not found (neither {html_p} nor {text_p})"
    return found_html, found_text, None


def load_template(name: str, base: Path) -> tuple[Template | None, str | None, list[Problem]]:
    """Load a template: (template, error about the name itself, problems inside its files)."""
    html_p, text_p, error = resolve_template(name, base)
    if error is not None:
        return None, error, []
    problems: list[Problem] = []
    html_t = text_t = None
    if html_p is not None:
        html_t, ps = _read(html_p)
        problems += ps
    if text_p is not None:
        text_t, ps = _read(text_p)
        problems += ps
    if problems:
        return None, None, problems
    return Template(name, html_t, text_t, html_p, text_p), None, []
