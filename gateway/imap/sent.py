"""Copies of mail sent through the gateway, APPENDed to the account's Sent folder: durable, retried.

    if SentCopies.wanted(account, via_account_smtp=route_was_the_accounts_smtp):
        await app.sent_copies.enqueue(account.id, original_bytes)   # fsynced when it returns

When to call `enqueue` (the relay): after the submitted message is safely in the spool
(the client got its 250), once per submitted message, with the bytes as the user
submitted them and the gateway accepted them (trace header, Message-ID and Date added,
`Bcc:` removed) — the untracked original, never a per-recipient copy with tracking
links and pixel. `wanted()` says whether the account wants one: it must have an IMAP
server and be synced (`sync.enabled`), and the copy is skipped only when the message
left through the account's own SMTP upstream (`delivery.route: account`) and that
provider files submitted mail in Sent by itself (`Account.saves_sent()`: Gmail,
Microsoft 365, Outlook.com and Yahoo do; iCloud, Zoho and plain IMAP servers do not;
`accounts[].smtp.saves_sent` overrides). Mail that left through a smarthost or direct MX
never passed the provider, so it always gets a copy. `direction: one-way` accounts get
copies too: one-way means nothing is imported automatically, not that the mailbox is
left without a record of what the rep sent.

Durability: the queue is a `gateway.dirqueue.DirQueue` under ``<state_dir>/sent-copies``:
`enqueue` writes ``tmp/<id>``, fsyncs, renames it into ``new/`` and fsyncs the directory
before it returns, so a copy survives a crash or `kill -9`. A worker APPENDs each copy
(flag ``\\Seen``, internal date from the ``Date:`` header) to the folder "Sent" resolves
to through SPECIAL-USE, and deletes the file only after the server's OK. Before appending
it searches the Sent folder for the Message-ID, so a copy whose APPEND succeeded just
before a crash is not appended twice.

Failures: network trouble and temporary refusals (RFC 5530 UNAVAILABLE, OVERQUOTA, ...)
are retried per account with capped exponential backoff and jitter; copies older than
`give_up_after` (3 days) are then given up. Credentials refused: the account is marked
`needs_reconnect` (webhook) and its copies wait. Accounts disabled, needing reconnection or
with `sync.enabled: false` keep their copies waiting. Permanent errors (APPEND refused
with NO, e.g. [TOOBIG]; no Sent folder; the account deleted or gone from the config)
move the copy to ``failed/`` with a ``.reason`` file beside it, logged, never deleted.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from gateway.aio import wait_event
from gateway.config import Account, Config
from gateway.dirqueue import DirQueue
from gateway.errors import (
    AccountAuthError,
    AccountUnavailable,
    FolderError,
    IMAPCommandError,
    NotFound,
    StoreError,
)
from gateway.ids import new_queue_id
from gateway.imap import protocol
from gateway.imap.backoff import Backoff
from gateway.imap.client import IMAPClient
from gateway.imap.slots import ConnectionSlots
from gateway.mail.dates import parse_rfc_date
from gateway.mail.parse import header_value

if TYPE_CHECKING:
    from gateway.crm.accounts import Accounts

__all__ = ["SentCopies"]

MAGIC = b"MAILGW-SENT 1 "
#: server responses to APPEND that are worth another try later
_TEMPORARY = ("OVERQUOTA", "UNAVAILABLE", "SERVERBUG", "INUSE", "LIMIT", "CONTACTADMIN")


class SentCopies:
    """The durable Sent-copy queue and its worker (see the module docstring)."""

    def __init__(self, directory: Path, get_config: Callable[[], Config],
                 opener: Callable[[Account], Awaitable[IMAPClient]], slots: ConnectionSlots,
                 accounts: Accounts | None, *, log: Any = None, retry_min: float = 5.0,
                 retry_max: float = 3600.0, give_up_after: float = 3 * 86400.0,
                 hold_check: float = 60.0) -> None:
        self.dir = directory
        #: new/ holds the queued copies, failed/ the given-up ones (each with a .reason file)
        self.queue = DirQueue(directory, ("new", "failed"), corrupt="failed", dir_mode=0o750,
                              keep_dirs_open=False)
        self.get_config = get_config
        self.opener = opener
        self.slots = slots
        self.accounts = accounts
        self.log = log or structlog.get_logger("mailgw.imap")
        self.retry_min = retry_min
        self.retry_max = retry_max
        self.give_up_after = give_up_after
        self.hold_check = hold_check
        self.appended = 0
        self.failed = 0
        self._backoff: dict[str, Backoff] = {}
        self._due: dict[str, float] = {}
        self._busy: dict[str, asyncio.Task[None]] = {}
        self._wake = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None

    # -- deciding and enqueueing --------------------------------------------------------------
    @staticmethod
    def wanted(account: Account, *, via_account_smtp: bool) -> bool:
        """Should mail sent as this account get a copy in its Sent folder?"""
        if account.imap_endpoint() is None or not account.sync.enabled:
            return False
        return not (via_account_smtp and account.saves_sent())

    def setup(self) -> None:
        self.queue.setup()

    async def enqueue(self, account_id: str, raw: bytes) -> str:
        """Queue a copy durably (fsynced before this returns); returns its id."""
        if not account_id or any(c in account_id for c in "\r\n/\x00"):
            raise ValueError(f"bad account id {account_id!r}")
        qid = new_queue_id()
        await asyncio.to_thread(self._write, qid, account_id, raw)
        self._wake.set()
        return qid

    def _write(self, qid: str, account_id: str, raw: bytes) -> None:
        self.setup()
        self.queue.write("new", qid, MAGIC + account_id.encode() + b"\n" + raw)

    def _read(self, qid: str) -> tuple[str, bytes] | None:
        """(account id, message bytes); None if the file is gone; ValueError if unreadable."""
        try:
            data = self.queue.read("new", qid)
        except NotFound:
            return None
        if not data.startswith(MAGIC) or b"\n" not in data:
            raise ValueError("not a sent-copy file")
        head, _, raw = data.partition(b"\n")
        return head[len(MAGIC):].decode("utf-8", "replace"), raw

    def pending(self) -> dict[str, list[str]]:
        """Queued copies: account id -> ids, oldest first."""
        out: dict[str, list[str]] = {}
        for qid in self.queue.names("new"):
            try:
                with open(self.queue.path("new", qid), "rb") as f:
                    head = f.readline(512)
            except FileNotFoundError:
                continue
            account = head[len(MAGIC):].rstrip(b"\n").decode("utf-8", "replace") \
                if head.startswith(MAGIC) else ""
            out.setdefault(account, []).append(qid)
        return out

    def failed_ids(self) -> list[str]:
        return [n for n in self.queue.names("failed") if not n.endswith(".reason")]

    # -- lifecycle ------------------------------------------------------------------------------
    def wake(self) -> None:
        self._wake.set()

    async def start(self) -> None:
        await asyncio.to_thread(self._recover)
        self._stopping = False
        self._task = asyncio.create_task(self._loop(), name="sent-copies")

    def _recover(self) -> None:
        self.setup()
        self.queue.clear_tmp()  # never acknowledged: half-written

    async def stop(self, timeout: float = 10.0) -> None:
        self._stopping = True
        self._wake.set()
        tasks = [t for t in [self._task, *self._busy.values()] if t is not None]
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=timeout)
            for t in late:
                t.cancel()
            for t in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await t
        self._task = None

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._stopping:
            try:
                queued = await asyncio.to_thread(self.pending)
            except OSError as exc:
                self.log.error("sent_copies_unreadable", error=str(exc))
                queued = {}
            now = loop.time()
            wait = 30.0
            for account_id, qids in queued.items():
                if account_id in self._busy:
                    continue
                due = self._due.get(account_id, 0.0)
                if due > now:
                    wait = min(wait, due - now)
                    continue
                task = asyncio.create_task(self._drain(account_id, qids),
                                           name=f"sent-copies-{account_id}")
                self._busy[account_id] = task
                task.add_done_callback(self._done_draining)
            await wait_event(self._wake, max(0.05, wait))
            self._wake.clear()

    def _done_draining(self, task: asyncio.Task[None]) -> None:
        for account_id, t in list(self._busy.items()):
            if t is task:
                del self._busy[account_id]
        self._wake.set()

    # -- appending ------------------------------------------------------------------------------
    async def _drain(self, account_id: str, qids: list[str]) -> None:
        try:
            await self._append_all(account_id, qids)
        except Exception:
            self.log.exception("sent_copies_crashed", account=account_id)
            self._later(account_id, qids, "internal error")

    def _hold(self, account_id: str) -> None:
        self._due[account_id] = asyncio.get_running_loop().time() + self.hold_check

    def _later(self, account_id: str, qids: list[str], why: str) -> None:
        b = self._backoff.setdefault(account_id, Backoff(self.retry_min, self.retry_max))
        delay = max(self.retry_min, b.next_delay())
        self._due[account_id] = asyncio.get_running_loop().time() + delay
        self.log.warning("sent_copy_deferred", account=account_id, count=len(qids), error=why,
                         retry_in=round(delay, 1))
        cutoff = time.time() - self.give_up_after
        for qid in qids:
            with contextlib.suppress(FileNotFoundError):
                if self.queue.path("new", qid).stat().st_mtime < cutoff:
                    self._fail(qid, account_id, f"given up after {self.give_up_after / 3600:g}h: {why}")

    def _fail(self, qid: str, account_id: str, reason: str) -> None:
        self.failed += 1
        self.log.error("sent_copy_failed", account=account_id, id=qid, reason=reason)
        with contextlib.suppress(FileNotFoundError, NotFound):
            self.queue.path("failed", f"{qid}.reason").write_text(f"{account_id}: {reason}\n")
            self.queue.move(qid, "new", "failed", sync=False)

    def _done(self, qid: str) -> None:
        self.appended += 1
        self.queue.remove("new", qid, sync=False)

    async def _status(self, account_id: str) -> str:
        if self.accounts is None:
            return "active"
        row = await self.accounts.get(account_id)
        return str(row["status"]) if row else "active"

    async def _append_all(self, account_id: str, qids: list[str]) -> None:
        account = self.get_config().account(account_id)
        if account is None:
            for qid in qids:
                self._fail(qid, account_id, f"account {account_id!r} is not configured")
            return
        try:
            status = await self._status(account_id)
        except StoreError as exc:
            self._later(account_id, qids, str(exc))
            return
        if status == "deleted":
            for qid in qids:
                self._fail(qid, account_id, "the account was deleted (mailgw accounts delete)")
            return
        if status in ("disabled", "needs_reconnect") or not account.sync.enabled:
            self._hold(account_id)    # kept until the account is usable again
            return
        async with self.slots.hold():
            try:
                imap = await self.opener(account)
            except AccountAuthError as exc:
                if self.accounts is not None:
                    with contextlib.suppress(StoreError):
                        await self.accounts.set_status(account_id, "needs_reconnect",
                                                       exc.server_text or str(exc),
                                                       email=account.email)
                self._hold(account_id)
                return
            except AccountUnavailable as exc:
                self._later(account_id, qids, str(exc))
                return
            try:
                await self._append_session(imap, account_id, qids)
            except AccountUnavailable as exc:
                self._later(account_id, qids, str(exc))
            finally:
                if imap.connected:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(imap.logout(), 5.0)
                imap.close()

    async def _append_session(self, imap: IMAPClient, account_id: str, qids: list[str]) -> None:
        try:
            [sent] = await imap.resolve_folders(["Sent"])
        except FolderError as exc:
            for qid in qids:
                self._fail(qid, account_id, f"no Sent folder: {exc}")
            return
        examined = False
        for i, qid in enumerate(qids):
            if self._stopping:
                return
            try:
                item = await asyncio.to_thread(self._read, qid)
            except (OSError, ValueError) as exc:
                self._fail(qid, account_id, f"unreadable queue file: {exc}")
                continue
            if item is None:
                continue
            _, raw = item
            mid = header_value(raw, "Message-ID")
            if mid:
                if not examined:
                    await imap.examine(sent)
                    examined = True
                if await self._already_there(imap, mid):
                    self._done(qid)
                    continue
            try:
                await imap.append(sent, raw, flags=("\\Seen",), date=_date_of(raw))
            except IMAPCommandError as exc:
                if any(code in exc.server_text for code in _TEMPORARY):
                    self._later(account_id, qids[i:], exc.server_text)
                    return
                self._fail(qid, account_id, f"APPEND refused: {exc.server_text or exc}")
                continue
            self._done(qid)
            self.log.info("sent_copy_appended", account=account_id, folder=sent.name, id=qid)
        self._backoff.pop(account_id, None)
        self._due.pop(account_id, None)

    @staticmethod
    async def _already_there(imap: IMAPClient, message_id: str) -> bool:
        arg = protocol.quote_astring(message_id.strip())
        if not isinstance(arg, str):
            return False          # 8-bit Message-ID: no search, append (rare)
        try:
            return bool(await imap.search("HEADER", "Message-ID", arg))
        except IMAPCommandError:
            return False


def _date_of(raw: bytes) -> datetime | None:
    when, _ = parse_rfc_date(header_value(raw, "Date"))
    return when
