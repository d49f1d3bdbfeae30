"""The spool as the journal of the store's relay records: a record lost in a crash comes back at start.

So do the outcome events of a delivery: a delivered entry waits in done/ until the store
writer has written its record and events, and a restart replays them (keyed: once).
"""

from __future__ import annotations

import asyncio
import json
import smtplib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.config import load_config
from gateway.crm.store import Store
from gateway.errors import StoreError
from gateway.ids import new_queue_id
from gateway.records import AcceptedMessage, EventRecord
from gateway.relay import Submission, received_header, record_unrecorded, strip_trace
from gateway.spool import Envelope, Recipient, Spool
from tests.integration.harness import (
    PASSWORD,
    USER,
    Sink,
    running_app,
    wait_until,
    write_config,
)
from tests.support.cli import mailgw_in_process

pytestmark = pytest.mark.integration

HOST = "gw.example.test"


def message(mid: str) -> bytes:
    return (b"From: Alice <alice@example.com>\r\n"
            b"To: Bob <bob@example.net>, Carol <carol@example.net>\r\n"
            b"Subject: Lost in the batch window\r\n"
            b"Message-ID: <" + mid.encode() + b">\r\n"
            b"Date: Sun, 22 Nov 2026 10:00:00 +0000\r\n"
            b"\r\n"
            b"Hello both,\r\nthe record of this message was never written.\r\n")


def copy(qid: str, group: str, rcpts: list[str], data: bytes, now: float, **kw: object
         ) -> tuple[Envelope, bytes]:
    """A queue entry as the relay spools it: envelope, trace header on top of the bytes."""
    sub = Submission(mail_from="alice@example.com", rcpts=rcpts, data=data,
                     client_ip="127.0.0.1", client_helo="client.example.com",
                     user="alice@example.com")
    env = Envelope(id=qid, mail_from=sub.mail_from, recipients=[Recipient(r) for r in rcpts],
                   received_at=now, user=sub.user, client_ip=sub.client_ip,
                   client_helo=sub.client_helo, message_id=data.split(b"Message-ID: ")[1]
                   .split(b"\r\n")[0].decode(), group=group, **kw)  # type: ignore[arg-type]
    return env, received_header(sub, HOST, qid, now, rcpts) + data


@pytest.fixture
def sink() -> Iterator[Sink]:
    s = Sink().start()
    yield s
    s.stop()


def test_strip_trace_removes_only_the_relays_header() -> None:
    data = message("t@example.com")
    _, spooled = copy("Q1", "Q1", ["bob@example.net"], data, time.time())
    assert strip_trace(spooled) == data
    foreign = b"Received: from elsewhere\r\n\tby mx.example.net; x\r\n" + data
    assert strip_trace(foreign) == foreign


async def test_spooled_messages_without_a_record_get_one_at_start(tmp_path: Path,
                                                                  sink: Sink) -> None:
    path = write_config(tmp_path, upstream_port=sink.port)
    cfg = load_config(path)
    spool = Spool(cfg.spool_path)
    spool.setup()
    now = time.time()
    # message A: two copies (one per recipient, tracked), held and deferred, never delivered
    a1, a2 = new_queue_id(now), new_queue_id(now)
    data_a = message("journal-a@example.com")
    await spool.put(*copy(a1, a1, ["bob@example.net"], data_a, now, tracked=True, links=2),
                    state="hold")
    env, raw = copy(a2, a1, ["carol@example.net"], data_a, now, tracked=True, links=2,
                    next_attempt=now + 3600)
    await spool.put(env, raw, state="deferred")
    # message B: waiting in incoming/, delivered once the daemon runs
    b = new_queue_id(now)
    await spool.put(*copy(b, b, ["bob@example.net"], message("journal-b@example.com"), now,
                          template="welcome", campaign="spring"))
    # not the relay's to record: a copy a policy keeps out of the store, and a DSN
    c = new_queue_id(now)
    await spool.put(*copy(c, c, ["bob@example.net"], message("journal-c@example.com"), now,
                          crm_store=False), state="hold")
    d = new_queue_id(now)
    await spool.put(*copy(d, d, ["alice@example.com"], message("journal-d@example.com"), now,
                          is_bounce=True), state="hold")
    spool.close()

    async with running_app(path) as app:
        store = app.store
        assert store is not None

        first = store

        async def stored_b() -> bool:
            m = await first.get_message_by_queue_id(b)
            return m is not None and {e["type"] for e in m["events"]} >= {"queued", "sent"}

        await wait_until(stored_b, what="message B recorded with its queued and sent events")
        await wait_until(lambda: len(sink.received) == 1, what="message B delivered")
        m = await store.get_message_by_queue_id(a1, bodies=True)
        assert m is not None
        assert m["message_id"] == "<journal-a@example.com>" and m["direction"] == "outbound"
        assert m["subject"] == "Lost in the batch window"
        assert m["from"] == "alice@example.com" and m["user"] == "alice@example.com"
        assert "Received:" not in m["text_body"] and "never written" in m["text_body"]
        queued = sorted(e["recipient"] for e in m["events"] if e["type"] == "queued")
        assert queued == ["bob@example.net", "carol@example.net"]
        seen = {s["ref"]: s for s in m["seen"] if s["source"] == "relay"}
        assert set(seen) == {a1, a2}
        assert seen[a2]["recipient"] == "carol@example.net"
        again = await store.get_message_by_queue_id(a2)
        assert again is not None and again["id"] == m["id"]
        mb = await store.get_message_by_queue_id(b, bodies=True)
        assert mb is not None and (mb["template"], mb["campaign"]) == ("welcome", "spring")
        assert await store.get_message_by_queue_id(c) is None
        assert await store.get_message_by_queue_id(d) is None
        count = len(await store.list_messages(limit=100))

    async with running_app(path) as app:   # a restart: nothing recorded twice
        store = app.store
        assert store is not None and app.writer is not None
        await wait_until(lambda: app.writer is not None and app.writer.pending == 0,
                         what="the writer idle")
        assert len(await store.list_messages(limit=100)) == count
        m = await store.get_message_by_queue_id(a1)
        assert m is not None
        assert sorted(e["recipient"] for e in m["events"] if e["type"] == "queued") == \
            ["bob@example.net", "carol@example.net"]


# -- outcome events: done/ until written, replayed after a crash -------------------------

async def submit(port: int, msg: bytes, rcpts: list[str]) -> None:
    def go() -> None:
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as c:
            c.ehlo("client.example.com")
            c.login(USER, PASSWORD)
            c.sendmail(USER, rcpts, msg)
    await asyncio.to_thread(go)


RCPTS = ["bob@example.net", "carol@example.net"]


def store_down(store: Store, *, commits: bool) -> list[int]:
    """Make `store.record` fail from now on; with `commits` it writes first (the commit
    went through, its answer was lost: the writer writes the same batch again and again).
    Returns the list of failed calls (one entry per call)."""
    real = store.record
    calls: list[int] = []

    async def record(accepted: list[AcceptedMessage], events: list[EventRecord]) -> None:
        calls.append(1)
        if commits:
            await real(accepted, events)
        raise StoreError("the store is down (test)")
    store.record = record  # type: ignore[method-assign]
    return calls


async def outcome_counts(store: Store, qid: str) -> dict[str, Any]:
    m = await store.get_message_by_queue_id(qid)
    if m is None:
        return {}
    types = [(e["type"], e["recipient"]) for e in m["events"]]
    return {t: sorted(r for x, r in types if x == t) for t in ("queued", "sent")}


@pytest.mark.parametrize("commits", [False, True], ids=["store-down", "answer-lost"])
async def test_a_delivery_the_writer_could_not_write_is_recorded_once_after_a_restart(
        tmp_path: Path, sink: Sink, commits: bool) -> None:
    """The store fails while a message is delivered: the mail goes out at once (no wait for
    the record), the entry stays in done/ (not listed as queued) as long as the writer has
    not written its record and events, and after a kill and a restart with the store back
    the store has one record with one queued and one sent event per recipient, done/
    empty. With `commits` the failed batches were in fact written (again and again), so
    the replay meets events that exist already: their keys keep them single."""
    path = write_config(tmp_path, upstream_port=sink.port, drain_timeout="1s")
    async with running_app(path) as app:
        assert app.store is not None and app.writer is not None and app.submission is not None
        failed = store_down(app.store, commits=commits)
        await submit(app.submission.port, message("done-1@example.com"), RCPTS)
        # delivered while the store is down, without waiting for the record (RECORD_WAIT
        # held this for 10 s)
        await wait_until(lambda: len(sink.received) == 1, 8.0, "delivery while the store fails")
        [qid] = await asyncio.to_thread(app.spool.list_ids, "done")
        writer = app.writer
        await wait_until(lambda: len(failed) >= 2 and writer.pending > 0, 10.0,
                         "the writer retrying")
        assert app.spool.list_ids("done") == [qid]
        listing = mailgw_in_process(["queue", "list", "--json", "-c", str(path)])
        assert json.loads(listing.stdout) == []
        assert "1 delivered message(s) waiting for their CRM record" in \
            mailgw_in_process(["queue", "list", "-c", str(path)]).stdout
        assert mailgw_in_process(["queue", "delete", qid, "-c", str(path)]).returncode != 0
        assert app.spool_counts().get("done") is None
    # the stop could not write them either (as after a kill -9): still in done/
    assert Spool(load_config(path).spool_path).list_ids("done") == [qid]

    async with running_app(path) as app:   # the store is back
        store = app.store
        assert store is not None

        async def recorded() -> bool:
            return await outcome_counts(store, qid) == {"queued": RCPTS, "sent": RCPTS}
        await wait_until(recorded, 20.0, "the record and its sent events from done/")
        await wait_until(lambda: app.spool.list_ids("done") == [], 10.0, "done/ emptied")
        assert len(await store.list_messages(limit=100)) == 1
    async with running_app(path) as app:   # and once more: nothing twice
        assert app.store is not None
        assert await outcome_counts(app.store, qid) == {"queued": RCPTS, "sent": RCPTS}
        assert len(await app.store.list_messages(limit=100)) == 1
    assert len(sink.received) == 1


async def test_the_store_back_while_running_empties_done(tmp_path: Path, sink: Sink) -> None:
    """No restart needed: once the writer gets its backlog written, done/ empties."""
    path = write_config(tmp_path, upstream_port=sink.port)
    async with running_app(path) as app:
        store, writer = app.store, app.writer
        assert store is not None and writer is not None and app.submission is not None
        real = store.record
        failed = store_down(store, commits=False)
        await submit(app.submission.port, message("done-2@example.com"), RCPTS)
        await wait_until(lambda: len(sink.received) == 1, 8.0, "delivery while the store fails")
        await wait_until(lambda: len(failed) >= 1, 10.0, "a failed flush")
        [qid] = app.spool.list_ids("done")
        store.record = real  # type: ignore[method-assign]
        await wait_until(lambda: app.spool.list_ids("done") == [], 20.0, "done/ emptied")
        assert await outcome_counts(store, qid) == {"queued": RCPTS, "sent": RCPTS}


async def test_a_store_down_at_start_replays_the_journal_once_it_answers(
        tmp_path: Path, sink: Sink, monkeypatch: pytest.MonkeyPatch) -> None:
    """The store does not answer the journal replay at start: mail flows, done/ keeps what
    is delivered, and the replay runs again in the background until it succeeds."""
    path = write_config(tmp_path, upstream_port=sink.port, drain_timeout="1s")
    async with running_app(path) as app:
        assert app.store is not None and app.submission is not None
        store_down(app.store, commits=False)
        await submit(app.submission.port, message("done-3@example.com"), RCPTS)
        await wait_until(lambda: len(sink.received) == 1, 8.0, "delivery while the store fails")
    [qid] = Spool(load_config(path).spool_path).list_ids("done")

    real = Store.known_relay_refs
    asked: list[int] = []

    async def known_once_down(self: Store, refs: list[str]) -> set[str]:
        asked.append(1)
        if len(asked) == 1:
            raise StoreError("the store is down at start (test)")
        return await real(self, refs)
    monkeypatch.setattr(Store, "known_relay_refs", known_once_down)
    async with running_app(path) as app:
        store, scheduler = app.store, app.scheduler
        assert store is not None and scheduler is not None
        assert not scheduler.reaping and app.spool.list_ids("done") == [qid]

        async def recorded() -> bool:
            return await outcome_counts(store, qid) == {"queued": RCPTS, "sent": RCPTS}
        await wait_until(recorded, 20.0, "the record and events after the late replay")
        await wait_until(lambda: app.spool.list_ids("done") == [], 10.0, "done/ emptied")
        assert len(asked) == 2 and scheduler.reaping
    assert len(sink.received) == 1


# -- the journal scan: entries moving backwards, done/ entries without their bytes ----------

class Collect:
    """An EventSink and a log, recording."""

    def __init__(self) -> None:
        self.records: list[AcceptedMessage] = []
        self.events: list[EventRecord] = []
        self.logged: list[tuple[str, dict[str, Any]]] = []

    def add_accepted(self, a: AcceptedMessage) -> None:
        self.records.append(a)

    def add_event(self, e: EventRecord) -> None:
        self.events.append(e)

    def warning(self, event: str, **kw: Any) -> None:
        self.logged.append((event, kw))

    info = warning


async def nothing_known(qids: list[str]) -> set[str]:
    return set()


class RetriedWhileListing(Spool):
    """`mailgw queue retry` moves `qid` from deferred/ back to incoming/ right after the scan
    listed incoming/ (before it lists deferred/)."""

    qid = ""

    def list_ids(self, state: str) -> list[str]:
        if state == "deferred" and self.qid and (self.dir("deferred") / self.qid).exists():
            self.move(self.qid, "deferred", "incoming")
        return super().list_ids(state)


async def test_the_scan_finds_an_entry_moved_back_while_it_lists(tmp_path: Path) -> None:
    spool = RetriedWhileListing(tmp_path / "spool")
    spool.setup()
    now = time.time()
    qid = new_queue_id(now)
    await spool.put(*copy(qid, qid, ["bob@example.net"], message("moved@example.com"), now),
                    state="deferred")
    spool.qid = qid
    out = Collect()
    assert await record_unrecorded(spool, nothing_known, out, log=out) == 1
    assert [a.queue_id for a in out.records] == [qid]
    assert spool.find(qid) == "incoming"
    spool.close()


async def test_a_done_entry_without_its_bytes_is_never_rebuilt_empty(tmp_path: Path) -> None:
    """done/ keeps only the envelope once the copy's record is written. Should the store not
    know the record after all, no empty message is stored (logged instead); the events are
    replayed. A message with a copy that still has its bytes is rebuilt from that one."""
    spool = Spool(tmp_path / "spool")
    spool.setup()
    now = time.time()
    lone = new_queue_id(now)
    env, raw = copy(lone, lone, ["bob@example.net"], message("lone@example.com"), now)
    await spool.put(env, raw)
    env.recipients[0].status, env.recipients[0].last_at = "sent", now
    assert await spool.finish(env, raw, "incoming", keep_data=False)
    assert spool.read("done", lone) == (env, b"") and env.envelope_only
    # two per-recipient copies: one delivered (envelope only), one still deferred
    a1, a2 = new_queue_id(now), new_queue_id(now)
    data = message("pair@example.com")
    e1, r1 = copy(a1, a1, ["bob@example.net"], data, now, tracked=True)
    await spool.put(e1, r1)
    e1.recipients[0].status, e1.recipients[0].last_at = "sent", now
    assert await spool.finish(e1, r1, "incoming", keep_data=False)
    await spool.put(*copy(a2, a1, ["carol@example.net"], data, now, tracked=True),
                    state="deferred")

    out = Collect()
    assert await record_unrecorded(spool, nothing_known, out, log=out) == 1
    [rebuilt] = out.records
    assert rebuilt.queue_id == a1 and [c.queue_id for c in rebuilt.copies] == [a1, a2]
    assert rebuilt.raw == data
    assert [(ev, kw["copies"]) for ev, kw in out.logged
            if ev == "store_record_not_rebuilt"] == [("store_record_not_rebuilt", [lone])]
    assert sorted(str(e.key) for e in out.events) == sorted(
        [f"sent:{lone}:bob@example.net", f"sent:{a1}:bob@example.net"])
    spool.close()


def test_queue_show_of_a_done_entry_without_its_bytes(tmp_path: Path) -> None:
    path = write_config(tmp_path, upstream_port=9)
    spool = Spool(load_config(path).spool_path)
    spool.setup()
    now = time.time()
    qid = new_queue_id(now)
    env, raw = copy(qid, qid, ["bob@example.net"], message("show@example.com"), now)
    asyncio.run(spool.put(env, raw))
    env.recipients[0].status, env.recipients[0].last_at = "sent", now
    assert asyncio.run(spool.finish(env, raw, "incoming", keep_data=False))
    spool.close()
    shown = mailgw_in_process(["queue", "show", qid, "-c", str(path)])
    assert shown.returncode == 0, shown.stderr
    assert "not kept (delivered, its CRM record is written)" in shown.stdout
    as_json = mailgw_in_process(["queue", "show", qid, "--json", "-c", str(path)])
    assert json.loads(as_json.stdout)["headers"] == ""


async def test_queue_list_reads_another_workers_spool_before_worker_1_made_its_own(
        tmp_path: Path) -> None:
    # with several workers, worker 2 can take (and spool) a message before worker 1 has
    # made state/spool: the queue commands then read spool-2 rather than refuse
    path = write_config(tmp_path, upstream_port=9, workers=2)
    cfg = load_config(path)
    spool = Spool(cfg.worker_spool_path(2))
    spool.setup()
    env, data = copy("Q2WORKER", "Q2WORKER", ["bob@example.net"], message("w2@example.com"),
                     time.time())
    await spool.put(env, data)
    assert not cfg.spool_path.exists()
    listing = mailgw_in_process(["queue", "list", "--json", "-c", str(path)])
    assert listing.returncode == 0, listing.stderr
    assert [r["id"] for r in json.loads(listing.stdout)] == ["Q2WORKER"]
    (tmp_path / "none").mkdir()
    nothing = write_config(tmp_path / "none", upstream_port=9)
    refused = mailgw_in_process(["queue", "list", "-c", str(nothing)])
    assert refused.returncode == 1 and "no spool at" in refused.stderr
