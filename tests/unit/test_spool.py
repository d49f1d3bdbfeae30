"""The spool: atomic durable writes, states as directories, crash recovery."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import time
from dataclasses import asdict
from pathlib import Path

import pytest

from gateway.dirqueue import DirSync as _DirSync
from gateway.errors import NotFound, SpoolError
from gateway.spool import Envelope, Recipient, Spool, new_queue_id, valid_queue_id


def env(qid: str | None = None) -> Envelope:
    return Envelope(id=qid or new_queue_id(), mail_from="a@example.com",
                    recipients=[Recipient("b@example.net"), Recipient("c@example.org")])


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    s = Spool(tmp_path / "spool")
    s.setup()
    return s


def test_ids_unique_sortable() -> None:
    ids = [new_queue_id(1_700_000_000 + i) for i in range(50)]
    assert ids == sorted(ids)
    assert len(set(new_queue_id() for _ in range(10000))) == 10000
    assert all(valid_queue_id(i) for i in ids)


async def test_put_read_roundtrip(spool: Spool) -> None:
    e = env()
    data = b"Subject: x\r\n\r\nbody\r\n" + bytes(range(256))
    await spool.put(e, data)
    assert spool.list_ids("incoming") == [e.id]
    assert spool.list_ids("deferred") == []
    e2, d2 = spool.read("incoming", e.id)
    assert d2 == data
    assert e2.recipients[1].addr == "c@example.org" and e2.size == len(data)
    assert spool.read_envelope("incoming", e.id).mail_from == "a@example.com"
    assert list(spool.tmp.iterdir()) == []


async def test_concurrent_puts_share_directory_fsyncs(spool: Spool,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    dir_fsyncs = 0
    real = _DirSync._fsync

    def counting(self: _DirSync) -> None:
        nonlocal dir_fsyncs
        dir_fsyncs += 1
        time.sleep(0.002)  # a slow disk: later writers queue up behind this fsync
        real(self)

    monkeypatch.setattr(_DirSync, "_fsync", counting)
    envs = [env() for _ in range(200)]
    await asyncio.gather(*(spool.put(e, b"Subject: x\r\n\r\nx\r\n") for e in envs))
    assert sorted(spool.list_ids("incoming")) == sorted(e.id for e in envs)
    ds = spool._dirsync["incoming"]
    assert ds._done == 200
    assert dir_fsyncs < 200


def test_envelope_json_is_asdict() -> None:
    e = env()
    e.recipients[0].last_reply, e.user = "250 2.0.0 ok", "a@example.com"
    assert e.to_json() == json.dumps(asdict(e), separators=(",", ":")).encode()
    assert Envelope.from_json(e.to_json()) == e


async def test_rewrite_moves_and_keeps_one_copy(spool: Spool) -> None:
    e = env()
    await spool.put(e, b"S: x\r\n\r\nb\r\n")
    e.recipients[0].status = "sent"
    e.attempts = 1
    assert await spool.rewrite(e, b"S: x\r\n\r\nb\r\n", "incoming", "deferred")
    assert spool.list_ids("incoming") == []
    e2 = spool.read_envelope("deferred", e.id)
    assert e2.attempts == 1 and [r.addr for r in e2.pending] == ["c@example.org"]
    # an admin deleted it meanwhile: nothing is resurrected
    spool.delete(e.id)
    assert not await spool.rewrite(e2, b"x", "deferred", "deferred")
    assert spool.list_ids("deferred") == []


async def test_recover_cleans_tmp_and_quarantines_corrupt(spool: Spool) -> None:
    good = env()
    await spool.put(good, b"S: x\r\n\r\nb\r\n")
    (spool.tmp / "half-written.1234").write_bytes(b"MAILGW-SPOOL 1\n{\"id\"")
    (spool.dir("incoming") / "01BADBADBADBADBADBADBADBAD").write_bytes(b"garbage")
    (spool.dir("deferred") / "01TRUNCATEDTRUNCATEDTRUNCA").write_bytes(b"MAILGW-SPOOL 1\n{\"id\":")
    counts = Spool(spool.root).recover()
    assert counts == {"incoming": 1, "deferred": 0, "hold": 0, "done": 0,
                      "corrupt": 2}
    assert list(spool.tmp.iterdir()) == []
    assert sorted(spool.list_ids("corrupt")) == ["01BADBADBADBADBADBADBADBAD",
                                                  "01TRUNCATEDTRUNCATEDTRUNCA"]


async def test_disk_full_is_a_temporary_spool_error(spool: Spool,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    def full(fd: int, data: bytes) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(SpoolError) as ei:
        await spool.put(env(), b"S: x\r\n\r\nb\r\n")
    assert ei.value.smtp_reply().startswith("452 4.3.1 Insufficient system storage")
    monkeypatch.undo()
    assert spool.list_ids("incoming") == [] and list(spool.tmp.iterdir()) == []


async def test_put_all_is_all_or_nothing_when_a_rename_fails(
        spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    """A full disk can refuse the directory entry itself (rename), after every copy was
    written and fsynced: then no copy may stay queued, since the client is told 452."""
    items = [(env(), b"S: x\r\n\r\ncopy %d\r\n" % i) for i in range(3)]
    real = os.rename
    calls = 0

    def rename(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(SpoolError) as ei:
        await spool.put_all(items)
    assert ei.value.smtp_reply().startswith("452 4.3.1 Insufficient system storage")
    monkeypatch.undo()
    assert spool.list_ids("incoming") == [] and list(spool.tmp.iterdir()) == []
    await spool.put_all(items)
    assert spool.list_ids("incoming") == sorted(e.id for e, _ in items)


async def test_move_find_delete(spool: Spool) -> None:
    e = env()
    await spool.put(e, b"S: x\r\n\r\nb\r\n")
    spool.move(e.id, "incoming", "hold")
    assert spool.find(e.id) == "hold"
    assert spool.delete(e.id) == "hold"
    with pytest.raises(NotFound):
        spool.find(e.id)


@pytest.mark.parametrize("copies", [1, 3])
@pytest.mark.parametrize("fails", [1, 2])
async def test_a_failed_directory_fsync_after_the_rename_still_queues(
        spool: Spool, monkeypatch: pytest.MonkeyPatch, copies: int, fails: int) -> None:
    """Once renamed into incoming/ the message is queued (the scheduler delivers it): a
    failed directory fsync then must not answer 451, or the client sends it again and the
    recipients get it twice. The fsync is retried once; failing again is logged, counted
    and the put still succeeds."""
    left = [fails]

    def failing(self: _DirSync) -> None:
        if left[0] > 0:
            left[0] -= 1
            raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(_DirSync, "_fsync", failing)
    items = [(env(), b"Subject: x\r\n\r\nbody\r\n") for _ in range(copies)]
    await spool.put_all(items)   # no SpoolError
    assert sorted(spool.list_ids("incoming")) == sorted(e.id for e, _ in items)
    assert spool.unsynced == (1 if fails == 2 else 0)


async def test_the_unsynced_count_reaches_the_metric(spool: Spool,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from gateway.metrics import Metrics

    def failing(self: _DirSync) -> None:
        raise OSError(errno.EIO, "Input/output error")

    m = Metrics()
    spool.on_unsynced = m.spool_dir_fsync_failed
    monkeypatch.setattr(_DirSync, "_fsync", failing)
    await spool.put(env(), b"Subject: x\r\n\r\nbody\r\n")
    assert m.spool_unsynced._value.get() == 1


async def test_a_failed_file_fsync_before_the_rename_is_still_451(
        spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(spool._queue, "_fsync", failing)   # the file's fsync in tmp/
    with pytest.raises(SpoolError):
        await spool.put(env(), b"Subject: x\r\n\r\nbody\r\n")
    assert spool.list_ids("incoming") == [] and os.listdir(spool.tmp) == []


def test_queue_files_without_the_outcome_fields_still_read() -> None:
    """A queue file written before `Recipient.last_at` (and the fields after it) reads, and
    has no outcome event to replay; a recipient field of a later version is ignored."""
    from gateway.spool import Envelope, outcome_events

    old = (b'{"id":"Q1","mail_from":"a@example.com","recipients":[{"addr":"b@example.net",'
           b'"status":"sent","attempts":1,"last_reply":"250 ok","remote":"mx:25"},'
           b'{"addr":"c@example.net","status":"pending","future":1}],"received_at":1.0}')
    env = Envelope.from_json(old)
    assert [(r.addr, r.status, r.last_at) for r in env.recipients] == [
        ("b@example.net", "sent", None), ("c@example.net", "pending", None)]
    assert outcome_events(env) == []


async def test_finish_moves_to_done_and_recover_drops_a_stale_queued_copy(spool: Spool) -> None:
    """`finish` puts the final envelope into done/ and unlinks the old file; a crash between
    the two leaves both, and recovery keeps done/ (the entry is delivered)."""
    e = env()
    data = b"S: x\r\n\r\nb\r\n"
    await spool.put(e, data)
    for r in e.recipients:
        r.status, r.last_at = "sent", 1.0
    assert await spool.finish(e, data, "incoming")
    assert spool.list_ids("incoming") == [] and spool.list_ids("done") == [e.id]
    assert spool.read("done", e.id) == (e, data)
    assert not await spool.finish(e, data, "incoming")   # gone: nothing written
    stale = env(e.id)
    await spool.put(stale, data)                        # as if the unlink never happened
    counts = Spool(spool.root).recover()
    assert counts["incoming"] == 0 and counts["done"] == 1
    assert spool.list_ids("incoming") == [] and spool.find(e.id) == "done"
    await spool.remove_done([e.id])
    assert spool.list_ids("done") == []
