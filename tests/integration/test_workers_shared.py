"""What workers share through the store: the AUTH lockout and the daily send counts.

Two Apps on one state directory and store, as two workers of one node (each its own
spool and submission port here, so that the test chooses which worker a client meets).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import smtplib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from gateway.app import App, Worker
from gateway.config import load_config
from gateway.crm.counters import SendCounts
from gateway.crm.store import Store
from tests.conftest import free_port
from tests.integration.harness import USER, Sink, write_config

pytestmark = pytest.mark.integration


@pytest.fixture
def sink() -> Iterator[Sink]:
    s = Sink().start()
    yield s
    s.stop()


@contextlib.asynccontextmanager
async def two_workers(tmp_path: Path, sink: Sink) -> AsyncIterator[tuple[App, App]]:
    apps = []
    for i in (1, 2):
        d = tmp_path / f"w{i}"
        d.mkdir()
        path = write_config(d, upstream_port=sink.port, state_dir=str(tmp_path / "state"),
                            listeners={"submission": {"port": free_port(), "auth_failures": 3}})
        apps.append(App(load_config(path), worker=Worker(i, 2)))
    for app in apps:
        await app.start()
    try:
        yield apps[0], apps[1]
    finally:
        for app in apps:
            await app.stop()


def auth_codes(port: int, n: int) -> list[int]:
    codes = []
    for _ in range(n):
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as c:
            c.ehlo("x")
            blob = base64.b64encode(f"\0{USER}\0wrong".encode()).decode()
            codes.append(c.docmd("AUTH", f"PLAIN {blob}")[0])
    return codes


async def test_auth_lockout_holds_across_workers(tmp_path: Path, sink: Sink) -> None:
    async with two_workers(tmp_path, sink) as (a, b):
        assert a.submission is not None and b.submission is not None
        assert a.spool.root != b.spool.root
        assert await asyncio.to_thread(auth_codes, a.submission.port, 3) == [535] * 3
        # the same client at the other worker is locked out too
        assert await asyncio.to_thread(auth_codes, b.submission.port, 1) == [421]


async def test_daily_count_of_one_worker_is_seen_by_the_other(tmp_path: Path) -> None:
    store = await Store.open(f"sqlite+aiosqlite:///{tmp_path}/crm.db")
    try:
        first = SendCounts(store, refresh=0.0)
        second = SendCounts(store, refresh=0.0)
        assert await second.today("alice@example.com") == 0   # read (and cached) before
        first.add("alice@example.com", 5)
        await first.close()                                    # written to the store
        assert await second.today("alice@example.com") == 5
    finally:
        await store.close()


async def test_fewer_workers_take_over_the_spools_of_the_others(tmp_path: Path) -> None:
    from tests.integration.harness import PASSWORD
    from tests.support.wait import wait_for

    sink = Sink()                      # down: what worker 2 accepts stays in its spool
    async with two_workers(tmp_path, sink) as (_, b):
        assert b.submission is not None
        port = b.submission.port

        def send() -> None:
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as c:
                c.login(USER, PASSWORD)
                c.sendmail(USER, ["bob@example.net"], b"Subject: orphan\r\n\r\nbody\r\n")

        await asyncio.to_thread(send)
        assert b.spool_counts()["incoming"] + b.spool_counts()["deferred"] == 1
    state = tmp_path / "state"
    assert any((state / "spool-2" / s).iterdir() for s in ("incoming", "deferred"))
    sink.start()
    try:
        # `workers: 1` again: the single process adopts spool-2 and delivers it
        app = App(load_config(tmp_path / "w1" / "gateway.yaml"))
        await app.start()
        try:
            await wait_for(lambda: len(sink.received) == 1, 30, "the orphan delivered")
        finally:
            await app.stop()
        assert not any((state / "spool-2" / s).exists() and any((state / "spool-2" / s).iterdir())
                       for s in ("incoming", "deferred"))
    finally:
        sink.stop()
