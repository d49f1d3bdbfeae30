"""Run the outbound MIME stages on one recipient's copy: signature, disclaimer, links, pixel.

Every stage has one signature, ``Stage = Callable[[MimeTree, CopyContext, StageReport],
bool]``: it edits the body parts of the parsed tree in place and says whether it
changed anything. `transform` runs `STAGES` in this fixed order on one copy:

1. signature  — appended to the last text/plain and the last text/html body part;
2. disclaimer — after the signature;
3. links      — ``href`` of ``<a>``/``<area>`` in text/html body parts -> ``/c/<token>``
                (links in the signature and disclaimer are tracked too), plus one
                hidden honeypot link;
4. pixel      — one ``/o/<token>`` image per text/html body part, after everything else.

DKIM is not one of these: it signs what `transform` returns, so it is always last.

Transparency: when the settings ask for nothing, the message is not even parsed; when
no stage changes anything, `Transformed.data` *is* the input object. Headers are
kept as written; only a re-encoded part's Content-Transfer-Encoding (and, for a
text/plain part that cannot hold the signature's characters, its charset) changes,
and each such change is listed in `StageReport.notes`. A body part that cannot be
decoded (unknown charset or transfer encoding, invalid bytes) is left as it is and
listed in `StageReport.skipped`.

The work is CPU-bound (tens to hundreds of microseconds per copy, see
``bench/stages.py``): call it off the event loop for large messages.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from gateway.pipeline.links import LinkPolicy, list_unsubscribe_urls, rewrite_links
from gateway.pipeline.mime import Entity, MimeError, MimeTree
from gateway.pipeline.pixel import insert_pixel
from gateway.pipeline.signature import Block, add_to_html, add_to_text
from gateway.tracking.tokens import TokenSigner


@dataclass(frozen=True)
class StageSettings:
    """The policy's answer for one copy (already resolved; templates already rendered)."""

    track_opens: bool = False
    track_clicks: bool = False
    skip_links: tuple[str, ...] = ()
    signature_html: str | None = None
    signature_text: str | None = None
    disclaimer_html: str | None = None
    disclaimer_text: str | None = None
    honeypot: bool = True             # add the hidden honeypot link when clicks are tracked

    @property
    def signature(self) -> Block:
        return Block("signature", self.signature_html, self.signature_text)

    @property
    def disclaimer(self) -> Block:
        return Block("disclaimer", self.disclaimer_html, self.disclaimer_text)

    @property
    def tracking(self) -> bool:
        return self.track_opens or self.track_clicks

    @property
    def active(self) -> bool:
        """Whether any stage could change a message with these settings."""
        return self.tracking or not self.signature.empty or not self.disclaimer.empty


@dataclass(frozen=True)
class CopyContext:
    """One recipient's copy: who it is for, its spool queue id, and what to do to it."""

    recipient: str
    copy_id: str                      # spool queue id of this copy (gateway.spool.new_queue_id())
    settings: StageSettings
    base_url: str = ""                # listeners.tracking.base_url; needed when tracking
    signer: TokenSigner | None = None  # needed when tracking

    def __post_init__(self) -> None:
        if self.settings.tracking:
            if self.signer is None:
                raise ValueError("tracking is on but no token signer was given")
            self.signer.open_token(self.copy_id)      # ValueError now if it is not a queue id
            try:
                parts = urlsplit(self.base_url)
            except ValueError:
                parts = urlsplit("")
            if parts.scheme not in ("http", "https") or not parts.netloc or not self.base_url.isascii() \
                    or any(c in self.base_url for c in "\"'<> \t\r\n?#"):
                raise ValueError(f"tracking base_url must be an ASCII http(s) URL: {self.base_url!r}")

    @property
    def root(self) -> str:
        return self.base_url.rstrip("/")


@dataclass
class StageReport:
    """What the stages did to one copy, for the log and the store."""

    stages: list[str] = field(default_factory=list)     # names of the stages that changed it
    links: dict[int, str] = field(default_factory=dict)  # link number -> original URL
    honeypot: bool = False
    pixels: int = 0
    signature_parts: int = 0
    disclaimer_parts: int = 0
    skipped: list[str] = field(default_factory=list)     # body parts that could not be decoded
    notes: list[str] = field(default_factory=list)       # re-encodings and charset changes


@dataclass(frozen=True)
class Transformed:
    """One copy's bytes (the input object itself when nothing changed) and the report."""

    data: bytes
    report: StageReport

    @property
    def changed(self) -> bool:
        return bool(self.report.stages)


Stage = Callable[[MimeTree, CopyContext, StageReport], bool]


def _text_of(part: Entity, report: StageReport) -> str | None:
    try:
        return part.decoded()
    except MimeError as exc:
        msg = str(exc)
        if msg not in report.skipped:
            report.skipped.append(msg)
        return None


def _block_stage(tree: MimeTree, block: Block, report: StageReport) -> int:
    if block.empty:
        return 0
    parts = tree.body_parts()
    last = {p.content_type: p for p in parts}   # the last of each type
    nl = tree.nl.decode()
    done = 0
    for part in parts:
        if last[part.content_type] is not part:
            continue
        text = _text_of(part, report)
        if text is None:
            continue
        new = add_to_html(text, block, nl) if part.content_type == "text/html" \
            else add_to_text(text, block, nl)
        if new is not None:
            part.replace_text(new)
            done += 1
    return done


def signature_stage(tree: MimeTree, ctx: CopyContext, report: StageReport) -> bool:
    report.signature_parts = _block_stage(tree, ctx.settings.signature, report)
    return report.signature_parts > 0


def disclaimer_stage(tree: MimeTree, ctx: CopyContext, report: StageReport) -> bool:
    report.disclaimer_parts = _block_stage(tree, ctx.settings.disclaimer, report)
    return report.disclaimer_parts > 0


def links_stage(tree: MimeTree, ctx: CopyContext, report: StageReport) -> bool:
    s = ctx.settings
    if not s.track_clicks or ctx.signer is None:
        return False
    unsubscribe = list_unsubscribe_urls(tree.header_values("List-Unsubscribe"))
    changed = False
    number = 1
    for part in tree.body_parts():
        if part.content_type != "text/html":
            continue
        text = _text_of(part, report)
        if text is None:
            continue
        policy = LinkPolicy(base_url=ctx.root, copy_id=ctx.copy_id, signer=ctx.signer,
                            skip_links=s.skip_links, unsubscribe=unsubscribe,
                            honeypot=s.honeypot and not report.honeypot, first_link=number)
        result = rewrite_links(text, policy)
        if result.links:
            part.replace_text(result.text)
            if result.insertion_point is not None:
                part.pixel_at = (result.text, result.insertion_point)
            report.links.update(result.links)
            report.honeypot = report.honeypot or result.honeypot
            number = max(result.links) + 1
            changed = True
    return changed


def pixel_stage(tree: MimeTree, ctx: CopyContext, report: StageReport) -> bool:
    if not ctx.settings.track_opens or ctx.signer is None:
        return False
    url = f"{ctx.root}/o/{ctx.signer.open_token(ctx.copy_id)}"
    for part in tree.body_parts():
        if part.content_type != "text/html":
            continue
        text = _text_of(part, report)
        if text is None:
            continue
        hint = part.pixel_at
        part.replace_text(insert_pixel(text, url, hint[1] if hint and hint[0] is text else None))
        report.pixels += 1
    return report.pixels > 0


#: The fixed order; DKIM signs the result of all of them, outside this list.
STAGES: tuple[tuple[str, Stage], ...] = (
    ("signature", signature_stage),
    ("disclaimer", disclaimer_stage),
    ("links", links_stage),
    ("pixel", pixel_stage),
)


def transform(raw: bytes, ctx: CopyContext) -> Transformed:
    """One recipient's copy of `raw` after every stage; `data is raw` when nothing changed."""
    report = StageReport()
    if not ctx.settings.active:
        return Transformed(raw, report)
    tree = MimeTree(raw)
    for name, stage in STAGES:
        if stage(tree, ctx, report):
            report.stages.append(name)
    if not report.stages:
        return Transformed(raw, report)
    data = tree.serialize()
    report.notes.extend(tree.notes)        # encoding happens in serialize()
    return Transformed(data, report)

