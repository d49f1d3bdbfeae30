"""Threads: which conversation a new message joins, found inside the transaction that stores it.

A message's ``thread_id`` is, in this order:

1. the thread of a message it references (References, In-Reply-To), stored earlier or
   earlier in the same batch;
2. else its first reference (a reply to mail the store never saw still groups with
   the other replies to it);
3. else, for a reply without references (its subject has a reply prefix), the newest
   thread within :data:`SUBJECT_THREAD_WINDOW` with the same subject key and a shared
   participant (From, To or Cc);
4. else its own Message-ID key, or its dedupe key when it has no Message-ID.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from gateway.crm.models import addresses_table, messages_table, sort_at
from gateway.crm.sql import chunks, utc
from gateway.records import NewMessage, clean_text, message_id_key, subject_key

#: A reply without References / In-Reply-To joins a thread by subject only this recent.
SUBJECT_THREAD_WINDOW = timedelta(days=30)


async def assign_threads(conn: AsyncConnection, items: Sequence[NewMessage]) -> dict[str, str]:
    """thread_id per dedupe key of `items` (one query for all references, one per subject
    fallback)."""
    refs = {message_id_key(r) for m in items for r in [*m.references, m.in_reply_to or ""]}
    refs.discard("")
    known: dict[str, str] = {}
    for chunk in chunks(sorted(f"mid:{r}" for r in refs)):
        rows = await conn.execute(sa.select(messages_table.c.dedupe_key, messages_table.c.thread_id)
                                  .where(messages_table.c.dedupe_key.in_(chunk)))
        known.update({k[4:]: t for k, t in rows.all() if t})
    out: dict[str, str] = {}
    batch_threads: dict[str, str] = {}
    for m in items:
        key = m.dedupe_key
        chain = [message_id_key(r) for r in [*m.references, m.in_reply_to or ""]]
        chain = [r for r in chain if r]
        thread = next((known.get(r) or batch_threads.get(r) for r in chain
                       if known.get(r) or batch_threads.get(r)), None)
        if thread is None and chain:
            thread = chain[0]
        if thread is None:
            skey, is_reply = subject_key(m.subject)
            if is_reply and skey:
                thread = await thread_by_subject(conn, m, skey)
        if thread is None:
            thread = message_id_key(m.message_id) or key
        out[key] = clean_text(thread)
        mid = message_id_key(m.message_id)
        if mid:
            batch_threads[mid] = out[key]
    return out


async def thread_by_subject(conn: AsyncConnection, m: NewMessage, skey: str) -> str | None:
    """The newest recent thread with subject key `skey` that shares a participant with `m`."""
    people = {a.strip().lower() for a in [m.from_addr, *m.to_addrs, *m.cc_addrs] if a}
    if not people:
        return None
    since = (m.date or m.sources[0].at) - SUBJECT_THREAD_WINDOW
    q = (sa.select(messages_table.c.thread_id).where(
        messages_table.c.subject_key == skey, sort_at >= utc(since),
        messages_table.c.id.in_(sa.select(addresses_table.c.message_pk)
                                .where(addresses_table.c.address.in_(sorted(people)))))
         .order_by(sort_at.desc()).limit(1))
    return (await conn.execute(q)).scalar()
