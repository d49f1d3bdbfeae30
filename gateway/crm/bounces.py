"""Reports that come later become events on their message: bounced, delayed, read_receipt, complained.

A delivery report, read receipt or feedback report (:mod:`gateway.mail.reports`) that
comes in through a connected mailbox, the ingest address or the VERP bounce address is
never stored as a conversation. :func:`apply_reports` runs inside the store's batch
transaction and, for each report:

1. **finds the message**: a relay copy whose queue id the report names (the VERP
   address it was sent to, ``X-Mailgw-Queue-ID``, the gateway's own ``Received`` line
   in the returned headers, ``Original-Envelope-Id``), else the outbound message with
   the returned Message-ID;
2. **finds the recipient** of each report item among that message's recipients (To,
   Cc, the relay's envelope recipients): the ``Final-Recipient``, else the
   ``Original-Recipient``, else the recipient of the per-recipient copy the queue id
   names, else the message's only recipient. An item naming none of them is skipped:
   a report can only speak for mail the gateway sent, to whom it sent it;
3. **records the event**: ``failed`` -> ``bounced`` (details: ``status``,
   ``diagnostic``, ``remote_mta``, ``hard``, ``reporting_mta``, ``report`` (the
   format), ``report_message_id``), ``delayed`` -> ``delayed``; ``delivered``,
   ``relayed`` and ``expanded`` items record nothing; a read receipt with disposition
   ``displayed`` -> ``read_receipt`` (other dispositions, such as ``deleted``, record
   nothing); a feedback report -> ``complained`` (``feedback_type``). Each event is
   keyed by the report and recipient, so the same report seen in the mailbox and at the
   ingest address records once; a ``bounced`` event is not added for a recipient that
   has one already (the scheduler's own, or the gateway's DSN read back from the
   sender's INBOX).

The caller routes the inserted rows through the suppression list and the webhooks.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from gateway.crm.models import addresses_table, events_table, messages_table, sources_table
from gateway.crm.sql import chunks, clean_json, clean_opt_text, insert
from gateway.mail.reports import Report, ReportItem
from gateway.records import NewMessage, clean_text

#: report item action -> event type (actions not listed record nothing)
EVENT_OF_ACTION: dict[str, str] = {"failed": "bounced", "delayed": "delayed"}


@dataclass(frozen=True)
class Applied:
    """What one report did: the message it is about (None: none matched), the rows added."""

    message_pk: int | None
    rows: tuple[dict[str, Any], ...]
    skipped: tuple[str, ...]          # why items recorded nothing


def _key(m: NewMessage, report: Report, event: str, rcpt: str) -> str:
    """One key per report and recipient: its Message-ID (else its content) names the report."""
    ident = report.message_id_key or m.dedupe_key
    digest = hashlib.sha256(f"{ident}\x00{rcpt}\x00{event}".encode("utf-8", "replace")).hexdigest()
    return f"report:{digest[:40]}"


async def _copies(conn: AsyncConnection, refs: Sequence[str]) -> dict[str, tuple[int, str]]:
    """queue id -> (message pk, the copy's recipient or "") for relay copies among `refs`."""
    out: dict[str, tuple[int, str]] = {}
    for chunk in chunks(sorted(set(refs))):
        rows = await conn.execute(
            sa.select(sources_table.c.ref, sources_table.c.message_pk, sources_table.c.recipient)
            .where(sources_table.c.source == "relay", sources_table.c.ref.in_(chunk)))
        for ref, pk, rcpt in rows.all():
            out[ref] = (pk, (rcpt or "").lower())
    return out


async def outbound_by_message_id(conn: AsyncConnection, keys: Sequence[str]) -> dict[str, int]:
    """Message-ID key -> pk of the outbound message with that Message-ID (replies use it too)."""
    out: dict[str, int] = {}
    wanted = sorted({f"mid:{k}" for k in keys if k})
    for chunk in chunks(wanted):
        rows = await conn.execute(sa.select(messages_table.c.dedupe_key, messages_table.c.id)
                                  .where(messages_table.c.dedupe_key.in_(chunk),
                                         messages_table.c.direction == "outbound"))
        out.update({k[4:]: pk for k, pk in rows.all()})
    return out


async def recipients_of(conn: AsyncConnection, pks: Sequence[int]) -> dict[int, set[str]]:
    """The recipients of these messages: To and Cc addresses, and ``queued`` envelope recipients."""
    out: dict[int, set[str]] = {pk: set() for pk in pks}
    for chunk in chunks(sorted(set(pks))):
        rows = await conn.execute(sa.select(addresses_table.c.message_pk, addresses_table.c.address)
                                  .where(addresses_table.c.message_pk.in_(chunk),
                                         addresses_table.c.role.in_(("to", "cc"))))
        for pk, addr in rows.all():
            out[pk].add(addr.lower())
        rows = await conn.execute(sa.select(events_table.c.message_pk, events_table.c.recipient)
                                  .where(events_table.c.message_pk.in_(chunk),
                                         events_table.c.type == "queued"))
        for pk, addr in rows.all():
            out[pk].add(clean_text(addr).strip().lower())
    return out


async def _bounced_already(conn: AsyncConnection, pks: Sequence[int]) -> set[tuple[int, str]]:
    out: set[tuple[int, str]] = set()
    for chunk in chunks(sorted(set(pks))):
        rows = await conn.execute(sa.select(events_table.c.message_pk, events_table.c.recipient)
                                  .where(events_table.c.message_pk.in_(chunk),
                                         events_table.c.type == "bounced"))
        out.update((pk, (r or "").lower()) for pk, r in rows.all())
    return out


def _recipient(item: ReportItem, known: set[str], copy_rcpt: str) -> str | None:
    for candidate in (item.recipient, item.original_recipient or "", copy_rcpt):
        if candidate and candidate in known:
            return candidate
    if len(known) == 1:
        return next(iter(known))
    return None


def _event(report: Report, item: ReportItem) -> tuple[str, dict[str, Any]] | None:
    if report.type == "feedback":
        return "complained", {"feedback_type": report.feedback_type or "abuse"}
    if report.type == "read_receipt":
        if report.disposition != "displayed":
            return None
        return "read_receipt", {"disposition": report.disposition}
    event = EVENT_OF_ACTION.get(item.action)
    if event is None:
        return None
    details: dict[str, Any] = {"action": item.action, "status": item.status,
                               "diagnostic": item.diagnostic, "remote_mta": item.remote_mta}
    if event == "bounced":
        details["hard"] = item.hard
    return event, details


async def apply_reports(conn: AsyncConnection, dialect: str,
                        items: Sequence[NewMessage]) -> list[Applied]:
    """Record the events of these reports (NewMessages with ``report`` set), one
    :class:`Applied` per item, in the caller's transaction."""
    reports = [(m, m.report) for m in items if m.report is not None]
    if not reports:
        return [Applied(None, (), ()) for _ in items]
    qids: dict[int, list[str]] = {}
    for i, (m, r) in enumerate(reports):
        qids[i] = [q for q in (m.bounce_queue_id, *r.queue_ids, r.envelope_id) if q]
    copies = await _copies(conn, [q for qs in qids.values() for q in qs])
    by_mid = await outbound_by_message_id(conn, [r.message_id_key for _, r in reports])
    targets: dict[int, tuple[int, str] | None] = {}
    for i, (_, r) in enumerate(reports):
        hit = next((copies[q] for q in qids[i] if q in copies), None)
        if hit is None and r.message_id_key in by_mid:
            hit = (by_mid[r.message_id_key], "")
        targets[i] = hit
    pks = [t[0] for t in targets.values() if t is not None]
    known = await recipients_of(conn, pks)
    bounced = await _bounced_already(conn, pks)

    out: dict[int, Applied] = {}
    stmt = (insert(dialect, events_table)
            .on_conflict_do_nothing(index_elements=[events_table.c.key])
            .returning(events_table.c.key))
    for i, (m, r) in enumerate(reports):
        target = targets[i]
        if target is None:
            out[id(m)] = Applied(None, (), ("no message of the gateway matches",))
            continue
        pk, copy_rcpt = target
        at = m.date or m.sources[0].at
        rows: list[dict[str, Any]] = []
        skipped: list[str] = []
        for item in r.items:
            ev = _event(r, item)
            if ev is None:
                skipped.append(f"{item.recipient}: {r.type} {item.action} "
                               f"{r.disposition or ''}".strip() + " records nothing")
                continue
            rcpt = _recipient(item, known.get(pk, set()), copy_rcpt)
            if rcpt is None:
                skipped.append(f"{item.recipient}: not a recipient of message {pk}")
                continue
            event, details = ev
            if event == "bounced" and (pk, rcpt) in bounced:
                skipped.append(f"{rcpt}: bounced already")
                continue
            details.update({"reporting_mta": r.reporting_mta, "report": r.format,
                            "report_message_id": m.message_id or None, "source": "report"})
            rows.append({"message_pk": pk, "type": event, "at": at, "recipient": clean_text(rcpt),
                         "machine": False,
                         "details": clean_json({k: v for k, v in details.items() if v is not None}),
                         "key": clean_opt_text(_key(m, r, event, rcpt))})
            if event == "bounced":
                bounced.add((pk, rcpt))
        inserted: set[str] = set()
        if rows:
            inserted = {k for (k,) in (await conn.execute(stmt, rows)).all()}
        out[id(m)] = Applied(pk, tuple(row for row in rows if row["key"] in inserted),
                             tuple(skipped))
    return [out.get(id(m), Applied(None, (), ())) for m in items]
