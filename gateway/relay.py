"""Turn one accepted SMTP transaction into durable queue entries (the relay's `cleanup`).

The SMTP handler calls `Relay.accept()` after DATA; it returns the queue id only
once every copy of the message is fsynced into the spool, and raises a MailError
(with its reply code) otherwise. Here the message gets a `Message-ID:` and `Date:`
when the client left them out (RFC 6409 §8) and loses its `Bcc:` field (its display
names are kept for the store's record, :func:`bcc_names`) and the CRM's
control headers (:mod:`gateway.mail.controls`: read here, refused with 554 5.6.0 when
invalid, removed before any stage so DKIM never signs them; No-Track turns tracking off
for the message, Send-At makes each remote copy wait in the queue); then the
outbound planner (:mod:`gateway.pipeline.outbound`: policies, stages, DKIM last) says
which copies to spool, and each copy gets its trace header (`Received:`, with the
copy's own queue id) on top. A message no policy changes is spooled byte for byte as
received, plus the trace header. Recipients that are the gateway's own ingest
addresses get a copy routed `ingest`: stored in the CRM by the scheduler, never
delivered. The store learns of the message (with its original bytes, before any
stage) right here, through the batching StoreWriter; at start, `record_unrecorded`
gives a message still spooled whose record a crash lost (inside the writer's batching
delay) the same record, rebuilt from its queue files, and the outcome events of its
delivery attempts again (done/ keeps a delivered entry until they are written).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any, TypeVar

import structlog

from gateway.crm.counters import SendCounts
from gateway.errors import NotFound, PermanentFailure
from gateway.ids import new_queue_id
from gateway.mail.controls import NO_CONTROLS, Controls, parse_controls, strip_controls
from gateway.mail.headers import (
    fields,
    get_header,
    make_message_id,
    split_entity,
    strip_fields,
)
from gateway.mail.parse import parse_headers
from gateway.pipeline.outbound import CopyPlan, Outbound
from gateway.records import AcceptedMessage, Copy, EventRecord, EventSink
from gateway.spool import CorruptQueueFile, Envelope, Recipient, Spool, outcome_events

#: Plan (stages, DKIM) in a worker thread above this size, or for several recipients (each
#: tracked recipient is a copy of its own: about 1 ms of stages and RSA each). One small
#: copy (about 1 ms) costs less CPU on the event loop than the thread hop and the GIL
#: hand-offs around it.
THREAD_BYTES = 64 * 1024


@dataclass
class Submission:
    """What the SMTP edge learned about one transaction."""

    mail_from: str
    rcpts: list[str]
    data: bytes
    client_ip: str | None = None
    client_helo: str | None = None
    user: str | None = None          # SMTP AUTH login, None for a trusted network
    account: str | None = None
    tls: bool = False
    esmtp: bool = True
    extra: dict[str, str] = field(default_factory=dict)


def received_header(sub: Submission, hostname: str, qid: str, now: float,
                    rcpts: list[str] | None = None) -> bytes:
    proto = "ESMTP" if sub.esmtp else "SMTP"
    if sub.esmtp and sub.tls:
        proto += "S"
    if sub.esmtp and sub.user:
        proto += "A"
    helo = (sub.client_helo or "unknown").replace("\r", "").replace("\n", "")[:200]
    date = format_datetime(datetime.fromtimestamp(now, UTC))
    line = (f"Received: from {helo} ([{sub.client_ip or 'unknown'}])\r\n"
            f"\tby {hostname} (mailgw) with {proto} id {qid}")
    rcpts = sub.rcpts if rcpts is None else rcpts
    if len(rcpts) == 1:
        line += f"\r\n\tfor <{rcpts[0]}>"
    line += f"; {date}\r\n"
    return line.encode("utf-8", "replace")


def prepare(sub: Submission, hostname: str, qid: str, now: float,
            trace: bool = True) -> tuple[bytes, str]:
    """Trace header on top (unless `trace` is false), Message-ID/Date added if missing, Bcc
    removed; body untouched. Returns the bytes and the Message-ID."""
    header, blank, body = split_entity(sub.data)
    if not header:
        raise PermanentFailure("Message has no header", code=550, status="5.6.0")
    if not blank and not header.endswith(b"\n"):
        header += b"\r\n"  # no empty line: all header, its last line ended for the bytes added
    added = received_header(sub, hostname, qid, now) if trace else b""
    message_id = get_header(header, "Message-ID")
    if not message_id:
        message_id = make_message_id(hostname)
        added += f"Message-ID: {message_id}\r\n".encode()
    if get_header(header, "Date") is None:
        date = format_datetime(datetime.fromtimestamp(now, UTC))
        added += f"Date: {date}\r\n".encode()
    if b"bcc" in header.lower():
        header = strip_fields(header, {"Bcc", "Resent-Bcc"})
    return added + header + blank + body, message_id.strip()


def bcc_names(data: bytes) -> dict[str, str]:
    """Lower-cased address -> decoded display name of the message's ``Bcc:`` field (which
    :func:`prepare` removes): what its Bcc recipients' contacts are named after."""
    header = split_entity(data)[0]
    if b"bcc" not in header.lower():
        return {}
    # only the Bcc fields are parsed here, on the event loop: a cheap linear scan finds
    # them, and the rest of the header (parsed by the store writer off the loop) is skipped
    bcc = b"".join(f.raw for f in fields(header) if f.key == b"bcc")
    if not bcc:
        return {}
    info = parse_headers(bcc)
    return {key: info.display_names[key] for a in info.bcc_addrs
            if (key := a.lower()) in info.display_names}


def take_controls(data: bytes, now: float) -> tuple[Controls, bytes, bytes | None]:
    """The message's control headers (README "Control headers") and its bytes without them.

    Raises ControlHeaderError (554 5.6.0) for a bad or repeated one: the submission is
    refused before anything is spooled. Everything after this sees the stripped bytes, so
    the fields never leave the gateway and no DKIM signature covers them. The third value
    is the header block with them (what policy `header` rules match on), None when the
    message has none."""
    header = split_entity(data)[0]
    if b"x-mailgw-" not in header.lower():
        return NO_CONTROLS, data, None
    controls = parse_controls(header, datetime.fromtimestamp(now, UTC))
    stripped = strip_controls(data)
    return controls, stripped, (header if stripped is not data else None)


class Relay:
    """Accepts submissions into the spool and tells the scheduler and the store about them."""

    def __init__(self, spool: Spool, hostname: str,
                 on_queued: Callable[[str], None] | None = None, *,
                 outbound: Callable[[], Outbound | None] | None = None,
                 events: EventSink | None = None,
                 is_ingest: Callable[[str], bool] | None = None,
                 counts: SendCounts | None = None,
                 on_accepted: Callable[[Submission, bytes, list[CopyPlan]],
                                       Awaitable[None]] | None = None,
                 log: Any = None) -> None:
        self.spool = spool
        self.hostname = hostname
        self.on_queued = on_queued
        self.outbound = outbound
        self.events = events
        self.is_ingest = is_ingest
        self.counts = counts
        self.on_accepted = on_accepted
        self.log = log or structlog.get_logger("mailgw.relay")
        self.accepted = 0

    @staticmethod
    def _plan(ob: Outbound | None, data: bytes, sub: Submission, rcpts: list[str],
              qid: str, no_track: bool = False,
              policy_header: bytes | None = None) -> list[CopyPlan]:
        if ob is None or not rcpts:
            return [CopyPlan(qid, list(rcpts), data, False, 0, "", True, False)] if rcpts else []
        return ob.plan(data, sender=sub.mail_from, recipients=rcpts, user=sub.user,
                       account=sub.account, first_id=qid, no_track=no_track,
                       policy_header=policy_header)

    async def accept(self, sub: Submission) -> str:
        now = time.time()
        qid = new_queue_id(now)
        names = bcc_names(sub.data) if self.events is not None else {}
        data, message_id = prepare(sub, self.hostname, qid, now, trace=False)
        controls, data, with_controls = take_controls(data, now)  # bad: 554 5.6.0
        send_at = controls.send_at.timestamp() if controls.send_at is not None else None
        local = [r for r in sub.rcpts if self.is_ingest is not None and self.is_ingest(r)]
        remote = [r for r in sub.rcpts if r not in local]
        ob = self.outbound() if self.outbound is not None else None  # one planner per message
        if ob is not None and ob.active and remote and (len(remote) > 1 or len(data) > THREAD_BYTES):
            plans = await asyncio.to_thread(self._plan, ob, data, sub, remote, qid,
                                            controls.no_track, with_controls)
        else:
            plans = self._plan(ob, data, sub, remote, qid, controls.no_track, with_controls)
        if local:
            plans.append(CopyPlan(qid if not plans else new_queue_id(now), local, data, False, 0,
                                  "ingest", True, False))
        files = []
        for p in plans:
            env = Envelope(
                id=p.queue_id, mail_from=sub.mail_from,
                recipients=[Recipient(addr=r) for r in p.recipients], received_at=now,
                user=sub.user, account=sub.account, client_ip=sub.client_ip,
                client_helo=sub.client_helo, message_id=message_id,
                route=p.route or None, group=qid,
                crm_store=p.store, tracked=p.tracked, links=p.links,
                template=controls.template, campaign=controls.campaign,
                # a scheduled copy waits (the scheduler defers it until then); the gateway's
                # own ingest copy is stored at once
                scheduled_for=send_at if p.route != "ingest" else None)
            trace = received_header(sub, self.hostname, p.queue_id, now, p.recipients)
            files.append((env, trace + p.data))
        # the writer owes these copies their record from before they are visible in the
        # spool: the scheduler's scan may deliver one before `_record` below has run
        expected = [env.id for env, _ in files if env.recorded] if self.events is not None else []
        expect = getattr(self.events, "expect", None) if expected else None
        if expect is not None:
            expect(expected)
        try:
            # all or nothing; SpoolError -> 452 4.3.1 (disk full) or 451 4.3.0
            await self.spool.put_all(files)
        except BaseException:
            self._unexpect(expected)
            raise
        self.accepted += 1
        # one line per spooled copy under the id the client got (`250 ... queued as <group>`):
        # per-recipient copies have their own queue ids, which the delivery lines carry
        for p in plans:
            self.log.info("queued_copy", group=qid, queue_id=p.queue_id,
                          message_id=message_id, rcpts=list(p.recipients),
                          route=p.route or None)
        # From here on the message is queued: nothing may turn the 250 into an error (the
        # client would send it again), so what follows only logs its failures.
        try:
            try:
                self._record(sub, data, message_id, plans, now, controls, names)
            except Exception:
                self._unexpect(expected)   # no record added: none is owed
                raise
            if self.counts is not None and remote and ob is not None \
                    and ob.policies.has_daily_caps:
                self.counts.add(sub.mail_from, len(remote))
            if self.on_accepted is not None:
                await self.on_accepted(sub, data, plans)
        except Exception:
            self.log.exception("after_queueing_failed", queue_id=qid)
        if self.on_queued is not None:
            for p in plans:
                self.on_queued(p.queue_id)
        return qid

    def _unexpect(self, qids: list[str]) -> None:
        unexpect = getattr(self.events, "unexpect", None) if qids else None
        if unexpect is not None:
            unexpect(qids)

    def _record(self, sub: Submission, data: bytes, message_id: str, plans: list[CopyPlan],
                now: float, controls: Controls = NO_CONTROLS,
                names: dict[str, str] | None = None) -> None:
        """Tell the store about the message (original bytes; parsed by the writer off the loop;
        `names`: the display names of the Bcc field it no longer has, :func:`bcc_names`)."""
        stored = [p for p in plans if p.store and p.route != "ingest"]
        if self.events is None or not stored:  # to the ingest address alone: ingest stores it
            return
        # addresses, subject and bodies come from the writer's parse of `raw`, off the loop
        self.events.add_accepted(AcceptedMessage(
            queue_id=stored[0].queue_id, message_id=message_id, from_addr=sub.mail_from,
            to_addrs=[], cc_addrs=[], subject="", date=None, snippet="",
            size=len(data), recipients=[r for p in stored for r in p.recipients],
            user=sub.user, account=sub.account, at=datetime.fromtimestamp(now, UTC),
            copies=[Copy(p.queue_id, p.recipients[0] if p.tracked else None, p.links)
                    for p in stored],
            client_ip=sub.client_ip, raw=data, template=controls.template,
            campaign=controls.campaign, scheduled_at=controls.send_at, bcc_names=names or {}))


# -- the spool as the journal of the relay's store records ---------------------------------
#: Spool states whose entries are accepted messages still waiting, or delivered whose
#: record or outcome events may not be written yet (corrupt/ is for a human). A message
#: does not only move forward through them: `queue retry` (deferred -> incoming) and
#: `release` (hold -> incoming) move it back, so a scan lists them all twice
#: (`_spooled_groups`) and looks an entry that moved on up again (`Spool.find`).
JOURNAL_STATES = ("incoming", "deferred", "hold", "done")


def strip_trace(data: bytes) -> bytes:
    """A spooled copy's bytes without the trace header the relay put on top of them
    (:func:`received_header`); other bytes are returned as they are."""
    if not data.startswith(b"Received: "):
        return data
    end = 0
    while True:  # the field and its continuation lines
        nl = data.find(b"\n", end)
        if nl < 0:
            return data
        end = nl + 1
        if data[end:end + 1] not in (b" ", b"\t"):
            break
    return data[end:] if b"(mailgw) with " in data[:end] else data


def accepted_from_spool(entries: list[tuple[Envelope, bytes]]) -> AcceptedMessage | None:
    """The record `Relay._record` makes of a message, rebuilt from its spooled copies.

    The copies of one message share `Envelope.group`; the record is named by its first
    copy still spooled and carries every spooled recipient. Its bytes are an untracked
    copy's (a per-recipient copy's otherwise) without the trace header: the message after
    the policies' stages, where the relay's own record had the bytes from before them.
    None when the relay records none of the copies."""
    stored = sorted(((e, d) for e, d in entries if e.recorded),
                    key=lambda x: (x[0].id != (x[0].group or x[0].id), x[0].id))
    if not stored:
        return None
    env = stored[0][0]
    # a done/ entry whose record was written keeps no bytes (`Envelope.envelope_only`)
    with_bytes = [(e, d) for e, d in stored if not e.envelope_only] or stored
    raw = strip_trace(next((d for e, d in with_bytes if not e.tracked), with_bytes[0][1]))
    sched = env.scheduled_for
    return AcceptedMessage(
        queue_id=env.id, message_id=env.message_id or "", from_addr=env.mail_from,
        to_addrs=[], cc_addrs=[], subject="", date=None, snippet="", size=len(raw),
        recipients=[r.addr for e, _ in stored for r in e.recipients],
        user=env.user, account=env.account, at=datetime.fromtimestamp(env.received_at, UTC),
        copies=[Copy(e.id, e.recipients[0].addr if e.tracked and e.recipients else None,
                     e.links) for e, _ in stored],
        client_ip=env.client_ip, raw=raw, template=env.template, campaign=env.campaign,
        scheduled_at=datetime.fromtimestamp(sched, UTC)
        if sched is not None and sched > env.received_at else None)


def _spooled_groups(spool: Spool) -> tuple[dict[str, list[tuple[str, str]]], list[EventRecord]]:
    """(state, queue id) of the copies the relay records, by message (`Envelope.group`),
    and the outcome events their queue files keep (`outcome_events`)."""
    groups: dict[str, list[tuple[str, str]]] = {}
    events: list[EventRecord] = []
    # entries move while the scan runs, backwards too (`queue retry`, `release`): an entry
    # that moves into a state listed already is missed by one pass over the states, so
    # there are two, and an entry read where it is no longer is looked for again
    listed: dict[str, str] = {}
    for _ in range(2):
        for state in JOURNAL_STATES:
            for qid in spool.list_ids(state):
                listed.setdefault(qid, state)
    for qid, state in listed.items():
        env = _read_anywhere(spool, state, qid, spool.read_envelope)
        if env is not None and env[1].recorded:
            groups.setdefault(env[1].group or env[1].id, []).append((env[0], qid))
            events.extend(outcome_events(env[1]))
    return groups, events


_T = TypeVar("_T")


def _read_anywhere(spool: Spool, state: str, qid: str,
                   read: Callable[[str, str], _T]) -> tuple[str, _T] | None:
    """(state, `read(state, qid)`) of an entry listed in `state`, wherever it moved since;
    None when it is gone (delivered and removed, deleted), corrupt (for the scheduler to
    move) or out of the journal's states."""
    for _ in range(3):   # it may move again while it is looked for
        try:
            return state, read(state, qid)
        except CorruptQueueFile:
            return None
        except NotFound:
            pass
        try:
            state = spool.find(qid)
        except NotFound:
            return None
        if state not in JOURNAL_STATES:
            return None
    return None


def _read_entries(spool: Spool, where: list[tuple[str, str]]) -> list[tuple[Envelope, bytes]]:
    return [got[1] for state, qid in where
            if (got := _read_anywhere(spool, state, qid, spool.read)) is not None]


async def record_unrecorded(spool: Spool, known: Callable[[list[str]], Awaitable[set[str]]],
                            sink: EventSink, log: Any = None) -> int:
    """Give every spooled message the store has no record of the record the relay makes,
    then hand `sink` the outcome events the queue files keep.

    The spool is the journal of the store writer's batches: a message accepted just before
    a crash (inside the writer's batching delay) is still spooled, a delivered one is in
    done/ until its record and events are written, and `known` (the store's relay sources
    among the queue ids asked) says which have no record. Run at start, before the
    scheduler delivers anything, so the `queued` events come before the deliveries'. A
    message is skipped when any of its copies is known (the relay records all copies of a
    message at once), and every outcome event has its idempotency key (the store keeps
    one event per key), so running it again adds nothing. Returns how many records were
    handed to `sink`."""
    log = log or structlog.get_logger("mailgw.relay")
    groups, events = await asyncio.to_thread(_spooled_groups, spool)
    if not groups:
        return 0
    have = await known([qid for where in groups.values() for _, qid in where])
    count = 0
    for where in groups.values():
        if any(qid in have for _, qid in where):
            continue
        entries = await asyncio.to_thread(_read_entries, spool, where)
        if entries and all(e.envelope_only for e, _ in entries):
            # done/ keeps only the envelope once the record is written: the store should
            # know it. Rebuilt without the bytes it would be an empty message: skipped
            log.warning("store_record_not_rebuilt", queue_id=entries[0][0].id,
                        reason="done/ entry without message bytes, record unknown to the store",
                        copies=[e.id for e, _ in entries])
            continue
        a = accepted_from_spool(entries)
        if a is None:
            continue
        sink.add_accepted(a)
        count += 1
        log.warning("store_record_recovered", queue_id=a.queue_id, message_id=a.message_id,
                    copies=len(a.copies), recipients=len(a.recipients))
    for e in events:   # after the records they attach to (the writer keeps the order)
        sink.add_event(e)
    if events:
        log.info("store_events_replayed", count=len(events))
    return count
