"""Helpers for the tailer tests: a config for one Dovecot account, a spying opener, waits."""

from __future__ import annotations

import itertools
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from gateway.accounts.grants import GrantClient
from gateway.accounts.registry import token_cipher
from gateway.accounts.tokens import ConfigAccounts, TokenService
from gateway.config import Account, Config
from gateway.crm.accounts import Accounts, Checkpoint, DBTokenStore
from gateway.crm.contacts import ContactInput, upsert_contacts
from gateway.crm.linking import LinkRules
from gateway.crm.store import Store
from gateway.imap.client import IMAPClient
from gateway.imap.manager import Tailers
from tests.integration.harness import wait_until
from tests.support.dovecot import Dovecot

LEAD = "lead@customer.example"
STRANGER = "someone@elsewhere.example"
FAST_SYNC: dict[str, Any] = {"poll_interval": "2s", "check_interval": 0.05, "backoff_min": 0.2,
                             "backoff_max": 1.0, "timeout": 10, "lease_ttl": 3}
_n = itertools.count(1)


def new_user(dovecot: Dovecot) -> str:
    name = f"rep{next(_n)}-{int(time.time() * 1000) % 1000000}@example.test"
    dovecot.add_user(name, "pw-" + name)
    return name


def account_dict(dovecot: Dovecot, user: str, tmp_path: Path, *, aid: str = "rep",
                 password: str | None = None, **extra: Any) -> dict[str, Any]:
    pw = tmp_path / f"{aid}.password"
    pw.write_text((password if password is not None else dovecot.users[user]) + "\n")
    d: dict[str, Any] = {"id": aid, "email": user,
                         "imap": {"host": dovecot.host, "port": dovecot.port, "tls": "none"},
                         "auth": {"password_file": str(pw)},
                         "sync": {"folders": ["INBOX", "Sent"], "history_days": 30}}
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(d.get(k), dict):
            d[k] = {**d[k], **v}
        else:
            d[k] = v
    return d


def make_config(tmp_path: Path, accounts: Sequence[dict[str, Any]], **extra: Any) -> Config:
    data: dict[str, Any] = {
        "hostname": "gw.example.test", "state_dir": str(tmp_path / "state"),
        "accounts": list(accounts), "delivery": {"route": "mx"},
        "crm": {"exclude": ["noreply@*"]}, "sync": dict(FAST_SYNC),
        "source": str(tmp_path / "gateway.yaml"),
    }
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(data.get(k), dict):
            data[k] = {**data[k], **v}
        else:
            data[k] = v
    return Config.model_validate(data)


async def add_contacts(store: Store, *emails: str) -> None:
    await upsert_contacts(store, [ContactInput(email=e) for e in emails])


class Spy:
    """An opener that counts logins and records every UID whose body was fetched."""

    def __init__(self, inner: Callable[[Account], Awaitable[IMAPClient]]) -> None:
        self.inner = inner
        self.logins = 0
        self.body_uids: list[tuple[str, int]] = []     # (folder, uid)
        self.appends: list[str] = []

    async def __call__(self, account: Account) -> IMAPClient:
        self.logins += 1
        imap = await self.inner(account)
        fetch_bodies = imap.fetch_bodies
        append = imap.append

        def spy_bodies(uids: Sequence[int], **kw: Any) -> Any:
            folder = imap.selected.name if imap.selected else "?"
            self.body_uids.extend((folder, u) for u in uids)
            return fetch_bodies(uids, **kw)

        async def spy_append(folder: Any, raw: bytes, **kw: Any) -> Any:
            self.appends.append(getattr(folder, "name", str(folder)))
            return await append(folder, raw, **kw)

        imap.fetch_bodies = spy_bodies  # type: ignore[method-assign]
        imap.append = spy_append  # type: ignore[method-assign]
        return imap


class TestTailers(Tailers):
    """Tailers with the daemon's OAuth token service over the config's accounts (tokens kept
    encrypted in the store, key in state_dir), closed with the tailers."""

    def __init__(self, cfg: Config, store: Store, **kw: Any) -> None:
        self.grants = GrantClient()
        kw.setdefault("tokens", TokenService(lambda: cfg, ConfigAccounts(lambda: cfg),
                                             DBTokenStore(store), token_cipher(cfg), self.grants))
        super().__init__(lambda: cfg, store, **kw)

    async def stop(self, timeout: float = 10.0) -> None:
        await super().stop(timeout)
        await self.grants.close()

    async def abort(self) -> None:
        await super().abort()
        await self.grants.close()


def tailers_for(cfg: Config, store: Store, **kw: Any) -> tuple[Tailers, Spy]:
    store.configure(LinkRules.from_config(cfg), store.webhooks)
    t = TestTailers(cfg, store, **kw)
    spy = Spy(t.opener)
    t.opener = spy
    t.sent.opener = spy
    return t, spy


async def wait_synced(accounts: Accounts, aid: str, folders: Sequence[str], timeout: float = 20.0,
                      uidvalidity: dict[str, int] | None = None) -> dict[str, Checkpoint]:
    """Until every folder's initial sync is done (and at the given UIDVALIDITY)."""
    got: dict[str, Checkpoint] = {}

    async def done() -> bool:
        for f in folders:
            cp = await accounts.checkpoint(aid, f)
            if cp is None or not cp.initial_done:
                return False
            if uidvalidity and f in uidvalidity and cp.uidvalidity != uidvalidity[f]:
                return False
            got[f] = cp
        return True

    await wait_until(done, timeout, f"initial sync of {', '.join(folders)}")
    return got


async def stored_ids(store: Store) -> set[str]:
    return {m["message_id"] for m in await store.list_messages(limit=100000)}
