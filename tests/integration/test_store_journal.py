"""The spool as the journal of the store's relay records: a record lost in a crash comes back at start."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.config import load_config
from gateway.ids import new_queue_id
from gateway.relay import Submission, received_header, strip_trace
from gateway.spool import Envelope, Recipient, Spool
from tests.integration.harness import Sink, running_app, wait_until, write_config

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
