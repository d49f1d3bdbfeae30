"""The account machine's transitions without a server: an opener that fails as told, a
SQLite store, and the states each tailer passed through (see gateway/imap/tailer.py)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from gateway.config import Account, Config
from gateway.crm.accounts import Accounts
from gateway.crm.store import Store
from gateway.errors import AccountAuthError, AccountUnavailable
from gateway.imap.client import IMAPClient
from gateway.imap.slots import ConnectionSlots
from gateway.imap.tailer import AccountTailer, TailState
from tests.integration.harness import wait_until

S = TailState


def config(tmp_path: Path) -> Config:
    return Config.model_validate({
        "hostname": "gw.example.test", "state_dir": str(tmp_path / "state"),
        "delivery": {"route": "mx"}, "source": str(tmp_path / "gateway.yaml"),
        "sync": {"backoff_min": 0.01, "backoff_max": 0.02},
        "accounts": [{"id": "rep", "email": "rep@example.test",
                      "imap": {"host": "127.0.0.1", "port": 1, "tls": "none"},
                      "auth": {"password_file": str(tmp_path / "pw")}}]})


class Recording(AccountTailer):
    """Remembers every state its driver ran a handler for."""

    visited: list[TailState]

    async def _step(self, handler: Callable[[], Awaitable[TailState]]) -> TailState:
        self.visited.append(self.state)
        return await super()._step(handler)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    s = await Store.open(f"sqlite+aiosqlite:///{tmp_path}/crm.db")
    try:
        yield s
    finally:
        await s.close()


async def tailer(tmp_path: Path, store: Store, opener: Callable[[Account], Awaitable[IMAPClient]],
                 slots: ConnectionSlots | None = None) -> Recording:
    cfg = config(tmp_path)
    accounts = Accounts(store)
    await accounts.ensure(cfg.accounts)
    t = Recording(cfg.accounts[0], get_config=lambda: cfg, store=store, accounts=accounts,
                  slots=slots or ConnectionSlots(1), opener=opener)
    t.visited = []
    return t


async def test_refused_credentials_need_reconnecting_and_stop_the_machine(
        tmp_path: Path, store: Store) -> None:
    async def refuse(account: Account) -> IMAPClient:
        raise AccountAuthError("login refused", server_text="NO [AUTHENTICATIONFAILED] nope")

    t = await tailer(tmp_path, store, refuse)
    await asyncio.wait_for(t.run(), 10)
    assert t.visited == [S.WAIT_SLOT, S.CONNECT, S.NEEDS_RECONNECT]
    assert t.state is S.STOPPED and t.slots.in_use == 0
    row = await t.accounts.get("rep")
    assert row is not None and row["status"] == "needs_reconnect"
    assert row["status_reason"] == "NO [AUTHENTICATIONFAILED] nope"
    assert t.stats.logins_failed == 1


async def test_an_unavailable_server_backs_off_releases_the_slot_and_tries_again(
        tmp_path: Path, store: Store) -> None:
    attempts: list[int] = []
    slots = ConnectionSlots(1)

    async def unavailable(account: Account) -> IMAPClient:
        attempts.append(slots.in_use)
        if len(attempts) == 3:
            t.stop()
        raise AccountUnavailable("connection refused")

    t = await tailer(tmp_path, store, unavailable, slots)
    await asyncio.wait_for(t.run(), 10)
    assert attempts == [1, 1, 1]                      # each attempt held the one slot
    assert t.visited == [S.WAIT_SLOT, S.CONNECT, S.BACKOFF] * 3   # the last one sees the stop
    assert t.state is S.STOPPED and slots.in_use == 0
    assert t.stats.sessions == 3 and t.stats.last_error == "connection refused"
    info = await t.accounts.sync_info("rep")
    assert [(r["kind"], r["status"]) for r in info["recent_errors"]] == [("connect", "error")] * 3


async def test_stop_while_waiting_for_a_slot_never_connects(tmp_path: Path, store: Store) -> None:
    slots = ConnectionSlots(1)
    await slots.acquire()                             # someone else holds the only slot

    async def never(account: Account) -> IMAPClient:
        raise AssertionError("connected without a slot")

    t = await tailer(tmp_path, store, never, slots)
    task = asyncio.create_task(t.run())
    await wait_until(lambda: slots.waiting == 1, 10, "the tailer queued for the slot")
    t.stop()
    await asyncio.wait_for(task, 10)
    assert t.visited == [S.WAIT_SLOT] and t.state is S.STOPPED
    assert slots.in_use == 1 and slots.waiting == 0   # the other holder's slot, nobody queued
