"""The original bytes of a stored message and of its attachments, read back from the raw store.

What "the original bytes" are depends on the path that stored the message first (one
message seen on several paths is one row, with the bytes of the first): for the relay,
the message as accepted, after the gateway added a missing Message-ID or Date and removed
Bcc and the control headers (``X-Mailgw-*``), before any outbound stage (tracking, footer,
DKIM) and without the trace header; rebuilt from the spool after a crash, an untracked
copy as spooled (after the stages). For IMAP, the bytes fetched (``BODY[]``); for ingest,
the message ingested (for an unwrapped forward, the attached original's exact bytes, or for
an inline forward the message rebuilt from the quoted block, :mod:`gateway.mail.forward`).
Nothing is kept with ``store.raw: none``.

An attachment is addressed by its index in the message JSON's ``attachments`` list: the
raw bytes are walked again by :func:`gateway.mail.parse.attachment_data` (the parser
that made the list, with its caps), and the part found is checked against the stored
SHA-256, so a different parse can never serve another part's bytes. Reading and parsing
run in worker threads (the API allows :data:`PARSE_SLOTS` parses at a time).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import SQLAlchemyError

from gateway.crm.models import messages_table, sources_table
from gateway.crm.store import Store
from gateway.mail.parse import AttachmentData, attachment_data, parse_message

#: attachment parses the API runs at once (each holds a whole message and its MIME tree)
PARSE_SLOTS = 2


@dataclass(frozen=True)
class Original:
    """Where a stored message's raw bytes are, and what its JSON lists as attachments."""

    id: int
    digest: str | None
    """SHA-256 of the raw bytes; None when they were not kept."""
    size: int
    attachments: list[dict[str, Any]]


async def locate(store: Store, ident: str) -> Original | None:
    """The message with this store id, else with this relay or ingest queue id (as
    ``GET /api/v1/messages/{id}`` finds it); None when there is none."""
    cols = (messages_table.c.id, messages_table.c.raw_sha256, messages_table.c.size,
            messages_table.c.attachments)
    queries = []
    if ident.isascii() and ident.isdigit() and len(ident) < 19:
        queries.append(sa.select(*cols).where(messages_table.c.id == int(ident)))
    queries.append(sa.select(*cols).where(messages_table.c.id.in_(
        sa.select(sources_table.c.message_pk).where(sources_table.c.source.in_(("relay", "ingest")),
                                                    sources_table.c.ref == ident))).limit(1))
    try:
        async with store.engine.connect() as conn:
            for q in queries:
                row = (await conn.execute(q)).mappings().first()
                if row is not None:
                    return Original(id=row["id"], digest=row["raw_sha256"] or None,
                                    size=int(row["size"] or 0),
                                    attachments=list(row["attachments"] or []))
    except (SQLAlchemyError, OSError) as exc:
        raise store.error("store read failed", exc) from exc
    return None


def raw_file(store: Store, original: Original) -> Path | None:
    """The file holding the raw bytes (``store.raw: disk``), if it is there."""
    if original.digest is None or not store.raw.on_disk:
        return None
    path = store.raw.path(original.digest)
    return path if path.is_file() else None


async def read_raw(store: Store, original: Original) -> bytes | None:
    """The raw bytes (from the file or the ``raw_messages`` row); None when not kept or gone."""
    if original.digest is None:
        return None
    if store.raw.in_database:
        try:
            async with store.engine.connect() as conn:
                return await store.raw.read_row(conn, original.digest)
        except (SQLAlchemyError, OSError) as exc:
            raise store.error("store read failed", exc) from exc
    if not store.raw.on_disk:
        return None
    return await asyncio.to_thread(store.raw.read_file, original.digest)


def find_attachment(raw: bytes, index: int, sha256: str | None) -> AttachmentData | None:
    """Attachment `index` of `raw` if its SHA-256 is `sha256` (None: any), else the first
    attachment that has that digest; None when there is none. CPU work, linear in the
    size of `raw`: call it in a worker thread."""
    found = attachment_data(raw, index)
    if found is None or sha256 is None or found.attachment.sha256 == sha256:
        return found
    # listed by another version of the parser: the part with the stored digest, if any
    for n, a in enumerate(parse_message(raw).attachments):
        if a.sha256 == sha256:
            return attachment_data(raw, n)
    return None


async def read_attachment(store: Store, original: Original, index: int,
                          slots: asyncio.Semaphore | None = None) -> AttachmentData | None:
    """Attachment `index` of the message's JSON list, decoded (in a worker thread, holding
    one of `slots` while it reads and parses); None when the raw bytes are not there or
    hold no such part."""
    if not 0 <= index < len(original.attachments):
        return None
    listed = original.attachments[index]
    sha256 = listed.get("sha256") if isinstance(listed, dict) else None
    async with slots or asyncio.Semaphore(1):
        raw = await read_raw(store, original)
        if raw is None:
            return None
        return await asyncio.to_thread(find_attachment, raw, index, sha256)
