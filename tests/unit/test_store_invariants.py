"""Store invariants whatever order the paths arrive in (property-based, hypothesis).

One outbound message to one to three recipients is seen on every path: the relay's
record (one spool entry, or one copy per recipient), its delivery events (``sent`` or
``bounced`` per recipient, always after the record, as the StoreWriter orders them),
the ingest copy (the ingest address in Bcc; stored inbound or outbound, as ingest
decides by its own addresses), the IMAP Sent copy, the rep's forward of it to the
ingest address (unwrapped by ingest: the same message on another ingest ref), a replay
of the relay's record, and replies (from recipients, a stranger, an auto-responder).
They arrive in random orders and random batchings through the real entry points
(:meth:`Store.record`, :meth:`Store.store_messages`), and then:

- the message is one row, outbound, with the relay's user and template;
- it has exactly one ``queued`` event per envelope recipient and one delivery event per
  recipient;
- ``gateway.crm.reports.engagement`` counts each recipient once: sent = recipients,
  delivered + bounced = recipients, delivered <= sent, every rate <= 1, replied only
  from recipients whose reply came after an outbound copy was stored.

Runs on SQLite (a new file per example, a copy of the session's migrated template:
tests/conftest.py `sqlite_template`). ``MAILGW_HYPOTHESIS_EXAMPLES`` sets the
number of examples (default 60).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.crm.reports import engagement
from gateway.crm.store import Store
from gateway.records import AcceptedMessage, Copy, EventRecord, NewMessage, SourceRef

EXAMPLES = int(os.environ.get("MAILGW_HYPOTHESIS_EXAMPLES", "60"))
T0 = datetime(2026, 12, 2, 10, 0, tzinfo=UTC)
REP = "rep@ours.example"
MID = "<offer-1@ours.example>"
PEOPLE = ("bob@acme.test", "Carol@Acme.test", "dan@beta.test")
STRANGER = "eve@elsewhere.test"


@dataclass(frozen=True)
class Scenario:
    recipients: tuple[str, ...]       # envelope recipients (To, then Cc, then Bcc-only)
    n_to: int
    n_cc: int
    per_recipient: bool               # one spool copy per recipient (tracking on)
    bounced: frozenset[str]           # recipients whose delivery bounced
    ingest_outbound: bool             # ingest knew the rep's address as its own


def accepted(sc: Scenario) -> AcceptedMessage:
    copies = [Copy(f"Q{i}", recipient=r) for i, r in enumerate(sc.recipients)] \
        if sc.per_recipient else []
    return AcceptedMessage(
        queue_id="Q0", message_id=MID, from_addr=REP, to_addrs=list(sc.recipients[:sc.n_to]),
        cc_addrs=list(sc.recipients[sc.n_to:sc.n_to + sc.n_cc]), subject="Our offer", date=T0,
        snippet="Hello", size=100, recipients=list(sc.recipients), user=REP, account="rep",
        at=T0, copies=copies, template="offer-v2")


def queue_id(sc: Scenario, rcpt: str) -> str:
    return f"Q{sc.recipients.index(rcpt)}" if sc.per_recipient else "Q0"


def delivery(sc: Scenario, rcpt: str) -> EventRecord:
    kind = "bounced" if rcpt in sc.bounced else "sent"
    return EventRecord(queue_id=queue_id(sc, rcpt), type=kind, recipient=rcpt,
                       at=T0 + timedelta(minutes=1), details={"reply": "250 ok"})


def copy_of(sc: Scenario, source: SourceRef, direction: str) -> NewMessage:
    """The outbound message as ingest or IMAP parse it (no Bcc header, no relay fields)."""
    return NewMessage(
        message_id=MID, from_addr=REP, to_addrs=list(sc.recipients[:sc.n_to]),
        cc_addrs=list(sc.recipients[sc.n_to:sc.n_to + sc.n_cc]), subject="Our offer", date=T0,
        direction=direction, sources=[source], snippet="Hello", size=100,
        account=source.account)


def reply(n: int, sender: str, *, kind: str = "message") -> NewMessage:
    subject = "Automatic reply: Our offer" if kind == "auto_reply" else "Re: Our offer"
    return NewMessage(
        message_id=f"<reply-{n}@acme.test>", from_addr=sender, to_addrs=[REP], cc_addrs=[],
        subject=subject, date=T0 + timedelta(hours=1, minutes=n), direction="inbound",
        in_reply_to=MID, references=[MID],
        sources=[SourceRef("ingest", f"I-reply-{n}", T0 + timedelta(hours=1))], kind=kind)


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    n = draw(st.integers(1, 3))
    recipients = tuple(draw(st.permutations(PEOPLE))[:n])
    n_to = draw(st.integers(1, n))
    n_cc = draw(st.integers(0, n - n_to))
    bounced = frozenset(r for r in recipients if draw(st.booleans()))
    return Scenario(recipients, n_to, n_cc, draw(st.booleans()), bounced, draw(st.booleans()))


#: an arrival: (entry point, value); "record" takes AcceptedMessage / EventRecord values
Arrival = tuple[str, Any]


@st.composite
def arrivals(draw: st.DrawFn, sc: Scenario) -> list[list[Arrival]]:
    """The arrivals in a random order, cut into random batches of one entry point each."""
    ingest_dir = "outbound" if sc.ingest_outbound else "inbound"
    others: list[Arrival] = [
        ("record", accepted(sc)),
        ("messages", copy_of(sc, SourceRef("ingest", "I-bcc", T0, account="rep"), ingest_dir)),
        ("messages", copy_of(sc, SourceRef("imap", "rep/Sent/1/7", T0 + timedelta(seconds=30),
                                           account="rep", folder="Sent", uidvalidity=1, uid=7),
                             "outbound")),
        ("messages", copy_of(sc, SourceRef("ingest", "I-fwd", T0 + timedelta(hours=2),
                                           account="rep"), ingest_dir)),
    ]
    # people answer what reached them (a reply from a bounced recipient would be > 100 %)
    delivered = tuple(r for r in sc.recipients if r not in sc.bounced)
    repliers = draw(st.lists(st.sampled_from((*delivered, STRANGER)), max_size=4))
    others += [("messages", reply(i, r)) for i, r in enumerate(repliers)]
    if draw(st.booleans()):   # an auto-responder answers too
        others.append(("messages", reply(9, sc.recipients[-1], kind="auto_reply")))
    order = draw(st.permutations(others))
    if draw(st.booleans()):   # the StoreWriter replays a batch (e.g. after a failed commit)
        order.insert(draw(st.integers(0, len(order))), ("record", accepted(sc)))
    # delivery events come after the relay's first record, anywhere later
    first = next(i for i, (_, v) in enumerate(order) if isinstance(v, AcceptedMessage))
    for r in sc.recipients:
        order.insert(draw(st.integers(first + 1, len(order))), ("record", delivery(sc, r)))
    batches: list[list[Arrival]] = []
    for item in order:
        if batches and batches[-1][0][0] == item[0] and draw(st.booleans()):
            batches[-1].append(item)
        else:
            batches.append([item])
    return batches


async def feed(store: Store, batches: list[list[Arrival]]) -> None:
    for batch in batches:
        if batch[0][0] == "record":
            await store.record([v for _, v in batch if isinstance(v, AcceptedMessage)],
                               [v for _, v in batch if isinstance(v, EventRecord)])
        else:
            await store.store_messages([v for _, v in batch])


async def check(template: Path, sc: Scenario, batches: list[list[Arrival]]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copyfile(template, f"{tmp}/crm.db")
        store = await Store.open(f"sqlite+aiosqlite:///{tmp}/crm.db")
        try:
            await feed(store, batches)
            rows = [r for r in await store.list_messages() if r["message_id"] == MID]
            assert len(rows) == 1, rows
            row = rows[0]
            assert row["direction"] == "outbound"
            full = await store.get_message(row["id"], bodies=True)
            assert full is not None
            assert (full["user"], full["template"]) == (REP, "offer-v2"), full
            queued = sorted(e["recipient"].lower() for e in row["events"] if e["type"] == "queued")
            assert queued == sorted(r.lower() for r in sc.recipients)
            outcome = sorted((e["type"], e["recipient"].lower()) for e in row["events"]
                             if e["type"] in ("sent", "bounced"))
            assert outcome == sorted(("bounced" if r in sc.bounced else "sent", r.lower())
                                     for r in sc.recipients)
            repliers = [e["recipient"] for e in row["events"] if e["type"] == "replied"]
            assert set(repliers) <= {r.lower() for r in sc.recipients if r not in sc.bounced}
            assert all(e["machine"] and e["recipient"] == sc.recipients[-1].lower()
                       for e in row["events"] if e["type"] == "auto_replied")
            for by in (None, "domain"):
                report = await engagement(store, days=7, by=by, now=T0 + timedelta(days=1))
                total = report["total"]
                n = len(sc.recipients)
                assert total["sent"] == n, report
                assert total["delivered"] == n - len(sc.bounced), report
                assert total["bounced"] == len(sc.bounced), report
                assert total["delivered"] <= total["sent"]
                assert total["replied"] <= total["delivered"]
                assert total["auto_replied"] <= 1
                for g in (*report["groups"], total):
                    for key, value in g.items():
                        if key.endswith("_rate") and value is not None:
                            assert 0 <= value <= 1, (key, g)
        finally:
            await store.close()


@st.composite
def cases(draw: st.DrawFn) -> tuple[Scenario, list[list[Arrival]]]:
    sc = draw(scenarios())
    return sc, draw(arrivals(sc))


@settings(max_examples=EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(cases())
def test_one_message_exact_events_and_a_sane_report_in_any_arrival_order(
        sqlite_template: Path, case: tuple[Scenario, list[list[Arrival]]]) -> None:
    asyncio.run(check(sqlite_template, *case))
