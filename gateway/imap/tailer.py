"""The IMAP tailer: one state machine per connected mailbox, importing CRM mail into the store.

One `AccountTailer` per tailed account (two-way sync, enabled, status active, this node
holding its lease; `gateway.imap.manager.Tailers` decides) runs this machine on one IMAP
connection at a time::

               start
                 |
                 v
   +-------> WAIT_SLOT <-------------------------------------+
   |             |  a connection slot (sync.max_connections)  |
   |             v                                            |
   |          CONNECT                                         |
   |             |                                            |
   |             v                                            |
   |          RESOLVE                                         |
   |             |                                            |
   |             v                                            |
   |     +---> SYNC                                           |
   |     |       |                                            |
   |     |       v                                            |
   |     +---- TAIL ------------------------------------------+
   |  poll due, IDLE         yield: accounts wait for a slot and
   |  saw new mail           this one held it a poll interval
   |
   +---- BACKOFF <---- AccountUnavailable, timeout, StoreError in any connected
                       state; RESOLVE found no usable folder (waits sync.poll_interval)

   AccountAuthError in any connected state ---> NEEDS_RECONNECT ---> STOPPED
   stop(), from any state --------------------------------------------> STOPPED

The connected states (CONNECT, RESOLVE, SYNC, TAIL) hold the slot and the connection;
leaving them, for any reason, ends the session: the commit in flight lands (or, when
the task is cancelled, is abandoned), LOGOUT, the slot is released.

Each state is a handler that does its work and returns the next state; `run()` is the
driver (`while state is not STOPPED: state = await step(handlers[state])`) and turns
what a handler raises into the transitions drawn above:

- WAIT_SLOT (`_wait_slot`): queue for a connection slot.
- CONNECT (`_connect`): connect and authenticate. Refused credentials (the server's
  words) -> NEEDS_RECONNECT. An account that needed reconnecting gets one retry (after
  SIGHUP or `accounts enable`); logging in marks it active again.
- RESOLVE (`_resolve`): configured folders -> mailboxes through SPECIAL-USE ("Sent"
  finds "Sent Items"); Junk, Drafts, Trash, All Mail never (a "resolve" run says so,
  once); the usable ones are synced, and with none the session ends until the next poll.
- SYNC (`_sync`): every due folder is EXAMINEd (read-only) and compared with its
  checkpoint: UIDVALIDITY changed -> checkpoint reset, a "resync" run; not initial_done
  -> INITIAL: catch up above last_uid, then the history window (history_days), newest
  first, in bulk (below), checkpoint `backfill_uid` moving down; initial_done ->
  CATCH_UP: UIDs above last_uid, ascending. Due are all folders after RESOLVE, and
  every sync.poll_interval (INBOX last, so that it stays selected for IDLE); after IDLE
  saw new mail, only INBOX's UIDs above last_uid (no EXAMINE). The session's first SYNC
  resets the backoff.
- TAIL (`_tail`, `_idle`): IDLE on INBOX (re-issued after sync.idle_interval < 29 min;
  liveness probe after sync.idle_liveness of silence) until new mail (-> SYNC) or the
  next poll (-> SYNC every folder); without IDLE, sleep until the next poll. Before IDLE
  is re-issued, and every sync.list_interval, the folders are LISTed again
  (`_relist`): a configured folder created since joins the session (-> SYNC of it: its
  initial sync), one deleted leaves it. Accounts
  waiting for a slot and this one held it a poll interval: give it up (LOGOUT) and
  queue again.
- BACKOFF (`_wait_backoff`): the slot released, a capped exponential delay with full
  jitter (sync.backoff_min .. backoff_max), then WAIT_SLOT again. Nothing is lost: the
  checkpoint only moves with committed messages.
- NEEDS_RECONNECT (`_needs_reconnect`): the status with the server's words (and its
  webhook, `account.needs_reconnect`); no retry until SIGHUP or `accounts enable`.

Every batch is header-first: `UID FETCH (BODY.PEEK[HEADER.FIELDS (...)])` for the batch
(BATCH, 200 UIDs, while tailing; BULK_BATCH, 1,000, when more than 200 are to be read:
the initial sync and large catch-ups), the addresses go to `Store.concerning` (contacts,
company domains, `crm.exclude`, `auto_create_contacts`), and only the messages that will
be stored, and delivery reports, read receipts and feedback reports (which the store
records as events on the message they are about, never as conversations), get
`BODY.PEEK[]` (nothing is ever marked \\Seen: EXAMINE and PEEK only), in FETCHes of at
most BODY_FETCH_COUNT messages and BODY_FETCH_BYTES. Header blocks and bodies are parsed
by the node's parse workers (`gateway.imap.parsing`: processes, off the event loop; each
body FETCH one job, started as it arrives), become `NewMessage`s (outbound when From is
the account's or its user's address, or the folder is the \\Sent one; else inbound) and
go to `Store.store_messages` with the folder's new checkpoint as the `then` callback:
the messages and the checkpoint that covers them commit together (the commit waits for
its batch's parse jobs; one that raised fails it), so a crash or kill at any point
resumes from the last commit without storing anything twice (the store's dedupe by
Message-ID and the source ref `account/folder/uidvalidity/uid` make replays harmless
anyway). At most two batches are held: the one being fetched and the one committing.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, TypeVar

import structlog

from gateway.config import Account, Config, Sync
from gateway.crm.accounts import Accounts, Checkpoint, RunCounts
from gateway.crm.store import Store
from gateway.errors import (
    AccountAuthError,
    AccountError,
    AccountUnavailable,
    FolderError,
    StoreError,
)
from gateway.imap.backoff import Backoff
from gateway.imap.client import HEADER_FIELDS as CLIENT_HEADER_FIELDS
from gateway.imap.client import Folder, IMAPClient, MailboxState, MessageBody, MessageHeaders
from gateway.imap.parsing import BodyJob, Parsers
from gateway.imap.protocol import uid_set
from gateway.imap.slots import ConnectionSlots
from gateway.mail.autoreply import kind_of
from gateway.mail.own import OwnAddresses
from gateway.mail.parse import HEADER_FIELDS as PARSE_HEADER_FIELDS
from gateway.mail.parse import HeaderInfo
from gateway.records import REPORT_KINDS, NewMessage, SourceRef

if TYPE_CHECKING:
    from gateway.metrics import Metrics

__all__ = [
    "AccountTailer",
    "Opener",
    "TailState",
    "TailerStats",
]

T = TypeVar("T")

#: header fields of the header-first pass: what the client and the parser each look at
HEADER_FIELDS: tuple[str, ...] = tuple(dict.fromkeys([*CLIENT_HEADER_FIELDS, *PARSE_HEADER_FIELDS]))
#: UIDs per header FETCH (and per store transaction) while tailing
BATCH = 200
#: UIDs per header FETCH (and per store transaction) when there are more than BATCH to
#: read: the initial sync and any large catch-up
BULK_BATCH = 1000
#: raw bytes gathered before a store transaction, whatever the count
FLUSH_BYTES = 16 * 1024 * 1024
#: one body FETCH asks for at most this many messages, and (by their RFC822.SIZE) at
#: most this many bytes, unless one message alone is larger
BODY_FETCH_COUNT = 200
BODY_FETCH_BYTES = 4 * 1024 * 1024
#: the longest UID set a header FETCH of a whole batch may send (else BATCH UIDs a FETCH)
MAX_SET_CHARS = 4000
#: while a folder waits for an initial-sync slot, a NOOP this often keeps its connection
INITIAL_SLOT_NOOP = 240.0
#: messages larger than this are stored from their headers only (never held in memory)
MAX_BODY = 32 * 1024 * 1024
#: one store call (a batch with its checkpoint) must finish within this
STORE_TIMEOUT = 120.0

Opener = Callable[[Account], Awaitable[IMAPClient]]


class TailState(enum.Enum):
    """Where an AccountTailer is (see the module docstring)."""

    WAIT_SLOT = "wait_slot"
    CONNECT = "connect"
    RESOLVE = "resolve"
    SYNC = "sync"
    TAIL = "tail"
    BACKOFF = "backoff"
    NEEDS_RECONNECT = "needs_reconnect"
    STOPPED = "stopped"


#: the states that hold a connection slot and an IMAP connection (a session)
_CONNECTED = frozenset({TailState.CONNECT, TailState.RESOLVE, TailState.SYNC, TailState.TAIL})


class _Stopped(Exception):
    """Raised between batches when the tailer was asked to stop."""


@dataclasses.dataclass
class _Session:
    """One IMAP connection, from the login to the logout, and what the states share on it."""

    imap: IMAPClient
    sync: Sync                         # read at login, again when tailing begins
    folders: list[Folder] = dataclasses.field(default_factory=list)
    due: list[Folder] = dataclasses.field(default_factory=list)   # SYNC: examine these
    inbox_changed: bool = False        # SYNC: IDLE saw new mail in INBOX
    inbox: Folder | None = None        # TAIL: IDLE on it (None: no IDLE, poll every folder)
    held_since: float | None = None    # loop time tailing began (None: the first SYNC is due)
    next_poll: float = 0.0             # loop time of the next SYNC of every folder
    next_list: float = 0.0             # loop time of the next LIST (new folders)


# -- one mailbox ------------------------------------------------------------------------------

@dataclasses.dataclass
class TailerStats:
    """What one tailer did since it started (tests, benchmarks, logs)."""

    sessions: int = 0
    logins_failed: int = 0
    stored: int = 0
    skipped: int = 0
    bodies_fetched: int = 0
    idles: int = 0
    last_error: str | None = None


class AccountTailer:
    """The state machine of one mailbox (see the module docstring)."""

    def __init__(self, account: Account, *, get_config: Callable[[], Config], store: Store,
                 accounts: Accounts, slots: ConnectionSlots, opener: Opener, log: Any = None,
                 retrying: bool = False, on_stored: Callable[[list[NewMessage]], None] | None = None,
                 metrics: Metrics | None = None, parsers: Parsers | None = None,
                 initial_slots: asyncio.Semaphore | None = None) -> None:
        self.account = account
        self.get_config = get_config
        self.store = store
        self.accounts = accounts
        self.slots = slots
        self.opener = opener
        self.log = (log or structlog.get_logger("mailgw.imap")).bind(account=account.id)
        self.retrying = retrying        # status is needs_reconnect: this is the one retry
        self.on_stored = on_stored
        self.metrics = metrics
        self.parsers = parsers or Parsers(0)     # the node's pool (gateway.imap.parsing)
        #: the node's initial syncs at once (sync.initial_syncs): a folder's initial sync
        #: takes one; tailing and catching up do not
        self.initial_slots = initial_slots or asyncio.Semaphore(1)
        self.state = TailState.WAIT_SLOT
        self.stats = TailerStats()
        self._stop = asyncio.Event()
        self._cps: dict[str, Checkpoint] = {}
        self._inflight: asyncio.Task[Checkpoint] | None = None
        self._folder = ""
        self._reported_folders: str | None = None
        cfg = get_config()
        # what the states hand on to each other
        self._backoff = Backoff(base=cfg.sync.backoff_min, cap=cfg.sync.backoff_max)
        self._holding_slot = False
        self._started = datetime.now(UTC)        # when the slot was granted
        self._session: _Session | None = None    # the connected states' connection
        self._delay = 0.0                        # BACKOFF: how long
        self._refused: AccountAuthError | None = None   # NEEDS_RECONNECT: the server's refusal

    @property
    def id(self) -> str:
        return self.account.id

    def stop(self) -> None:
        """Ask to stop: batches in flight commit, waits (slot, backoff, IDLE) end at once."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def _check_stop(self) -> None:
        if self._stop.is_set():
            raise _Stopped()

    async def _until_stopped(self, aw: Awaitable[T]) -> tuple[bool, T | None]:
        """Await `aw` unless stop() comes first (then `aw` is cancelled): (finished, result)."""
        task = asyncio.ensure_future(aw)
        stopper = asyncio.ensure_future(self._stop.wait())
        try:
            await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            task.cancel()
            stopper.cancel()
            raise
        stopper.cancel()
        if task.done():
            return True, task.result()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        return False, None

    async def _sleep(self, seconds: float) -> bool:
        """Sleep unless stopped; False when stopped."""
        done, _ = await self._until_stopped(asyncio.sleep(max(0.0, seconds)))
        return done

    # -- the driver ---------------------------------------------------------------------------
    async def run(self) -> None:
        """Tail until stopped, or until the server refuses the credentials.

        The driver of the machine: each state's handler does that state's work and returns
        the next state; `_step` turns what a handler raises into a transition too."""
        handlers: dict[TailState, Callable[[], Awaitable[TailState]]] = {
            TailState.WAIT_SLOT: self._wait_slot,
            TailState.CONNECT: self._connect,
            TailState.RESOLVE: self._resolve,
            TailState.SYNC: self._sync,
            TailState.TAIL: self._tail,
            TailState.BACKOFF: self._wait_backoff,
            TailState.NEEDS_RECONNECT: self._needs_reconnect,
        }
        with contextlib.suppress(StoreError):
            await self.accounts.interrupt_runs(
                self.id, "interrupted: the node syncing it stopped or lost its lease; "
                         "resumed from the checkpoint")
        state = TailState.WAIT_SLOT
        try:
            while state is not TailState.STOPPED:
                self.state = state
                state = await self._step(handlers[state])
        finally:
            self.state = TailState.STOPPED

    async def _step(self, handler: Callable[[], Awaitable[TailState]]) -> TailState:
        """One handler; its exceptions are transitions: refused credentials -> NEEDS_RECONNECT,
        an unavailable account or store -> BACKOFF, a stop between batches -> STOPPED.
        Leaving the connected states, by a return or an exception, ends the session."""
        failure: Exception | None = None
        try:
            state = await handler()
        except AccountAuthError as exc:
            self._refused = exc
            state = TailState.NEEDS_RECONNECT
        except (AccountError, StoreError) as exc:
            failure = exc
            state = TailState.BACKOFF
        except _Stopped:
            state = TailState.STOPPED
        except asyncio.CancelledError:
            if self._inflight is not None:     # killed: the commit in flight is abandoned too
                self._inflight.cancel()
            await self._end_session()
            raise
        except BaseException:
            await self._end_session()
            raise
        if state in _CONNECTED:
            return state
        await self._end_session()
        if failure is not None:
            self._delay = self._backoff.next_delay()
            await self._failed(failure, self._delay)
        return state

    async def _end_session(self) -> None:
        """Leaving the connected states: the commit in flight lands (stopped or failed: what
        was fetched still commits; a cancelled one is logged lost), LOGOUT, the slot goes back."""
        session, self._session = self._session, None
        try:
            if session is not None:
                task, self._inflight = self._inflight, None
                if task is not None:
                    try:
                        await task
                    except (Exception, asyncio.CancelledError) as exc:
                        self.log.warning("imap_commit_lost", error=str(exc) or type(exc).__name__)
                self._folder = ""
                imap = session.imap
                if imap.connected and not imap.idling:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(imap.logout(), 5.0)
                imap.close()
        finally:
            if self._holding_slot:
                self._holding_slot = False
                self.slots.release()

    def _connected(self) -> _Session:
        assert self._session is not None, "a connected state without a connection"
        return self._session

    # -- the states ---------------------------------------------------------------------------
    async def _wait_slot(self) -> TailState:
        """WAIT_SLOT: queue for one of the `sync.max_connections` slots -> CONNECT."""
        if self._stop.is_set():
            return TailState.STOPPED
        got, _ = await self._until_stopped(self.slots.acquire())
        if not got:
            return TailState.STOPPED
        self._holding_slot = True
        self._started = datetime.now(UTC)
        return TailState.CONNECT

    async def _connect(self) -> TailState:
        """CONNECT: log in (refused: NEEDS_RECONNECT, through `_step`) -> RESOLVE. The one
        retry of an account that needs reconnecting marks it active again."""
        s = self.get_config().sync
        self._folder = ""
        self.stats.sessions += 1
        try:
            imap = await self.opener(self.account)
        except OSError as exc:   # a secret file went missing under a running daemon
            raise AccountUnavailable(f"cannot read the account's secrets: {exc}") from exc
        self._session = _Session(imap, s)
        imap.idle_liveness = s.idle_liveness
        if self.retrying:
            await self.accounts.set_status(self.id, "active", None, only_from=("needs_reconnect",))
            self.retrying = False
            self.log.info("account_reconnected")
        return TailState.RESOLVE

    async def _resolve(self) -> TailState:
        """RESOLVE: the configured folders -> mailboxes -> SYNC of all of them; none usable:
        BACKOFF for `sync.poll_interval`."""
        session = self._connected()
        folders = await self._usable_folders(session.imap)
        if not folders:
            self._delay = session.sync.poll_interval
            return TailState.BACKOFF
        session.folders = folders
        session.due = list(folders)
        return TailState.SYNC

    async def _sync(self) -> TailState:
        """SYNC: the due folders, each examined and compared with its checkpoint; or, after
        IDLE saw new mail, INBOX's new UIDs alone -> TAIL."""
        session = self._connected()
        imap = session.imap
        if session.inbox_changed:
            session.inbox_changed = False
            assert session.inbox is not None
            await self._catch_up(imap, session.inbox, None, uidnext=None)
            return TailState.TAIL
        for f in session.due:
            await self._sync_folder(imap, f)
        session.due = []
        loop = asyncio.get_running_loop()
        if session.held_since is None:      # the session's first SYNC: tailing begins
            self._backoff.reset()
            session.sync = self.get_config().sync
            session.held_since = loop.time()
            session.inbox = next((f for f in session.folders if f.name.upper() == "INBOX"), None) \
                if imap.can_idle else None
        session.next_poll = loop.time() + session.sync.poll_interval
        if not session.next_list:
            session.next_list = loop.time() + session.sync.list_interval
        return TailState.TAIL

    async def _tail(self) -> TailState:
        """TAIL: yield the slot (-> WAIT_SLOT) to accounts waiting for one once this one held
        it a poll interval; every poll interval SYNC all folders; else wait for news: IDLE
        on INBOX (new mail -> SYNC), or, without IDLE, sleep until the next poll."""
        session = self._connected()
        s = session.sync
        loop = asyncio.get_running_loop()
        assert session.held_since is not None
        if self._stop.is_set():
            return TailState.STOPPED
        if self.slots.waiting and loop.time() - session.held_since >= s.poll_interval:
            self.log.info("imap_slot_yielded", waiting=self.slots.waiting)
            return TailState.WAIT_SLOT
        if loop.time() >= session.next_list:
            session.next_list = loop.time() + s.list_interval
            added = await self._relist(session)
            if added:   # their initial sync now; IDLE selects INBOX again afterwards
                session.due = added
                return TailState.SYNC
        if loop.time() >= session.next_poll:
            # INBOX last, so that it stays selected for IDLE
            session.due = sorted(session.folders, key=lambda f: f is session.inbox)
            return TailState.SYNC
        if session.inbox is None:
            slept = await self._sleep(min(session.next_poll, session.next_list) - loop.time())
            return TailState.TAIL if slept else TailState.STOPPED
        return await self._idle(session, session.inbox)

    async def _relist(self, session: _Session) -> list[Folder]:
        """LIST again: configured folders that exist now and did not before join the
        session (returned, for their initial sync); folders gone from the list leave it.
        An answer with no usable folder at all changes nothing (the next LIST may do better)."""
        folders = await self._usable_folders(session.imap)
        if not folders:
            return []
        known = {f.name: f for f in session.folders}
        listed = [known.get(f.name, f) for f in folders]   # the same objects: `inbox` stays
        added = [f for f in listed if f.name not in known]
        gone = [name for name in known if name not in {f.name for f in listed}]
        if session.inbox is not None and session.inbox.name in gone:
            return []   # INBOX never goes away; a LIST without it is not to be believed
        session.folders = listed
        if added:
            self.log.info("imap_folders_added", folders=[f.name for f in added])
        if gone:
            self.log.info("imap_folders_gone", folders=gone)
        return added

    async def _idle(self, session: _Session, inbox: Folder) -> TailState:
        """IDLE on INBOX until it changes, the poll is due or `sync.idle_interval` passes."""
        imap = session.imap
        loop = asyncio.get_running_loop()
        if imap.selected is None or imap.selected.name != inbox.name:
            await self._sync_folder(imap, inbox)
        interval = min(session.sync.idle_interval,
                       max(0.5, min(session.next_poll, session.next_list) - loop.time()))
        self._folder = inbox.name
        self.stats.idles += 1
        done, result = await self._until_stopped(imap.idle(interval=interval))
        if not done or result is None:
            return TailState.STOPPED
        if result.reason == "pending" or any(e.kind in ("EXISTS", "VANISHED") for e in result.events):
            session.inbox_changed = True
            return TailState.SYNC
        if result.reason == "interval":
            session.next_list = 0.0   # IDLE is about to be re-issued: LIST first (new folders)
        return TailState.TAIL

    async def _wait_backoff(self) -> TailState:
        """BACKOFF: the slot released, wait the delay -> WAIT_SLOT."""
        if self._stop.is_set():
            return TailState.STOPPED
        return TailState.WAIT_SLOT if await self._sleep(self._delay) else TailState.STOPPED

    async def _failed(self, exc: Exception, delay: float) -> None:
        text = str(exc)
        self.stats.last_error = text
        if self.metrics is not None:
            self.metrics.imap_error(self.id)
        self.log.warning("imap_sync_failed", folder=self._folder or None, error=text,
                         retry_in=round(delay, 1), state=self.state.value)
        kind = "connect" if self.state in (TailState.CONNECT, TailState.WAIT_SLOT) else "tail"
        with contextlib.suppress(StoreError):
            await self.accounts.record_run(self.id, self._folder, kind, self._started, RunCounts(),
                                           text)

    async def _needs_reconnect(self) -> TailState:
        """NEEDS_RECONNECT: the status (and its webhook) with the server's words -> STOPPED."""
        exc = self._refused
        assert exc is not None
        self.stats.logins_failed += 1
        if self.metrics is not None:
            self.metrics.imap_error(self.id)
        words = exc.server_text or str(exc)
        self.stats.last_error = str(exc)
        self.log.error("account_needs_reconnect", reason=words)
        for attempt in range(3):  # the status must land, or the manager would retry at once
            try:
                await self.accounts.set_status(self.id, "needs_reconnect", words,
                                               email=self.account.email)
                await self.accounts.record_run(self.id, "", "connect", self._started, RunCounts(),
                                               str(exc))
                break
            except StoreError as err:
                self.log.error("account_status_unsaved", error=str(err))
                if attempt < 2 and not await self._sleep(1.0 + attempt):
                    break
        return TailState.STOPPED

    async def _usable_folders(self, imap: IMAPClient) -> list[Folder]:
        wanted = list(self.account.sync.folders)
        try:
            folders = await imap.resolve_folders(wanted)
            self._reported_folders = None
            return folders
        except FolderError as exc:
            text = str(exc)
            if text != self._reported_folders:   # report a problem once, not every session
                self._reported_folders = text
                self.log.error("imap_folders_unusable", problems=exc.problems)
                await self.accounts.record_run(self.id, ", ".join(exc.problems), "resolve",
                                               datetime.now(UTC), RunCounts(), text)
            good = [w for w in wanted if w not in exc.problems]
            return await imap.resolve_folders(good) if good else []

    # -- one folder -------------------------------------------------------------------------
    async def _sync_folder(self, imap: IMAPClient, folder: Folder) -> None:
        self._check_stop()
        self._folder = folder.name
        state = await imap.examine(folder)
        cp = self._cps.get(folder.name) or await self.accounts.checkpoint(self.id, folder.name)
        kind = "tail"
        if cp is None or cp.uidvalidity is None:
            cp = Checkpoint(folder=folder.name, uidvalidity=state.uidvalidity)
            kind = "initial"
        elif cp.uidvalidity != state.uidvalidity:
            self.log.warning("imap_uidvalidity_changed", folder=folder.name, old=cp.uidvalidity,
                             new=state.uidvalidity)
            cp = Checkpoint(folder=folder.name, uidvalidity=state.uidvalidity)
            kind = "resync"
        self._cps[folder.name] = cp
        if not cp.initial_done:
            if await self._initial_slot(imap, folder):
                try:   # the folder as it is now, not as it was before the wait
                    state = await imap.examine(folder)
                    if state.uidvalidity != cp.uidvalidity:
                        cp = Checkpoint(folder=folder.name, uidvalidity=state.uidvalidity)
                        self._cps[folder.name] = cp
                        kind = "resync"
                except BaseException:
                    self.initial_slots.release()
                    raise
            try:
                await self._initial(imap, folder, state, cp, "initial" if kind == "tail" else kind)
            finally:
                self.initial_slots.release()
        else:
            await self._catch_up(imap, folder, state, uidnext=state.uidnext)

    async def _initial_slot(self, imap: IMAPClient, folder: Folder) -> bool:
        """Take one of the node's initial-sync slots (`sync.initial_syncs`), keeping the
        connection alive while waiting (a NOOP every few minutes: servers log out idle
        clients after 30); True when it had to wait. Raises _Stopped when stopped first."""
        if not self.initial_slots.locked():
            await self.initial_slots.acquire()
            return False
        self.log.info("imap_initial_sync_waiting", folder=folder.name)
        acquire = asyncio.ensure_future(self.initial_slots.acquire())
        stopper = asyncio.ensure_future(self._stop.wait())
        taken = False
        try:
            while True:
                await asyncio.wait({acquire, stopper}, timeout=INITIAL_SLOT_NOOP,
                                   return_when=asyncio.FIRST_COMPLETED)
                if acquire.done():
                    taken = True
                    return True
                if stopper.done():
                    raise _Stopped()
                await imap.noop()
        finally:
            stopper.cancel()
            if not taken:
                acquire.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await acquire
                if acquire.done() and not acquire.cancelled():
                    self.initial_slots.release()   # granted just as we gave up: hand it on

    async def _initial(self, imap: IMAPClient, folder: Folder, state: MailboxState, cp: Checkpoint,
                       kind: str) -> None:
        """Catch up above last_uid, then the history window newest first; one sync run."""
        counts = RunCounts()
        run_id = await self.accounts.start_run(self.id, folder.name, kind)
        self.log.info("imap_initial_sync", folder=folder.name, kind=kind, exists=state.exists)
        error: str | None = None
        try:
            if cp.backfill_uid is None:
                top = (state.uidnext - 1) if state.uidnext else max(await imap.search_uids(1), default=0)
                cp = dataclasses.replace(cp, last_uid=top, backfill_uid=top + 1,
                                         highestmodseq=state.highestmodseq)
                await self._commit(folder, [], cp, run_id, counts)
            cp = await self._catch_up(imap, folder, None, uidnext=state.uidnext, counts=counts,
                                      run_id=run_id)
            days = self.account.sync.history_days
            if days > 0 and cp.backfill_uid is not None and cp.backfill_uid > 1:
                since = (datetime.now(UTC) - timedelta(days=days)).date()
                low = cp.backfill_uid
                uids = sorted((u for u in await imap.search_since(since) if u < low), reverse=True)
                step = _batch_size(len(uids))
                for i in range(0, len(uids), step):
                    self._check_stop()
                    await self._batch(imap, folder, uids[i:i + step], descending=True,
                                      counts=counts, run_id=run_id)
                await self._settle()
            cp = dataclasses.replace(self._cps[folder.name], initial_done=True)
            await self._commit(folder, [], cp, run_id, counts)
        except _Stopped:
            error = "interrupted: the gateway stopped; resumes from the checkpoint"
            with contextlib.suppress(StoreError, TimeoutError):
                await self._settle()           # the batch in flight commits first
            raise
        except asyncio.CancelledError:
            error = "interrupted: the gateway stopped; resumes from the checkpoint"
            raise
        except Exception as exc:
            error = str(exc) or type(exc).__name__
            raise
        finally:
            with contextlib.suppress(StoreError, asyncio.CancelledError):
                await asyncio.shield(self.accounts.finish_run(run_id, counts, error))
            self.log.info("imap_initial_sync_done", folder=folder.name, fetched=counts.fetched,
                          stored=counts.stored, skipped=counts.skipped, error=error)

    async def _catch_up(self, imap: IMAPClient, folder: Folder, state: MailboxState | None, *,
                        uidnext: int | None, counts: RunCounts | None = None,
                        run_id: int | None = None) -> Checkpoint:
        """New mail: UIDs above last_uid, ascending. A tail pass that saw anything is a run."""
        cp = self._cps[folder.name]
        if state is not None and state.highestmodseq is not None and cp.highestmodseq is not None \
                and state.highestmodseq == cp.highestmodseq and uidnext is not None \
                and uidnext <= cp.last_uid + 1:
            return cp                   # CONDSTORE: nothing at all changed
        if uidnext is not None and uidnext <= cp.last_uid + 1:
            if state is not None and state.highestmodseq != cp.highestmodseq:
                cp = dataclasses.replace(cp, highestmodseq=state.highestmodseq)
                await self._commit(folder, [], cp, None, None)
            return cp                   # UIDNEXT: no new message
        uids = await imap.search_uids(cp.last_uid + 1)
        if not uids:
            return cp
        own_run = counts is None
        counts = counts if counts is not None else RunCounts()
        started = datetime.now(UTC)
        error: str | None = None
        try:
            step = _batch_size(len(uids))
            for i in range(0, len(uids), step):
                self._check_stop()
                await self._batch(imap, folder, uids[i:i + step], descending=False,
                                  counts=counts, run_id=run_id)
            await self._settle()
            cp = self._cps[folder.name]
            if state is not None and state.highestmodseq is not None:
                cp = dataclasses.replace(cp, highestmodseq=state.highestmodseq)
                await self._commit(folder, [], cp, run_id, counts)
        except Exception as exc:
            error = str(exc) or type(exc).__name__
            raise
        finally:
            if own_run and counts.fetched:
                with contextlib.suppress(StoreError):
                    await self.accounts.record_run(self.id, folder.name, "tail", started, counts, error)
        return cp

    async def _batch(self, imap: IMAPClient, folder: Folder, uids: list[int], *, descending: bool,
                     counts: RunCounts, run_id: int | None) -> None:
        """Header-first for a batch of UIDs (in the order given), bodies of the wanted ones,
        stored with the checkpoint that covers them.

        The header blocks and the bodies are parsed by the node's `Parsers` (worker
        processes): each body FETCH (at most BODY_FETCH_COUNT messages, BODY_FETCH_BYTES)
        becomes one parse job, started as soon as it arrives, while the next FETCH is
        read. The store transaction waits for its batch's jobs and runs while the next
        batch is fetched (`_commit_later`); `_settle()` waits for it."""
        # one FETCH for the batch, unless its UID set is long (scattered UIDs): servers
        # need only take commands of 8,000 octets (RFC 7162), so 200 UIDs a FETCH then
        one = len(uid_set(uids)) <= MAX_SET_CHARS if uids else True
        heads: list[MessageHeaders] = [h async for h in imap.fetch_headers(
            uids, fields=HEADER_FIELDS, batch=len(uids) if one else BATCH)]
        # header blocks come from outside (up to a megabyte each): read them off the loop
        infos = await self.parsers.headers([h.header for h in heads])
        verdicts = await asyncio.wait_for(self.store.concerning(
            [[i.from_addr, *i.to_addrs, *i.cc_addrs, *i.bcc_addrs] for i in infos],
            [i.display_names for i in infos]), STORE_TIMEOUT)
        counts.fetched += len(heads)
        # delivery reports, read receipts and feedback reports come from machines no
        # contact rule matches: fetched anyway, the store reads them as events
        wanted = [(h, i) for h, i, ok in zip(heads, infos, verdicts, strict=True)
                  if ok or kind_of(i.headers, subject=i.subject, from_addr=i.from_addr) in REPORT_KINDS]
        counts.skipped += len(heads) - len(wanted)
        self.stats.skipped += len(heads) - len(wanted)
        uidvalidity = imap.selected.uidvalidity if imap.selected else None
        assert uidvalidity is not None

        def covered(uid: int) -> Checkpoint:
            cp = self._cps[folder.name]
            if descending:
                low = uid if cp.backfill_uid is None else min(cp.backfill_uid, uid)
                return dataclasses.replace(cp, backfill_uid=low)
            return dataclasses.replace(cp, last_uid=max(cp.last_uid, uid))

        large = [(h, i) for h, i in wanted if h.size > MAX_BODY]
        small = [h for h, _ in wanted if h.size <= MAX_BODY]
        pending: list[NewMessage] = [self._from_headers(folder, uidvalidity, h, i) for h, i in large]
        jobs: list[asyncio.Future[list[NewMessage]]] = []
        size = 0
        try:
            for chunk in _body_chunks(small):
                bodies = [b async for b in imap.fetch_bodies(chunk, batch=len(chunk))]
                self.stats.bodies_fetched += len(bodies)
                if bodies:
                    jobs.append(asyncio.ensure_future(
                        self.parsers.bodies(self._job(folder, uidvalidity, bodies))))
                size += sum(len(b.raw) for b in bodies)
                if size >= FLUSH_BYTES and bodies:
                    batch_jobs, jobs = jobs, []
                    await self._commit_later(folder, pending, covered(bodies[-1].uid), run_id,
                                             counts, batch_jobs)
                    pending, size = [], 0
                    self._check_stop()
        except BaseException:
            _discard(jobs)
            raise
        await self._commit_later(folder, pending, covered(uids[-1]), run_id, counts, jobs)

    async def _commit_later(self, folder: Folder, items: list[NewMessage], cp: Checkpoint,
                            run_id: int | None, counts: RunCounts | None,
                            jobs: Sequence[asyncio.Future[list[NewMessage]]] = ()) -> None:
        """Start this commit once the previous one is done (commits stay in order; a failed
        one raises here), and return without waiting for it. The commit first waits for
        the parse `jobs` of its messages (in order, after `items`); a job that raises
        fails the commit: nothing of it is stored, the checkpoint stays."""
        try:
            await self._settle()
        except BaseException:
            _discard(jobs)
            raise
        self._inflight = asyncio.create_task(
            self._commit_parsed(folder, items, jobs, cp, run_id, counts))

    async def _commit_parsed(self, folder: Folder, items: list[NewMessage],
                             jobs: Sequence[asyncio.Future[list[NewMessage]]], cp: Checkpoint,
                             run_id: int | None, counts: RunCounts | None) -> Checkpoint:
        if jobs:
            try:
                done = await asyncio.gather(*jobs)
            except BaseException:
                _discard(jobs)
                raise
            items = [*items, *(m for ms in done for m in ms)]
        return await self._commit(folder, items, cp, run_id, counts)

    async def _settle(self) -> None:
        """Wait for the commit in flight, if any (its failure raises here)."""
        task, self._inflight = self._inflight, None
        if task is not None:
            await task

    async def _commit(self, folder: Folder, items: list[NewMessage], cp: Checkpoint,
                      run_id: int | None, counts: RunCounts | None) -> Checkpoint:
        if counts is not None:
            counts.stored += len(items)
        try:
            await asyncio.wait_for(self.store.store_messages(
                items, then=self.accounts.save_checkpoint(self.id, cp, run_id=run_id, counts=counts)),
                STORE_TIMEOUT)
        except TimeoutError:
            if counts is not None:
                counts.stored -= len(items)
            raise StoreError(f"storing {len(items)} messages took longer than {STORE_TIMEOUT:g}s") \
                from None
        except BaseException:
            if counts is not None:
                counts.stored -= len(items)
            raise
        self._cps[folder.name] = cp
        self.stats.stored += len(items)
        if items:
            self.log.info("imap_stored", folder=folder.name, count=len(items), last_uid=cp.last_uid,
                          backfill_uid=cp.backfill_uid)
            if self.metrics is not None:
                self.metrics.imap_stored_messages(self.id, len(items))
            if self.on_stored is not None:
                self.on_stored(items)
        return cp

    # -- messages ---------------------------------------------------------------------------
    @property
    def _own(self) -> OwnAddresses:
        return OwnAddresses.of(self.get_config())

    @property
    def _user(self) -> str | None:
        """The user whose account this is (the first one in the configuration)."""
        return self._own.user_of_account(self.id)

    def _direction(self, folder: Folder, from_addr: str) -> str:
        """Mail from the account's addresses, or in the Sent folder, is outbound."""
        if from_addr.strip().lower() in self._own.account_addresses(self.id) \
                or folder.special_use == "\\Sent":
            return "outbound"
        return "inbound"

    def _source(self, folder: Folder, uidvalidity: int, uid: int) -> SourceRef:
        return SourceRef(source="imap", ref=f"{self.id}/{folder.name}/{uidvalidity}/{uid}",
                         at=datetime.now(UTC), account=self.id, folder=folder.name,
                         uidvalidity=uidvalidity, uid=uid)

    def _job(self, folder: Folder, uidvalidity: int, bodies: Sequence[MessageBody]) -> BodyJob:
        """One parse job (plain values: it goes to a worker process) for fetched bodies.

        With `store.raw: disk` the worker writes the raw files itself and the bytes do not
        come back; with `none` they are dropped there."""
        raw = self.store.raw
        return BodyJob(account=self.id, folder=folder.name, sent_folder=folder.special_use == "\\Sent",
                       own=self._own.account_addresses(self.id), user=self._user,
                       uidvalidity=uidvalidity,
                       bodies=[(b.uid, b.raw, b.internaldate) for b in bodies],
                       raw_dir=str(raw.directory) if raw.on_disk and raw.directory else None,
                       keep_raw=raw.in_database)

    def _from_headers(self, folder: Folder, uidvalidity: int, h: MessageHeaders,
                      i: HeaderInfo) -> NewMessage:
        """A message too large to hold: stored from its header fields alone."""
        return NewMessage(
            message_id=i.message_id, from_addr=i.from_addr, from_name=i.from_name,
            to_addrs=list(i.to_addrs), cc_addrs=list(i.cc_addrs), subject=i.subject,
            date=i.date or h.internaldate, direction=self._direction(folder, i.from_addr),
            sources=[self._source(folder, uidvalidity, h.uid)], in_reply_to=i.in_reply_to,
            references=list(i.references), size=h.size, account=self.id, user=self._user,
            snippet=f"(message of {h.size} bytes: body not imported)",
            kind=kind_of(i.headers, subject=i.subject, from_addr=i.from_addr),
            display_names=dict(i.display_names))


def _batch_size(n: int) -> int:
    """UIDs a batch: BATCH while tailing, BULK_BATCH when there are more than BATCH to read."""
    return BULK_BATCH if n > BATCH else BATCH


def _body_chunks(heads: Sequence[MessageHeaders]) -> list[list[int]]:
    """The UIDs of `heads` in body FETCHes of at most BODY_FETCH_COUNT messages and (by
    RFC822.SIZE) BODY_FETCH_BYTES bytes, a larger message alone; in order."""
    out: list[list[int]] = []
    chunk: list[int] = []
    size = 0
    for h in heads:
        if chunk and (len(chunk) >= BODY_FETCH_COUNT or size + h.size > BODY_FETCH_BYTES):
            out.append(chunk)
            chunk, size = [], 0
        chunk.append(h.uid)
        size += h.size
    if chunk:
        out.append(chunk)
    return out


def _discard(jobs: Sequence[asyncio.Future[Any]]) -> None:
    """Parse jobs whose batch will not be committed: cancelled, their failures read (not logged)."""
    for job in jobs:
        job.cancel()
        job.add_done_callback(lambda f: None if f.cancelled() else f.exception())
