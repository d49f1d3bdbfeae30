"""Connected mailboxes' runtime state in the CRM store: status, tokens, IMAP checkpoints, sync runs, leases.

    accounts = Accounts(store)
    await accounts.ensure(cfg.accounts)                    # a row per configured account
    if await accounts.acquire_lease("alice", node, ttl=60):  # this node tails alice now
        cp = await accounts.checkpoint("alice", "INBOX")
        await store.store_messages(items, then=accounts.save_checkpoint("alice", new_cp))
    await accounts.set_status("alice", "needs_reconnect", "[AUTHENTICATIONFAILED] ...")

Tables (see `gateway.crm.models`): ``accounts`` (status ``active | disabled |
needs_reconnect | deleted`` with the reason and when it changed, the OAuth2 token at rest,
the node lease, ``last_sync_at``), ``sync_state`` (the checkpoint of one folder: UIDVALIDITY,
the highest UID seen, HIGHESTMODSEQ, how far down the newest-first initial sync has come,
whether it is done) and ``sync_runs`` (one row per sync run: kind, folder, counts, status,
error).

Each method is one short transaction. A checkpoint is written by the callback
`save_checkpoint()` returns, which `Store.store_messages(..., then=...)` runs in the
transaction that stores the messages it covers: both commit or neither does.

Leases (README "Connected mailboxes (IMAP sync)", several nodes): a mailbox is tailed by
one node at a time. `acquire_lease` is one atomic ``UPDATE accounts SET lease_owner = me,
lease_expires_at = now + ttl WHERE id = :id AND (lease_owner = me OR lease_owner IS NULL
OR lease_expires_at < now)``; a node renews its leases every third of the TTL, and a
node that stops renewing (it died, or lost the database) loses them when they expire. On
PostgreSQL "now" is the database's clock, so nodes' clocks need not agree; on SQLite (one
node) it is this process's.

`overview()` and `sync_info()` are the read side shared by `mailgw accounts list`,
`mailgw sync status` and the read API (`/api/v1/accounts`, `/api/v1/accounts/{id}/sync`).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import sqlalchemy as sa
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection

from gateway.config import Account
from gateway.crm.models import (
    ACCOUNT_STATUSES,
    accounts_table,
    connect_links_table,
    message_contacts_table,
    messages_table,
    nodes_table,
    raw_table,
    sort_at,
    sources_table,
    sync_runs_table,
    sync_state_table,
)
from gateway.crm.sql import chunks, iso
from gateway.crm.store import Store
from gateway.errors import Conflict, NotFound
from gateway.keys.tokens import EncryptedToken

__all__ = [
    "Accounts",
    "Checkpoint",
    "DBTokenStore",
    "PurgeResult",
    "RunCounts",
    "StoredAccount",
]

#: columns never read back by the listing queries (secrets stay where they are)
_SECRET_COLUMNS = frozenset({"token_ciphertext", "credential_ciphertext"})


#: the reason text kept with a status (the server's words can be long)
REASON_MAX = 1000

ConnCallback = Callable[[AsyncConnection], Awaitable[None]]


@dataclass(frozen=True)
class Checkpoint:
    """Where the sync of one folder stands (a ``sync_state`` row).

    `last_uid`: every UID up to it has been looked at (the tail goes on above it).
    `backfill_uid`: the initial sync, newest first, has looked at every UID in the
    history window from it up to `last_uid` at the time it started (None: not started).
    """

    folder: str
    uidvalidity: int | None = None
    last_uid: int = 0
    highestmodseq: int | None = None
    backfill_uid: int | None = None
    initial_done: bool = False


@dataclass(frozen=True)
class StoredAccount:
    """An account created at run time, as the store keeps it (the credential stays encrypted)."""

    id: str
    email: str
    status: str
    definition: dict[str, Any]
    version: int
    credential: bytes | None
    connected_email: str | None


@dataclass
class RunCounts:
    """Counters of a sync run, updated as it goes."""

    fetched: int = 0       # header-first looks at messages
    stored: int = 0        # bodies stored (new or seen again)
    skipped: int = 0       # not the CRM's business (no contact, excluded)


@dataclass(frozen=True)
class PurgeResult:
    """What `purge` removed."""

    sources: int
    messages: int
    checkpoints: int
    raw_blobs: list[str]


#: a node row not renewed for this long is deleted (a restarted node has a new id)
NODE_ROWS_KEPT = timedelta(days=1)


def _now() -> datetime:
    return datetime.now(UTC)


def _reason(text: str | None) -> str | None:
    if text is None:
        return None
    text = text.replace("\x00", "").strip()
    return text[:REASON_MAX]


class Accounts:
    """Account runtime state on a :class:`Store` (see the module docstring)."""

    def __init__(self, store: Store) -> None:
        self.store = store

    @property
    def _pg(self) -> bool:
        return self.store.dialect == "postgresql"

    def _begin(self) -> Any:
        return self.store.engine.begin()

    async def _tx(self, fn: Callable[[AsyncConnection], Awaitable[Any]], what: str) -> Any:
        try:
            async with self._begin() as conn:
                return await fn(conn)
        except (SQLAlchemyError, OSError) as exc:
            raise self.store.error(what, exc) from exc

    # -- rows -----------------------------------------------------------------------------
    async def ensure(self, accounts: Sequence[Account]) -> None:
        """A row (status active) for every configured account that has none; emails kept current."""
        if not accounts:
            return
        now = _now()

        async def run(conn: AsyncConnection) -> None:
            rows = [{"id": a.id, "email": a.email, "status": "active", "status_at": now,
                     "created_at": now, "updated_at": now} for a in accounts]
            await conn.execute(self.store.insert(accounts_table).on_conflict_do_nothing(
                index_elements=[accounts_table.c.id]), rows)
            for a in accounts:
                await conn.execute(sa.update(accounts_table).where(
                    accounts_table.c.id == a.id, accounts_table.c.email != a.email).values(
                    email=a.email, updated_at=now))

        await self._tx(run, "cannot record the configured accounts")

    async def get(self, account_id: str) -> dict[str, Any] | None:
        """The account's row (without the token ciphertext), or None."""
        rows = await self.rows([account_id])
        return rows.get(account_id)

    async def rows(self, ids: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
        """Rows by id (all of them without `ids`), without the token ciphertext."""
        cols = [c for c in accounts_table.c if c.name not in _SECRET_COLUMNS]
        q = sa.select(*cols)
        if ids is not None:
            q = q.where(accounts_table.c.id.in_(list(ids)))

        try:
            async with self.store.engine.connect() as conn:
                return {r["id"]: dict(r) for r in (await conn.execute(q)).mappings()}
        except (SQLAlchemyError, OSError) as exc:
            raise self.store.error("cannot read accounts", exc) from exc

    async def statuses(self) -> dict[str, str]:
        """id -> status for every account row (the daemon's cheap periodic check)."""
        try:
            async with self.store.engine.connect() as conn:
                rows = await conn.execute(sa.select(accounts_table.c.id, accounts_table.c.status))
                return {i: s for i, s in rows.all()}
        except (SQLAlchemyError, OSError) as exc:
            raise self.store.error("cannot read account statuses", exc) from exc

    async def set_status(self, account_id: str, status: str, reason: str | None = None, *,
                         email: str = "", only_from: Sequence[str] | None = None) -> str | None:
        """Set the status (with the reason and the time); returns the previous status
        (None: the row was created). Becoming `needs_reconnect` enqueues the webhook
        `account.needs_reconnect` in the same transaction. With `only_from`, the change
        happens only when the current status is one of those (returned either way)."""
        if status not in ACCOUNT_STATUSES:
            raise ValueError(f"status must be one of {ACCOUNT_STATUSES}, not {status!r}")
        now = _now()

        async def run(conn: AsyncConnection) -> str | None:
            row = (await conn.execute(sa.select(accounts_table.c.status, accounts_table.c.email)
                                      .where(accounts_table.c.id == account_id))).first()
            if row is None:
                await conn.execute(sa.insert(accounts_table), [{
                    "id": account_id, "email": email, "status": status,
                    "status_reason": _reason(reason), "status_at": now, "created_at": now,
                    "updated_at": now}])
                previous, address = None, email
            else:
                previous, address = row[0], row[1]
                if only_from is not None and previous not in only_from:
                    return cast(str, previous)
                await conn.execute(sa.update(accounts_table).where(accounts_table.c.id == account_id).values(
                    status=status, status_reason=_reason(reason), status_at=now, updated_at=now))
            if status == "needs_reconnect" and previous != "needs_reconnect":
                await self.store.enqueue_webhook(conn, "account.needs_reconnect", {
                    "account": {"id": account_id, "email": address, "status": status,
                                "reason": _reason(reason), "status_at": iso(now)}}, now)
            return cast("str | None", previous)

        return cast("str | None", await self._tx(run, f"cannot set the status of {account_id}"))

    # -- accounts created at run time ---------------------------------------------------------
    async def create_runtime(self, account_id: str, email: str, definition: dict[str, Any],
                             credential: bytes | None, *, connected_email: str | None = None,
                             status: str = "active", reason: str | None = None,
                             replace: bool = False) -> None:
        """Store a new runtime account (definition JSON, credential ciphertext). An id in use
        raises Conflict, unless its row is a deleted runtime account (the id is free again:
        the old checkpoints go) or `replace` is set for a runtime account (reconnect)."""
        now = _now()

        async def run(conn: AsyncConnection) -> None:
            row = (await conn.execute(sa.select(accounts_table.c.origin, accounts_table.c.status,
                                                accounts_table.c.version)
                                      .where(accounts_table.c.id == account_id))).first()
            values = {"email": email, "status": status, "status_reason": _reason(reason),
                      "status_at": now, "updated_at": now, "origin": "runtime",
                      "definition": json.dumps(definition, sort_keys=True),
                      "credential_ciphertext": credential, "connected_email": connected_email,
                      "connected_at": now if connected_email else None,
                      "token_ciphertext": None, "token_expires_at": None}
            if row is None:
                await conn.execute(sa.insert(accounts_table).values(
                    id=account_id, created_at=now, version=1, **values))
            elif row[0] == "runtime" and (row[1] == "deleted" or replace):
                if row[1] == "deleted":
                    await conn.execute(sa.delete(sync_state_table).where(
                        sync_state_table.c.account == account_id))
                await conn.execute(sa.update(accounts_table).where(accounts_table.c.id == account_id)
                                   .values(version=int(row[2] or 0) + 1, **values))
            elif row[0] == "runtime":
                raise Conflict(f"an account {account_id!r} exists already")
            else:
                raise Conflict(f"account {account_id!r} is declared in the configuration "
                               "(gateway.yaml); change it there")
            if status == "active" and connected_email:
                await self.store.enqueue_webhook(conn, "account.connected", {
                    "account": {"id": account_id, "email": email, "status": status,
                                "connected_email": connected_email, "connected_at": iso(now)}}, now)

        await self._tx(run, f"cannot store account {account_id}")

    async def update_runtime(self, account_id: str, definition: dict[str, Any], *,
                             email: str | None = None, credential: bytes | None = None) -> None:
        """Replace a runtime account's definition (and credential, when given)."""
        now = _now()

        async def run(conn: AsyncConnection) -> None:
            row = (await conn.execute(sa.select(accounts_table.c.origin, accounts_table.c.version)
                                      .where(accounts_table.c.id == account_id))).first()
            if row is None:
                raise NotFound(f"no account {account_id!r}")
            if row[0] != "runtime":
                raise Conflict(f"account {account_id!r} is declared in the configuration "
                               "(gateway.yaml); change it there")
            values: dict[str, Any] = {"definition": json.dumps(definition, sort_keys=True),
                                      "updated_at": now, "version": int(row[1] or 0) + 1}
            if email is not None:
                values["email"] = email
            if credential is not None:
                values["credential_ciphertext"] = credential
                values["token_ciphertext"] = None
                values["token_expires_at"] = None
            await conn.execute(sa.update(accounts_table).where(accounts_table.c.id == account_id)
                               .values(**values))

        await self._tx(run, f"cannot change account {account_id}")

    async def reconnected(self, account_id: str, credential: bytes, connected_email: str) -> str | None:
        """A new refresh token for an account (runtime, or declared without a refresh token
        file): stored, the cached access token dropped, status active, `account.connected`
        enqueued. Returns the previous status."""
        now = _now()

        async def run(conn: AsyncConnection) -> str | None:
            row = (await conn.execute(sa.select(accounts_table.c.status, accounts_table.c.email,
                                                accounts_table.c.version)
                                      .where(accounts_table.c.id == account_id))).first()
            if row is None:
                raise NotFound(f"no account {account_id!r}")
            await conn.execute(sa.update(accounts_table).where(accounts_table.c.id == account_id).values(
                credential_ciphertext=credential, token_ciphertext=None, token_expires_at=None,
                connected_email=connected_email, connected_at=now, status="active",
                status_reason=None, status_at=now, updated_at=now, version=int(row[2] or 0) + 1))
            await self.store.enqueue_webhook(conn, "account.connected", {
                "account": {"id": account_id, "email": row[1], "status": "active",
                            "connected_email": connected_email, "connected_at": iso(now),
                            "reconnected": row[0] == "needs_reconnect"}}, now)
            return cast("str | None", row[0])

        return cast("str | None", await self._tx(run, f"cannot reconnect account {account_id}"))

    async def runtime_version(self) -> tuple[int, int]:
        """(sum of versions, rows) of the runtime accounts: changes when any of them does."""
        try:
            async with self.store.engine.connect() as conn:
                row = (await conn.execute(sa.select(
                    sa.func.coalesce(sa.func.sum(accounts_table.c.version), 0), sa.func.count())
                    .where(accounts_table.c.origin == "runtime"))).one()
        except (SQLAlchemyError, OSError) as exc:
            raise self.store.error("cannot read account versions", exc) from exc
        return int(row[0]), int(row[1])

    async def runtime_accounts(self) -> list[StoredAccount]:
        """Every runtime account (deleted ones too), with its encrypted credential."""
        c = accounts_table.c
        try:
            async with self.store.engine.connect() as conn:
                rows = (await conn.execute(sa.select(
                    c.id, c.email, c.status, c.definition, c.version, c.credential_ciphertext,
                    c.connected_email).where(c.origin == "runtime").order_by(c.id))).all()
        except (SQLAlchemyError, OSError) as exc:
            raise self.store.error("cannot read accounts", exc) from exc
        out = []
        for r in rows:
            try:
                definition = json.loads(r[3]) if r[3] else {}
            except ValueError:
                definition = {}
            out.append(StoredAccount(id=r[0], email=r[1], status=r[2],
                                     definition=definition if isinstance(definition, dict) else {},
                                     version=int(r[4] or 0),
                                     credential=bytes(r[5]) if r[5] is not None else None,
                                     connected_email=r[6]))
        return out

    async def credential(self, account_id: str) -> bytes | None:
        """The encrypted credential of an account (runtime, or connected through a link)."""
        try:
            async with self.store.engine.connect() as conn:
                row = (await conn.execute(sa.select(accounts_table.c.credential_ciphertext)
                                          .where(accounts_table.c.id == account_id))).first()
        except (SQLAlchemyError, OSError) as exc:
            raise self.store.error("cannot read an account credential", exc) from exc
        return bytes(row[0]) if row is not None and row[0] is not None else None

    async def mark_deleted(self, account_id: str, reason: str) -> str | None:
        """Status deleted (sync stops, history kept), version bumped, `account.deleted`
        enqueued; returns the previous status (None: no such account)."""
        now = _now()

        async def run(conn: AsyncConnection) -> str | None:
            row = (await conn.execute(sa.select(accounts_table.c.status, accounts_table.c.email,
                                                accounts_table.c.version, accounts_table.c.origin)
                                      .where(accounts_table.c.id == account_id))).first()
            if row is None:
                return None
            await conn.execute(sa.update(accounts_table).where(accounts_table.c.id == account_id).values(
                status="deleted", status_reason=_reason(reason), status_at=now, updated_at=now,
                version=int(row[2] or 0) + 1,
                credential_ciphertext=None if row[3] == "runtime" else accounts_table.c.credential_ciphertext,
                token_ciphertext=None, token_expires_at=None))
            if row[0] != "deleted":
                await self.store.enqueue_webhook(conn, "account.deleted", {
                    "account": {"id": account_id, "email": row[1], "status": "deleted",
                                "reason": _reason(reason), "status_at": iso(now)}}, now)
            return cast("str | None", row[0])

        return cast("str | None", await self._tx(run, f"cannot delete account {account_id}"))

    # -- connect links ----------------------------------------------------------------------
    async def create_link(self, link: dict[str, Any]) -> None:
        await self._tx(lambda conn: conn.execute(sa.insert(connect_links_table).values(**link)),
                       "cannot store a connect link")

    async def link(self, link_id: str) -> dict[str, Any] | None:
        try:
            async with self.store.engine.connect() as conn:
                row = (await conn.execute(sa.select(connect_links_table).where(
                    connect_links_table.c.id == link_id))).mappings().first()
        except (SQLAlchemyError, OSError) as exc:
            raise self.store.error("cannot read a connect link", exc) from exc
        return dict(row) if row is not None else None

    async def open_link(self, link_id: str, flow: bytes) -> bool:
        """Record the authorization starting for an unused, unexpired link (the PKCE verifier
        and nonce, encrypted); False when the link is used or expired by now."""
        now = _now()
        t = connect_links_table.c

        async def run(conn: AsyncConnection) -> bool:
            res = await conn.execute(sa.update(connect_links_table).where(
                t.id == link_id, t.used_at.is_(None),
                t.expires_at > sa.literal(now, t.expires_at.type)).values(
                flow_ciphertext=flow, opened_at=now))
            return bool(res.rowcount == 1)

        return cast(bool, await self._tx(run, "cannot update a connect link"))

    async def use_link(self, link_id: str) -> bool:
        """Mark the link used, once: True for the one caller that did it (single use)."""
        now = _now()
        t = connect_links_table.c

        async def run(conn: AsyncConnection) -> bool:
            res = await conn.execute(sa.update(connect_links_table).where(
                t.id == link_id, t.used_at.is_(None)).values(used_at=now))
            return bool(res.rowcount == 1)

        return cast(bool, await self._tx(run, "cannot update a connect link"))

    async def finish_link(self, link_id: str, result: str, detail: str | None = None,
                          account_id: str | None = None) -> None:
        """The outcome of a link's flow (connected, refused, mismatch, ...); the flow secrets go."""
        async def run(conn: AsyncConnection) -> None:
            await conn.execute(sa.update(connect_links_table).where(
                connect_links_table.c.id == link_id).values(
                result=result, result_detail=_reason(detail), result_account=account_id,
                flow_ciphertext=None))

        await self._tx(run, "cannot update a connect link")

    async def prune_links(self, older_than: timedelta) -> int:
        cutoff = _now() - older_than

        async def run(conn: AsyncConnection) -> int:
            expires = connect_links_table.c.expires_at
            res = await conn.execute(sa.delete(connect_links_table).where(
                expires < sa.literal(cutoff, expires.type)))
            return int(res.rowcount or 0)

        return cast(int, await self._tx(run, "cannot prune connect links"))

    # -- checkpoints ----------------------------------------------------------------------
    async def checkpoint(self, account_id: str, folder: str) -> Checkpoint | None:
        try:
            async with self.store.engine.connect() as conn:
                r = (await conn.execute(sa.select(sync_state_table).where(
                    sync_state_table.c.account == account_id,
                    sync_state_table.c.folder == folder))).mappings().first()
        except (SQLAlchemyError, OSError) as exc:
            raise self.store.error("cannot read a sync checkpoint", exc) from exc
        if r is None:
            return None
        return Checkpoint(folder=folder, uidvalidity=r["uidvalidity"], last_uid=int(r["last_uid"]),
                          highestmodseq=r["highestmodseq"], backfill_uid=r["backfill_uid"],
                          initial_done=bool(r["initial_done"]))

    def save_checkpoint(self, account_id: str, cp: Checkpoint, *, run_id: int | None = None,
                        counts: RunCounts | None = None) -> ConnCallback:
        """A `then` callback for `Store.store_messages`: writes the checkpoint (and the
        progress of the sync run, and ``last_sync_at``) in the messages' transaction."""
        async def run(conn: AsyncConnection) -> None:
            now = _now()
            values = {"uidvalidity": cp.uidvalidity, "last_uid": cp.last_uid,
                      "highestmodseq": cp.highestmodseq, "backfill_uid": cp.backfill_uid,
                      "initial_done": cp.initial_done, "updated_at": now}
            stmt = self.store.insert(sync_state_table).values(account=account_id, folder=cp.folder, **values)
            await conn.execute(stmt.on_conflict_do_update(
                index_elements=[sync_state_table.c.account, sync_state_table.c.folder], set_=values))
            if run_id is not None and counts is not None:
                await conn.execute(sa.update(sync_runs_table).where(sync_runs_table.c.id == run_id).values(
                    fetched=counts.fetched, stored=counts.stored, skipped=counts.skipped))
            await conn.execute(sa.update(accounts_table).where(accounts_table.c.id == account_id)
                               .values(last_sync_at=now))
        return run

    async def write_checkpoint(self, account_id: str, cp: Checkpoint) -> None:
        await self._tx(self.save_checkpoint(account_id, cp), "cannot write a sync checkpoint")

    async def forget_folders(self, account_id: str, keep: Sequence[str]) -> int:
        """Drop checkpoints of folders no longer synced (so a folder added again starts over)."""
        async def run(conn: AsyncConnection) -> int:
            res = await conn.execute(sa.delete(sync_state_table).where(
                sync_state_table.c.account == account_id, sync_state_table.c.folder.not_in(list(keep))))
            return int(res.rowcount or 0)

        return cast(int, await self._tx(run, "cannot update sync checkpoints"))

    # -- sync runs ------------------------------------------------------------------------
    async def start_run(self, account_id: str, folder: str, kind: str) -> int:
        """Insert a run in state `running`; returns its id."""
        async def run(conn: AsyncConnection) -> int:
            res = await conn.execute(sa.insert(sync_runs_table).values(
                account=account_id, folder=folder, kind=kind, started_at=_now(), status="running",
                fetched=0, stored=0, skipped=0).returning(sync_runs_table.c.id))
            return int(res.scalar_one())

        return cast(int, await self._tx(run, "cannot record a sync run"))

    async def finish_run(self, run_id: int, counts: RunCounts, error: str | None = None) -> None:
        async def run(conn: AsyncConnection) -> None:
            await conn.execute(sa.update(sync_runs_table).where(sync_runs_table.c.id == run_id).values(
                finished_at=_now(), status="error" if error else "ok", fetched=counts.fetched,
                stored=counts.stored, skipped=counts.skipped, error=_reason(error)))

        await self._tx(run, "cannot record a sync run")

    async def record_run(self, account_id: str, folder: str, kind: str, started_at: datetime,
                         counts: RunCounts, error: str | None = None) -> None:
        """Insert a finished run at once (a tail pass, a failed connection)."""
        async def run(conn: AsyncConnection) -> None:
            await conn.execute(sa.insert(sync_runs_table).values(
                account=account_id, folder=folder, kind=kind, started_at=started_at,
                finished_at=_now(), status="error" if error else "ok", fetched=counts.fetched,
                stored=counts.stored, skipped=counts.skipped, error=_reason(error)))

        await self._tx(run, "cannot record a sync run")

    async def interrupt_runs(self, account_id: str, why: str) -> int:
        """Runs of this account still `running` (their node stopped or lost the lease) -> error."""
        async def run(conn: AsyncConnection) -> int:
            res = await conn.execute(sa.update(sync_runs_table).where(
                sync_runs_table.c.account == account_id, sync_runs_table.c.status == "running").values(
                status="error", finished_at=_now(), error=_reason(why)))
            return int(res.rowcount or 0)

        return cast(int, await self._tx(run, "cannot update sync runs"))

    async def prune_runs(self, older_than: timedelta) -> int:
        """Delete finished runs older than that (the history is for support, not forever)."""
        cutoff = _now() - older_than

        async def run(conn: AsyncConnection) -> int:
            res = await conn.execute(sa.delete(sync_runs_table).where(sync_runs_table.c.started_at < cutoff,
                                                            sync_runs_table.c.status != "running"))
            return int(res.rowcount or 0)

        return cast(int, await self._tx(run, "cannot prune sync runs"))

    # -- leases ---------------------------------------------------------------------------
    async def acquire_lease(self, account_id: str, owner: str, ttl: float) -> bool:
        """Take or renew this node's lease on the mailbox; False when another node holds it."""
        return account_id in await self.acquire_leases([account_id], owner, ttl)

    async def acquire_leases(self, account_ids: Sequence[str], owner: str,
                             ttl: float) -> set[str]:
        """Take or renew this node's leases on these mailboxes, one atomic UPDATE per
        chunk of ids (a node with a thousand mailboxes renews them in a few statements, not
        a thousand transactions); returns the ids this node holds now."""
        if not account_ids:
            return set()
        if self._pg:
            now: Any = sa.func.now()
            until: Any = sa.func.now() + sa.literal(timedelta(seconds=ttl), sa.Interval())
        else:
            t = _now()
            now = sa.literal(t, accounts_table.c.lease_expires_at.type)
            until = t + timedelta(seconds=ttl)
        free = sa.or_(accounts_table.c.lease_owner == owner, accounts_table.c.lease_owner.is_(None),
                      accounts_table.c.lease_expires_at.is_(None),
                      accounts_table.c.lease_expires_at < now)

        async def run(conn: AsyncConnection) -> set[str]:
            got: set[str] = set()
            for chunk in chunks(sorted(set(account_ids))):
                res = await conn.execute(
                    sa.update(accounts_table).where(accounts_table.c.id.in_(chunk), free)
                    .values(lease_owner=owner, lease_expires_at=until)
                    .returning(accounts_table.c.id))
                got.update(res.scalars())
            return got

        return cast(set[str], await self._tx(run, f"cannot take leases for {owner}"))

    async def release_lease(self, account_id: str, owner: str) -> None:
        """Give the lease up at once (a clean stop), so another node may take over."""
        async def run(conn: AsyncConnection) -> None:
            await conn.execute(sa.update(accounts_table).where(
                accounts_table.c.id == account_id, accounts_table.c.lease_owner == owner).values(
                lease_owner=None, lease_expires_at=None))

        await self._tx(run, f"cannot release the lease on {account_id}")

    # -- nodes ----------------------------------------------------------------------------
    async def heartbeat(self, node_id: str, *, hostname: str, pid: int, within: float) -> list[str]:
        """Say this node is alive, and return the ids of the nodes heard from within
        `within` seconds (this one included), by the database's clock on PostgreSQL so that
        the nodes' own clocks do not matter."""
        async def run(conn: AsyncConnection) -> list[str]:
            now = await self._db_now(conn)
            stmt = self.store.insert(nodes_table).values(id=node_id, hostname=hostname, pid=pid,
                                                         started_at=now, heartbeat_at=now)
            await conn.execute(stmt.on_conflict_do_update(index_elements=[nodes_table.c.id],
                                                          set_={"heartbeat_at": now}))
            rows = await conn.execute(sa.select(nodes_table.c.id).where(
                nodes_table.c.heartbeat_at >= now - timedelta(seconds=within)))
            # nodes not heard from for a day are gone for good (each start is a new id)
            await conn.execute(sa.delete(nodes_table).where(
                nodes_table.c.heartbeat_at < now - NODE_ROWS_KEPT))
            return sorted({node_id, *rows.scalars()})

        return cast(list[str], await self._tx(run, "cannot record the node's heartbeat"))

    async def forget_node(self, node_id: str) -> None:
        """A clean stop: the node's row goes, so the others take its mailboxes at once."""
        await self._tx(lambda conn: conn.execute(sa.delete(nodes_table).where(
            nodes_table.c.id == node_id)), "cannot remove the node's heartbeat")

    async def nodes(self) -> list[dict[str, Any]]:
        """Every node row, with the mailboxes whose lease it holds now."""
        async def run(conn: AsyncConnection) -> list[dict[str, Any]]:
            now = await self._db_now(conn)
            held: dict[str, list[str]] = {}
            for aid, owner in (await conn.execute(
                    sa.select(accounts_table.c.id, accounts_table.c.lease_owner).where(
                        accounts_table.c.lease_owner.is_not(None),
                        accounts_table.c.lease_expires_at >= now)
                    .order_by(accounts_table.c.id))).all():
                held.setdefault(owner, []).append(aid)
            rows = (await conn.execute(sa.select(nodes_table).order_by(nodes_table.c.id))).mappings()
            return [{"id": r["id"], "hostname": r["hostname"], "pid": r["pid"],
                     "started_at": iso(r["started_at"]), "heartbeat_at": iso(r["heartbeat_at"]),
                     "heartbeat_age": round((now - r["heartbeat_at"]).total_seconds(), 1),
                     "accounts": held.get(r["id"], [])} for r in rows]

        return cast(list[dict[str, Any]], await self._tx(run, "cannot read the nodes"))

    async def _db_now(self, conn: AsyncConnection) -> datetime:
        if not self._pg:
            return _now()
        t = (await conn.execute(sa.select(sa.func.now()))).scalar_one()
        return t.astimezone(UTC)

    # -- purge ----------------------------------------------------------------------------
    async def purge(self, account_id: str) -> PurgeResult:
        """Remove the account's stored mail: its IMAP sources, the messages left with no
        source at all (with their events and links), its checkpoints, and raw bytes no
        other message shares. Mail the gateway relayed or ingested keeps its other sources."""
        async def run(conn: AsyncConnection) -> PurgeResult:
            where = sa.and_(sources_table.c.source == "imap", sources_table.c.account == account_id)
            pks = sorted({pk for (pk,) in (await conn.execute(
                sa.select(sources_table.c.message_pk).where(where))).all()})
            n_sources = int((await conn.execute(sa.delete(sources_table).where(where))).rowcount or 0)
            orphans: dict[int, str | None] = {}
            has_source = sa.exists().where(sources_table.c.message_pk == messages_table.c.id)
            for chunk in chunks(pks):
                rows = await conn.execute(sa.select(messages_table.c.id, messages_table.c.raw_sha256).where(
                    messages_table.c.id.in_(chunk), ~has_source))
                orphans.update({pk: digest for pk, digest in rows.all()})
            ids = sorted(orphans)
            n_messages = 0
            for chunk in chunks(ids):
                res = await conn.execute(sa.delete(messages_table).where(messages_table.c.id.in_(chunk)))
                n_messages += int(res.rowcount or 0)
            digests = sorted({d for d in orphans.values() if d})
            still: set[str] = set()
            for chunk in chunks(digests):
                found = await conn.execute(sa.select(messages_table.c.raw_sha256).where(
                    messages_table.c.raw_sha256.in_(chunk)))
                still.update(d for (d,) in found.all() if d)
            unused = [d for d in digests if d not in still]
            for chunk in chunks(unused):
                await conn.execute(sa.delete(raw_table).where(raw_table.c.sha256.in_(chunk)))
            n_state = int((await conn.execute(sa.delete(sync_state_table).where(
                sync_state_table.c.account == account_id))).rowcount or 0)
            return PurgeResult(sources=n_sources, messages=n_messages, checkpoints=n_state,
                               raw_blobs=unused)

        result = cast(PurgeResult, await self._tx(run, f"cannot purge account {account_id}"))
        if result.raw_blobs and self.store.raw.on_disk:
            await self.store.raw.delete_files(result.raw_blobs)
        return result

    # -- reading: CLI and API ---------------------------------------------------------------
    async def overview(self, configured: Sequence[Account]) -> list[dict[str, Any]]:
        """Every account in force (declared, and created at run time: `configured` is the
        registry's list), and any deleted but still in the store, with its status, reason,
        last sync, folders and how many stored messages its mailbox holds: the rows of
        `mailgw accounts list` and `/api/v1/accounts`."""
        rows = await self.rows()
        counts = await self._message_counts()
        last = await self._last_runs()
        today = await self.daily_figures()
        out: list[dict[str, Any]] = []
        seen: set[str] = set()
        for a in configured:
            seen.add(a.id)
            out.append(_account_dict(a, rows.get(a.id), counts.get(a.id, 0)))
        for aid in sorted(set(rows) - seen):
            out.append(_account_dict(None, rows[aid], counts.get(aid, 0)))
        for d in out:
            d["last_run"] = last.get(d["id"])
            d["today"] = today.get(d["id"]) or _no_figures(today)
        return out

    async def daily_figures(self, ids: Sequence[str] | None = None, *,
                            now: datetime | None = None) -> dict[str, dict[str, Any]]:
        """Today's figures per account, as a sync dashboard shows them, from one grouped
        query for every account: ``synced`` (messages the sync stored or saw in the mailbox
        today), ``linked`` (of those, the ones linked to a contact), ``sent`` and ``received``
        (outbound and inbound messages of the account dated today: by Date header, else by
        when stored). "Today" is the UTC day of `now` (mailgw has no time zone setting).
        Accounts with nothing today are left out; ``{"date": ...}`` is under ``""``."""
        now = now or _now()
        start = datetime(now.year, now.month, now.day, tzinfo=UTC)
        end = start + timedelta(days=1)
        s, m = sources_table.c, messages_table.c
        dated = sa.and_(sort_at >= start, sort_at < end)
        seen_today = sa.and_(s.at >= start, s.at < end)
        synced = sa.case((sa.and_(s.source == "imap", seen_today), 1), else_=0)
        # (account, message) pairs that can count today: seen today, or dated today
        pairs = sa.union_all(
            sa.select(s.account.label("account"), s.message_pk.label("pk"), synced.label("synced"))
            .where(s.account.is_not(None), sa.or_(seen_today, s.message_pk.in_(
                sa.select(m.id).where(dated)))),
            sa.select(m.account, m.id, sa.literal(0, sa.Integer))
            .where(m.account.is_not(None), dated)).subquery()
        linked = sa.exists().where(message_contacts_table.c.message_pk == pairs.c.pk)
        q = (sa.select(
            pairs.c.account,
            sa.func.count(sa.distinct(sa.case((pairs.c.synced == 1, pairs.c.pk)))),
            sa.func.count(sa.distinct(sa.case((sa.and_(pairs.c.synced == 1, linked), pairs.c.pk)))),
            sa.func.count(sa.distinct(sa.case((sa.and_(m.direction == "outbound", dated), pairs.c.pk)))),
            sa.func.count(sa.distinct(sa.case((sa.and_(m.direction == "inbound", dated), pairs.c.pk)))))
            .select_from(pairs.join(messages_table, m.id == pairs.c.pk))
            .group_by(pairs.c.account))
        if ids is not None:
            q = q.where(pairs.c.account.in_(list(ids)))
        try:
            async with self.store.engine.connect() as conn:
                rows = (await conn.execute(q)).all()
        except (SQLAlchemyError, OSError) as exc:
            raise self.store.error("cannot count today's messages", exc) from exc
        day = start.date().isoformat()
        out: dict[str, dict[str, Any]] = {"": {"date": day}}
        for account, n_synced, n_linked, n_sent, n_received in rows:
            out[account] = {"date": day, "synced": int(n_synced), "linked": int(n_linked),
                            "sent": int(n_sent), "received": int(n_received)}
        return out

    async def _last_runs(self) -> dict[str, dict[str, Any]]:
        """The latest sync run of every account (its error, if it failed, is the last error)."""
        latest = (sa.select(sa.func.max(sync_runs_table.c.id)).group_by(sync_runs_table.c.account)
                  .scalar_subquery())
        try:
            async with self.store.engine.connect() as conn:
                rows = (await conn.execute(sa.select(sync_runs_table)
                                           .where(sync_runs_table.c.id.in_(latest)))).mappings()
                return {r["account"]: _run_dict(r) for r in rows}
        except (SQLAlchemyError, OSError) as exc:
            raise self.store.error("cannot read sync runs", exc) from exc

    async def sync_info(self, account_id: str, *, configured: Account | None = None,
                        runs: int = 20) -> dict[str, Any]:
        """Per folder: checkpoint, last sync, stored messages, last run; totals; the recent
        runs and recent errors (`mailgw sync status ID`, `/api/v1/accounts/{id}/sync`).
        Raises NotFound for an account neither configured nor in the store."""
        try:
            async with self.store.engine.connect() as conn:
                row = (await conn.execute(sa.select(*[c for c in accounts_table.c
                                                      if c.name not in _SECRET_COLUMNS])
                                          .where(accounts_table.c.id == account_id))).mappings().first()
                if row is None and configured is None:
                    raise NotFound(f"no account {account_id!r} (not configured, never synced)")
                states = (await conn.execute(sa.select(sync_state_table).where(
                    sync_state_table.c.account == account_id)
                    .order_by(sync_state_table.c.folder))).mappings().all()
                per_folder: dict[str | None, int] = dict((await conn.execute(
                    sa.select(sources_table.c.folder,
                              sa.func.count(sa.distinct(sources_table.c.message_pk)))
                    .where(sources_table.c.source == "imap", sources_table.c.account == account_id)
                    .group_by(sources_table.c.folder))).all())
                total_msgs = (await conn.execute(
                    sa.select(sa.func.count(sa.distinct(sources_table.c.message_pk)))
                    .where(sources_table.c.source == "imap", sources_table.c.account == account_id))).scalar()
                totals = (await conn.execute(sa.select(
                    sa.func.count(), sa.func.coalesce(sa.func.sum(sync_runs_table.c.fetched), 0),
                    sa.func.coalesce(sa.func.sum(sync_runs_table.c.stored), 0),
                    sa.func.coalesce(sa.func.sum(sync_runs_table.c.skipped), 0),
                    sa.func.count(sa.case((sync_runs_table.c.status == "error", 1))),
                ).where(sync_runs_table.c.account == account_id))).one()
                newest_first = (sync_runs_table.c.started_at.desc(), sync_runs_table.c.id.desc())
                recent = (await conn.execute(sa.select(sync_runs_table)
                                             .where(sync_runs_table.c.account == account_id)
                                             .order_by(*newest_first)
                                             .limit(runs))).mappings().all()
                errors = (await conn.execute(sa.select(sync_runs_table).where(
                    sync_runs_table.c.account == account_id, sync_runs_table.c.status == "error")
                    .order_by(*newest_first).limit(5))).mappings().all()
                last_runs: dict[str, dict[str, Any]] = {}
                for s in states:
                    r = (await conn.execute(sa.select(sync_runs_table).where(
                        sync_runs_table.c.account == account_id, sync_runs_table.c.folder == s["folder"])
                        .order_by(sync_runs_table.c.started_at.desc(), sync_runs_table.c.id.desc()).limit(1))
                    ).mappings().first()
                    if r is not None:
                        last_runs[s["folder"]] = _run_dict(r)
        except (SQLAlchemyError, OSError) as exc:
            raise self.store.error("cannot read sync status", exc) from exc
        info = _account_dict(configured, dict(row) if row is not None else None, int(total_msgs or 0))
        info["last_run"] = _run_dict(recent[0]) if recent else None
        info["folders_synced"] = [{
            "folder": s["folder"], "uidvalidity": s["uidvalidity"], "last_uid": s["last_uid"],
            "highestmodseq": s["highestmodseq"], "initial_done": bool(s["initial_done"]),
            "backfill_uid": s["backfill_uid"], "last_sync_at": iso(s["updated_at"]),
            "messages": int(per_folder.get(s["folder"], 0)),
            "last_run": last_runs.get(s["folder"]),
        } for s in states]
        info["totals"] = {"runs": int(totals[0]), "fetched": int(totals[1]),
                          "stored": int(totals[2]), "skipped": int(totals[3]),
                          "errors": int(totals[4]), "messages": int(total_msgs or 0)}
        info["recent_runs"] = [_run_dict(r) for r in recent]
        info["recent_errors"] = [_run_dict(r) for r in errors]
        today = await self.daily_figures([account_id])
        info["today"] = today.get(account_id) or _no_figures(today)
        return info

    async def _message_counts(self) -> dict[str, int]:
        try:
            async with self.store.engine.connect() as conn:
                rows = await conn.execute(
                    sa.select(sources_table.c.account, sa.func.count(sa.distinct(sources_table.c.message_pk)))
                    .where(sources_table.c.source == "imap").group_by(sources_table.c.account))
                return {a: int(n) for a, n in rows.all() if a is not None}
        except (SQLAlchemyError, OSError) as exc:
            raise self.store.error("cannot count messages", exc) from exc


def _no_figures(today: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The daily figures of an account with nothing today."""
    return {"date": today[""]["date"], "synced": 0, "linked": 0, "sent": 0, "received": 0}


def _account_dict(a: Account | None, row: dict[str, Any] | None, messages: int) -> dict[str, Any]:
    """One account as `accounts list --json` and the API show it (`a`: the account in force,
    declared or created at run time; None for a row only the store still knows)."""
    r = row or {}
    out: dict[str, Any] = {
        "id": a.id if a is not None else r.get("id"),
        "email": a.email if a is not None else r.get("email", ""),
        # declared in gateway.yaml (as opposed to created at run time, or only in the store)
        "configured": a is not None and a.origin == "config",
        "origin": a.origin if a is not None else r.get("origin") or "config",
        "provider": a.provider if a is not None else None,
        "auth_method": a.auth.method if a is not None else None,
        "oauth_provider": (a.oauth_provider_name if a is not None else None),
        "service_account": a.auth.service_account if a is not None else None,
        "direction": a.sync.direction if a is not None else None,
        "enabled": a.sync.enabled if a is not None else None,
        "folders": list(a.sync.folders) if a is not None else [],
        "history_days": a.sync.history_days if a is not None else None,
        "send_as": list(a.send_as) if a is not None else [],
        "shared": a.shared if a is not None else False,
        "assign": a.assign.model_dump(mode="json") if a is not None and a.shared else None,
        # runtime state; an account the daemon has not seen yet is "active" (as it will be)
        "status": r.get("status") or "active",
        "reason": r.get("status_reason"),
        "status_at": iso(r.get("status_at")),
        "connected_email": r.get("connected_email"),
        "connected_at": iso(r.get("connected_at")),
        "last_sync_at": iso(r.get("last_sync_at")),
        "lease_owner": r.get("lease_owner"),
        "lease_expires_at": iso(r.get("lease_expires_at")),
        "messages": messages,
    }
    return out


def _run_dict(r: Any) -> dict[str, Any]:
    started, finished = r["started_at"], r["finished_at"]
    return {"id": r["id"], "folder": r["folder"], "kind": r["kind"], "status": r["status"],
            "started_at": iso(started), "finished_at": iso(finished),
            "seconds": round((finished - started).total_seconds(), 3) if finished and started else None,
            "fetched": r["fetched"], "stored": r["stored"], "skipped": r["skipped"],
            "error": r["error"]}


class DBTokenStore:
    """The OAuth2 `TokenStore` on the ``accounts`` table (ciphertext and expiry only)."""

    def __init__(self, store: Store) -> None:
        self.store = store

    async def load(self, account_id: str) -> EncryptedToken | None:
        try:
            async with self.store.engine.connect() as conn:
                row = (await conn.execute(sa.select(accounts_table.c.token_ciphertext,
                                                    accounts_table.c.token_expires_at)
                                          .where(accounts_table.c.id == account_id))).first()
        except (SQLAlchemyError, OSError) as exc:
            raise self.store.error("cannot read an OAuth2 token", exc) from exc
        if row is None or row[0] is None:
            return None
        expires = row[1].timestamp() if row[1] is not None else 0.0
        return EncryptedToken(bytes(row[0]), expires)

    async def save(self, account_id: str, ciphertext: bytes, expires_at: float) -> None:
        now = _now()
        when = datetime.fromtimestamp(expires_at, UTC)
        values = {"token_ciphertext": ciphertext, "token_expires_at": when, "updated_at": now}
        stmt = self.store.insert(accounts_table).values(id=account_id, email="", status="active",
                                                    status_at=now, created_at=now, **values)
        try:
            async with self.store.engine.begin() as conn:
                await conn.execute(stmt.on_conflict_do_update(index_elements=[accounts_table.c.id],
                                                              set_=values))
        except (SQLAlchemyError, OSError) as exc:
            raise self.store.error("cannot save an OAuth2 token", exc) from exc
