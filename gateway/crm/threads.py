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
from datetime import datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from gateway.crm.models import addresses_table, messages_table, sort_at
from gateway.crm.sql import CHUNK, chunks, utc
from gateway.records import NewMessage, clean_text, message_id_key, subject_key

#: A reply without References / In-Reply-To joins a thread by subject only this recent.
SUBJECT_THREAD_WINDOW = timedelta(days=30)


async def assign_threads(conn: AsyncConnection, items: Sequence[NewMessage]) -> dict[str, str]:
    """thread_id per dedupe key of `items` (one query for all references, one for all
    subject fallbacks of the batch)."""
    refs = {message_id_key(r) for m in items for r in [*m.references, m.in_reply_to or ""]}
    refs.discard("")
    known: dict[str, str] = {}
    for chunk in chunks(sorted(f"mid:{r}" for r in refs)):
        rows = await conn.execute(sa.select(messages_table.c.dedupe_key, messages_table.c.thread_id)
                                  .where(messages_table.c.dedupe_key.in_(chunk)))
        known.update({k[4:]: t for k, t in rows.all() if t})
    out: dict[str, str] = {}
    batch_threads: dict[str, str] = {}
    # step 3 reads only rows stored before this batch, so one query answers every message
    by_subject = await threads_by_subject(conn, [
        (m, skey) for m in items if not _chain(m)
        for skey, is_reply in [subject_key(m.subject)] if is_reply and skey])
    for m in items:
        key = m.dedupe_key
        chain = _chain(m)
        thread = next((known.get(r) or batch_threads.get(r) for r in chain
                       if known.get(r) or batch_threads.get(r)), None)
        if thread is None and chain:
            thread = chain[0]
        if thread is None:
            skey, is_reply = subject_key(m.subject)
            if is_reply and skey:
                thread = by_subject.get(id(m))
        if thread is None:
            thread = message_id_key(m.message_id) or key
        out[key] = clean_text(thread)
        mid = message_id_key(m.message_id)
        if mid:
            batch_threads[mid] = out[key]
    return out


def _chain(m: NewMessage) -> list[str]:
    chain = [message_id_key(r) for r in [*m.references, m.in_reply_to or ""]]
    return [r for r in chain if r]


def _people(m: NewMessage) -> set[str]:
    return {a.strip().lower() for a in [m.from_addr, *m.to_addrs, *m.cc_addrs] if a}


def _since(m: NewMessage) -> datetime:
    return utc(m.date or m.sources[0].at) - SUBJECT_THREAD_WINDOW


async def threads_by_subject(conn: AsyncConnection,
                             wanted: Sequence[tuple[NewMessage, str]]) -> dict[int, str | None]:
    """:func:`thread_by_subject` for each (message, subject key), by ``id(message)``, in one
    query: the rows of every key and participant since the earliest window, the newest
    (then the highest id) that fits each message picked here. A batch whose keys and
    participants do not fit one statement's parameters asks per message."""
    wanted = [(m, k) for m, k in wanted if _people(m)]
    if not wanted:
        return {}
    keys = sorted({k for _, k in wanted})
    people = sorted(set().union(*(_people(m) for m, _ in wanted)))
    if len(keys) + len(people) > CHUNK:
        return {id(m): await thread_by_subject(conn, m, k) for m, k in wanted}
    at = sort_at.label("at")
    q = (sa.select(messages_table.c.id, messages_table.c.thread_id, messages_table.c.subject_key,
                   at, addresses_table.c.address)
         .join(addresses_table, addresses_table.c.message_pk == messages_table.c.id)
         .where(messages_table.c.subject_key.in_(keys),
                sort_at >= min(_since(m) for m, _ in wanted),
                addresses_table.c.address.in_(people)))
    rows: dict[str, list[tuple[datetime, int, str | None, str]]] = {}
    for r in (await conn.execute(q)).all():
        rows.setdefault(r.subject_key, []).append((utc(r.at), r.id, r.thread_id, r.address))
    out: dict[int, str | None] = {}
    for m, k in wanted:
        since, mine = _since(m), _people(m)
        fits = [(t, pk, thread) for t, pk, thread, addr in rows.get(k, ())
                if t >= since and addr in mine]
        out[id(m)] = max(fits, key=lambda f: (f[0], f[1]))[2] if fits else None
    return out


async def thread_by_subject(conn: AsyncConnection, m: NewMessage, skey: str) -> str | None:
    """The newest recent thread with subject key `skey` that shares a participant with `m`."""
    people = _people(m)
    if not people:
        return None
    since = _since(m)
    q = (sa.select(messages_table.c.thread_id).where(
        messages_table.c.subject_key == skey, sort_at >= utc(since),
        messages_table.c.id.in_(sa.select(addresses_table.c.message_pk)
                                .where(addresses_table.c.address.in_(sorted(people)))))
         .order_by(sort_at.desc()).limit(1))
    return (await conn.execute(q)).scalar()
