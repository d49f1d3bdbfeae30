"""An asyncio IMAP client for reading a mailbox without changing it: every wait has a timeout.

    async with IMAPClient("imap.example.com", 993, tls="implicit", timeout=60) as imap:
        await imap.login("alice@example.com", password)      # or authenticate_plain/xoauth2/...
        [inbox, sent] = await imap.resolve_folders(["INBOX", "Sent"])
        state = await imap.examine(inbox)                     # read-only; never SELECT
        uids = await imap.search_since(datetime.now(UTC) - timedelta(days=30))
        async for h in imap.fetch_headers(sorted(uids, reverse=True)):   # 200 UIDs a FETCH
            ...decide from h.header...
        async for m in imap.fetch_bodies(wanted):            # BODY.PEEK[]: \\Seen stays unset
            ...
        result = await imap.idle(interval=25 * 60)            # returns on EXISTS/EXPUNGE/FETCH

Reading never changes the server: mailboxes are opened with EXAMINE only, bodies and
headers are fetched with BODY.PEEK, and there is no STORE, COPY, MOVE or EXPUNGE here.
The one write is `append()`, for the copy of mail sent through the gateway in Sent.

Failures are typed where they happen (see `gateway.errors`): the server refusing the
credentials raises `AccountAuthError` with the server's words; network trouble, TLS
errors, BYE, malformed responses and NO with a temporary response code (RFC 5530
UNAVAILABLE, SERVERBUG, INUSE, LIMIT) raise `AccountUnavailable`, and every wait that
runs out raises `AccountTimeout`. After either of those the connection is closed and
every later call raises the same error: make a new client. NO/BAD to one command
raises `IMAPCommandError` and leaves the connection usable.

Why not aioimaplib: version 2.0.3 parses each received chunk recursively, one level per
line, so a FETCH of a few thousand short lines raises RecursionError inside
`data_received` and the command never completes (aioimaplib issue #118); EXAMINE leaves it in the
AUTH state so UID FETCH is refused afterwards; it has no AUTHENTICATE PLAIN with an
authorization identity, no OAUTHBEARER, no STARTTLS, does not answer the error challenge
of a failed XOAUTH2 (the command hangs) and its `idle_start()` hangs when the server goes
away (aioimaplib #110). The wire format here (`protocol.py`) reads literals by their byte count
and tokenizes only the text around them, one response at a time, over asyncio streams.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import ssl
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

from gateway.errors import (
    AccountAuthError,
    AccountError,
    AccountTimeout,
    AccountUnavailable,
    FolderError,
    IMAPCommandError,
)
from gateway.imap import protocol
from gateway.imap.protocol import ProtocolError, Response
from gateway.oauth import sasl

__all__ = [
    "HEADER_FIELDS",
    "REFUSED_SPECIAL_USE",
    "FlagChange",
    "Folder",
    "IMAPClient",
    "IdleEvent",
    "IdleResult",
    "MailboxState",
    "MessageBody",
    "MessageHeaders",
]

_log = logging.getLogger(__name__)

TLS = Literal["none", "starttls", "implicit"]

# What the header-first pass fetches: enough to link a message to contacts, thread it,
# and tell automated mail from people, without the body.
HEADER_FIELDS = ("FROM", "SENDER", "REPLY-TO", "TO", "CC", "BCC", "SUBJECT", "DATE",
                 "MESSAGE-ID", "IN-REPLY-TO", "REFERENCES", "LIST-ID", "LIST-UNSUBSCRIBE",
                 "AUTO-SUBMITTED", "PRECEDENCE", "X-AUTO-RESPONSE-SUPPRESS")

# Special-use folders (RFC 6154, RFC 8457) that are never synced: junk, unsent drafts,
# deleted mail, and views that duplicate other folders.
REFUSED_SPECIAL_USE = frozenset({"\\Junk", "\\Drafts", "\\Trash", "\\All", "\\Flagged",
                                 "\\Important"})
_SPECIAL_USE = frozenset({"\\Sent", "\\Archive", *REFUSED_SPECIAL_USE})

# Configured names that mean a special-use folder, and well-known names of folders on
# servers that do not announce special use.
_ALIASES: dict[str, str] = {
    "sent": "\\Sent", "sent items": "\\Sent", "sent mail": "\\Sent", "sent messages": "\\Sent",
    "archive": "\\Archive", "archives": "\\Archive",
    "junk": "\\Junk", "spam": "\\Junk", "junk e-mail": "\\Junk", "junk email": "\\Junk",
    "bulk mail": "\\Junk",
    "drafts": "\\Drafts", "draft": "\\Drafts",
    "trash": "\\Trash", "deleted items": "\\Trash", "deleted messages": "\\Trash", "bin": "\\Trash",
    "all mail": "\\All", "all": "\\All",
    "starred": "\\Flagged", "flagged": "\\Flagged", "important": "\\Important",
}

# RFC 5530 response codes after which trying again later may work
_TEMPORARY_CODES = frozenset({"UNAVAILABLE", "SERVERBUG", "INUSE", "LIMIT", "CONTACTADMIN"})
_EVENT_KINDS = frozenset({"EXISTS", "EXPUNGE", "FETCH", "VANISHED"})
_MAX_EVENTS = 1000
SEARCH_LIMIT = 2_000_000
"""The most UIDs one UID SEARCH answer may name (after clipping to the range asked for):
a broken or hostile server's `* ESEARCH ... ALL 1:4294967295` raises `ProtocolError`
instead of filling memory. Far above any folder the tailer syncs."""


# -- values ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Folder:
    """One mailbox from LIST: its Unicode name, hierarchy delimiter and flags as sent."""

    name: str
    delimiter: str | None = "/"
    flags: frozenset[str] = frozenset()

    @property
    def special_use(self) -> str | None:
        """`\\Sent`, `\\Junk`, ... (canonical case) when the server flags the folder so."""
        lowered = {f.lower() for f in self.flags}
        for flag in sorted(_SPECIAL_USE):
            if flag.lower() in lowered:
                return flag
        return None

    @property
    def selectable(self) -> bool:
        lowered = {f.lower() for f in self.flags}
        return "\\noselect" not in lowered and "\\nonexistent" not in lowered

    @property
    def leaf(self) -> str:
        """The last component of the name (`[Gmail]/Sent Mail` -> `Sent Mail`)."""
        if self.delimiter and self.delimiter in self.name:
            return self.name.rsplit(self.delimiter, 1)[1]
        return self.name


@dataclass(frozen=True)
class MailboxState:
    """What EXAMINE reports about a mailbox."""

    name: str
    uidvalidity: int
    uidnext: int | None
    exists: int
    highestmodseq: int | None
    read_only: bool


@dataclass(frozen=True)
class MessageHeaders:
    """The header-first view of one message (no body was fetched, nothing was marked)."""

    uid: int
    header: bytes                  # the requested header fields, as raw bytes
    size: int                      # RFC822.SIZE
    internaldate: datetime | None
    flags: frozenset[str]
    modseq: int | None = None


@dataclass(frozen=True)
class MessageBody:
    """One whole message fetched with BODY.PEEK[]."""

    uid: int
    raw: bytes
    flags: frozenset[str]
    internaldate: datetime | None


@dataclass(frozen=True)
class FlagChange:
    """A message whose flags changed since a MODSEQ (CONDSTORE)."""

    uid: int
    flags: frozenset[str]
    modseq: int | None


@dataclass(frozen=True)
class IdleEvent:
    """An untagged response that says the mailbox changed (EXISTS, EXPUNGE, FETCH, VANISHED)."""

    kind: str
    number: int | None
    data: tuple[Any, ...] = ()


@dataclass(frozen=True)
class IdleResult:
    """Why `idle()` returned: `event` (see `events`), `interval` elapsed, or `pending`
    (changes seen during earlier commands were returned without idling)."""

    events: tuple[IdleEvent, ...]
    reason: Literal["event", "interval", "pending"]

    @property
    def exists(self) -> int | None:
        """The last EXISTS count among the events."""
        counts = [e.number for e in self.events if e.kind == "EXISTS"]
        return counts[-1] if counts else None


# -- the client --------------------------------------------------------------------------

Handler = Callable[[Response], bool]


class IMAPClient:
    """One IMAP connection; commands run one at a time (see the module docstring)."""

    def __init__(self, host: str, port: int, *, tls: TLS = "implicit",
                 ca_file: str | Path | None = None, ssl_context: ssl.SSLContext | None = None,
                 timeout: float = 60.0, connect_timeout: float = 30.0,
                 idle_interval: float = 25 * 60.0, idle_liveness: float = 5 * 60.0,
                 fetch_batch: int = 200, body_batch: int = 50,
                 max_line: int = 8 * 1024 * 1024, max_literal: int = 64 * 1024 * 1024) -> None:
        if not 1 <= fetch_batch <= 1000 or not 1 <= body_batch <= 1000:
            raise ValueError("fetch_batch and body_batch must be between 1 and 1000")
        self.host = host
        self.port = port
        self.tls = tls
        self.ca_file = ca_file
        self._ssl_context = ssl_context
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.idle_interval = idle_interval
        self.idle_liveness = idle_liveness
        self.fetch_batch = fetch_batch
        self.body_batch = body_batch
        self.max_line = max_line
        self.max_literal = max_literal
        self.capabilities: frozenset[str] = frozenset()
        self.authenticated = False
        self.selected: MailboxState | None = None
        self.greeting = ""
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._lock = asyncio.Lock()
        self._tag = 0
        self._events: list[IdleEvent] = []
        self._failed: AccountError | None = None
        self._bye: str | None = None
        self._caps_fresh = False
        self.idling = False  # True while an IDLE is active (after the server's "+")

    # -- lifecycle ----------------------------------------------------------------------
    def _context(self) -> ssl.SSLContext:
        if self._ssl_context is not None:
            return self._ssl_context
        return ssl.create_default_context(cafile=str(self.ca_file) if self.ca_file else None)

    async def connect(self) -> None:
        """Open the connection (TLS as configured), read the greeting and capabilities."""
        if self._writer is not None:
            raise RuntimeError("already connected")
        where = f"{self.host}:{self.port}"
        try:
            async with asyncio.timeout(self.connect_timeout):
                ctx = self._context() if self.tls == "implicit" else None
                self._reader, self._writer = await asyncio.open_connection(
                    self.host, self.port, ssl=ctx, limit=self.max_line,
                    server_hostname=self.host if ctx else None)
                greeting = await self._read()
                if greeting.kind not in ("OK", "PREAUTH"):
                    raise AccountUnavailable(f"{where} refused the connection: {greeting.describe()}",
                                             server_text=greeting.describe())
                self.greeting = greeting.describe()
                self.authenticated = greeting.kind == "PREAUTH"
                if greeting.code == "CAPABILITY":
                    self.capabilities = self._caps(greeting.code_args)
                else:
                    await self._simple("CAPABILITY")
                if self.tls == "starttls":
                    await self._starttls()
        except TimeoutError:
            self._close()
            raise self._set_failed(AccountTimeout(
                f"connecting to {where} took longer than {self.connect_timeout:g}s")) from None
        except AccountError as exc:
            self._close()
            raise self._set_failed(exc) from None
        except (OSError, ssl.SSLError, asyncio.IncompleteReadError, ProtocolError) as exc:
            self._close()
            raise self._set_failed(AccountUnavailable(
                f"cannot connect to {where}: {_describe(exc)}")) from None
        _log.debug("connected to %s (tls=%s): %s", where, self.tls, self.greeting)

    async def _starttls(self) -> None:
        if "STARTTLS" not in self.capabilities:
            raise AccountUnavailable(f"{self.host}:{self.port} does not offer STARTTLS")
        await self._simple("STARTTLS")
        assert self._writer is not None
        await self._writer.start_tls(self._context(), server_hostname=self.host)
        self.capabilities = frozenset()
        await self._simple("CAPABILITY")  # forget what was said before TLS (RFC 3501 6.2.1)

    async def __aenter__(self) -> IMAPClient:
        await self.connect()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.logout()

    async def logout(self) -> None:
        """Say LOGOUT (briefly, best effort) and close the connection."""
        if self._writer is not None and self._failed is None:
            with contextlib.suppress(AccountError, asyncio.TimeoutError):
                async with asyncio.timeout(min(self.timeout, 5.0)):
                    await self._simple("LOGOUT")
        self._close()
        if self._failed is None:
            self._failed = AccountUnavailable("the connection was logged out")

    def close(self) -> None:
        """Close the connection at once (no LOGOUT)."""
        self._close()
        if self._failed is None:
            self._failed = AccountUnavailable("the connection was closed")

    def _close(self) -> None:
        if self._writer is not None:
            with contextlib.suppress(Exception):
                self._writer.transport.abort()
        self._writer = None
        self._reader = None

    @property
    def connected(self) -> bool:
        return self._writer is not None and self._failed is None

    def _set_failed(self, exc: AccountError) -> AccountError:
        if self._failed is None:
            self._failed = exc
        self._close()
        return exc

    # -- capabilities -------------------------------------------------------------------
    @staticmethod
    def _caps(text: str) -> frozenset[str]:
        return frozenset(c.upper() for c in text.split())

    def has(self, capability: str) -> bool:
        return capability.upper() in self.capabilities

    @property
    def condstore(self) -> bool:
        return self.has("CONDSTORE")

    @property
    def can_idle(self) -> bool:
        return self.has("IDLE")

    # -- wire plumbing ------------------------------------------------------------------
    async def _read(self, timeout: float | None = None) -> Response:
        """One response within `timeout` (default: the command timeout)."""
        async with asyncio.timeout(self.timeout if timeout is None else timeout):
            return await self._read_raw()

    async def _read_raw(self) -> Response:
        """One response, no timeout; BYE and CAPABILITY are noted whatever else goes on."""
        if self._reader is None:
            raise AccountUnavailable("not connected")
        chunks = await protocol.read_response(self._reader, max_literal=self.max_literal)
        resp = protocol.parse_response(chunks)
        if resp.tag == "*":
            if resp.kind == "BYE":
                self._bye = resp.describe()
            elif resp.kind == "CAPABILITY":
                self.capabilities = frozenset(str(c).upper() for c in resp.data if c)
                self._caps_fresh = True
        if resp.code == "CAPABILITY" and resp.kind in ("OK", "PREAUTH"):
            self.capabilities = self._caps(resp.code_args)
            self._caps_fresh = True
        return resp

    async def _write(self, data: bytes) -> None:
        if self._writer is None:
            raise AccountUnavailable("not connected")
        self._writer.write(data)
        async with asyncio.timeout(self.timeout):
            await self._writer.drain()

    def _next_tag(self) -> str:
        self._tag += 1
        return f"G{self._tag:04d}"

    async def _send_command(self, tag: str, words: Sequence[str | protocol.Literal],
                            scrub: bool = False) -> Response | None:
        """Send `tag words...`; literals are synchronizing unless LITERAL+ is offered.

        Returns the tagged response if the server refused a synchronizing literal early.
        """
        nonsync = self.has("LITERAL+")
        line = tag.encode()
        for w in words:
            if isinstance(w, protocol.Literal):
                if nonsync:
                    line += b" {%d+}\r\n" % len(w.data) + w.data
                    continue
                await self._write(line + b" {%d}\r\n" % len(w.data))
                while True:
                    resp = await self._read()
                    if resp.tag == "+":
                        break
                    if resp.tag == tag:
                        return resp
                    self._untagged(resp, None)
                line = w.data
            else:
                line += b" " + w.encode("utf-8")
        if not scrub:
            _log.debug("C: %s", line[:200])
        await self._write(line + b"\r\n")
        return None

    def _untagged(self, resp: Response, handler: Handler | None) -> None:
        try:
            handled = handler is not None and handler(resp)
        except (ValueError, IndexError, KeyError, TypeError) as exc:
            # A handler reading an answer it cannot make sense of: the server's fault.
            raise ProtocolError(f"cannot read {resp.describe()[:80]!r}: {exc}") from exc
        if handled:
            return
        if resp.tag == "*" and resp.kind in _EVENT_KINDS and self.selected is not None:
            self._events.append(IdleEvent(resp.kind, resp.number, tuple(resp.data)))
            if len(self._events) > _MAX_EVENTS:  # hints only: a tailer rescans by UID anyway
                del self._events[: len(self._events) - _MAX_EVENTS]

    async def _run(self, words: Sequence[str | protocol.Literal], handler: Handler | None = None,
                   *, scrub: bool = False, what: str | None = None) -> Response:
        """Send one command and read until its tagged response; NO/BAD raise typed errors."""
        name = what or next((w for w in words if isinstance(w, str)), "?")
        if self._failed is not None:
            raise self._failed
        async with self._lock:
            if self._failed is not None:
                raise self._failed
            tag = self._next_tag()
            done = False
            try:
                resp = await self._send_command(tag, words, scrub=scrub)
                while resp is None:
                    r = await self._read()
                    if r.tag == tag:
                        resp = r
                    elif r.tag == "*":
                        self._untagged(r, handler)
                    else:
                        raise ProtocolError(f"unexpected response to {name}: {r.describe()}")
                done = True
            except TimeoutError:
                raise self._set_failed(AccountTimeout(
                    f"{name}: no answer from {self.host}:{self.port} within {self.timeout:g}s")) from None
            except (OSError, ssl.SSLError, asyncio.IncompleteReadError, ProtocolError) as exc:
                raise self._set_failed(self._lost(name, exc)) from None
            finally:
                if not done and self._failed is None:
                    # cancelled mid-command: the stream is out of step, never reuse it
                    self._set_failed(AccountUnavailable(f"{name} was interrupted"))
        if resp.kind == "OK":
            return resp
        raise self._refused(name, resp)

    async def _simple(self, *words: str) -> Response:
        return await self._run(words)

    def _lost(self, name: str, exc: BaseException) -> AccountUnavailable:
        if self._bye:
            return AccountUnavailable(f"{name}: the server closed the connection: {self._bye}",
                                      server_text=self._bye)
        return AccountUnavailable(f"{name}: connection to {self.host}:{self.port} lost: "
                                  f"{_describe(exc)}")

    def _refused(self, name: str, resp: Response) -> AccountError:
        words = resp.describe()
        if resp.code in _TEMPORARY_CODES:
            return AccountUnavailable(f"{name} failed: {words}", server_text=words)
        return IMAPCommandError(f"{name} failed: {words}", server_text=words, command=name)

    # -- authentication -----------------------------------------------------------------
    def _auth_failed(self, how: str, resp: Response, extra: str = "") -> AccountError:
        words = resp.describe() + (f" {extra}" if extra else "")
        if resp.code in _TEMPORARY_CODES:
            return AccountUnavailable(f"{how} failed for now: {words}", server_text=words)
        return AccountAuthError(f"{how} refused: {words}", server_text=words)

    async def login(self, username: str, password: str) -> None:
        """LOGIN (the plain password method; prefer `authenticate_password`)."""
        if self.has("LOGINDISABLED"):
            raise AccountAuthError("the server disables LOGIN (it wants TLS or another mechanism)",
                                   server_text="LOGINDISABLED")
        self._caps_fresh = False
        try:
            await self._run(["LOGIN", protocol.quote_astring(username),
                             protocol.quote_astring(password)], scrub=True, what="LOGIN")
        except IMAPCommandError as exc:
            raise AccountAuthError(f"LOGIN refused: {exc.server_text}",
                                   server_text=exc.server_text) from None
        await self._after_auth()

    async def authenticate_password(self, username: str, password: str) -> None:
        """AUTHENTICATE PLAIN when offered (8-bit safe), else LOGIN."""
        if self.has("AUTH=PLAIN"):
            await self.authenticate_plain(username, password)
        else:
            await self.login(username, password)

    async def authenticate_plain(self, username: str, password: str, *,
                                 authzid: str | None = None) -> None:
        """SASL PLAIN (RFC 4616); `authzid` logs in as another user (delegate / master user)."""
        blob = f"{authzid or ''}\0{username}\0{password}".encode()
        await self._sasl("PLAIN", blob)

    async def authenticate_xoauth2(self, username: str, token: str) -> None:
        """XOAUTH2 (Google, Microsoft) with a bearer access token."""
        await self._sasl("XOAUTH2", sasl.xoauth2(username, token))

    async def authenticate_oauthbearer(self, username: str, token: str) -> None:
        """OAUTHBEARER (RFC 7628) with a bearer access token."""
        await self._sasl("OAUTHBEARER", sasl.oauthbearer(username, token, self.host, self.port))

    async def _sasl(self, mechanism: str, initial: bytes) -> None:
        """AUTHENTICATE with one initial response; answer an error challenge and report it."""
        how = f"AUTHENTICATE {mechanism}"
        if not self.has(f"AUTH={mechanism}"):
            raise AccountAuthError(f"the server does not offer {mechanism} "
                                   f"(it offers {', '.join(sorted(self._mechanisms())) or 'none'})",
                                   server_text=f"no AUTH={mechanism}")
        if self._failed is not None:
            raise self._failed
        encoded = base64.b64encode(initial).decode() or "="
        challenge = ""
        self._caps_fresh = False
        async with self._lock:
            tag = self._next_tag()
            done = False
            try:
                if self.has("SASL-IR"):
                    await self._write(f"{tag} AUTHENTICATE {mechanism} {encoded}\r\n".encode())
                else:
                    await self._write(f"{tag} AUTHENTICATE {mechanism}\r\n".encode())
                    while True:
                        first = await self._read()
                        if first.tag == tag:
                            done = True
                            raise self._auth_failed(how, first)
                        if first.tag == "+":
                            break
                        self._untagged(first, None)
                    await self._write(encoded.encode() + b"\r\n")
                answered = 0
                while True:
                    r = await self._read()
                    if r.tag == tag:
                        resp = r
                        break
                    if r.tag == "+":
                        # an error challenge (RFC 7628 3.2.2 / XOAUTH2): note it, answer once
                        challenge = _b64text(r.text)
                        answered += 1
                        reply = b"AQ==" if mechanism == "OAUTHBEARER" else b""
                        await self._write((reply if answered == 1 else b"*") + b"\r\n")
                    else:
                        self._untagged(r, None)
                done = True
            except TimeoutError:
                raise self._set_failed(AccountTimeout(
                    f"{how}: no answer within {self.timeout:g}s")) from None
            except (OSError, ssl.SSLError, asyncio.IncompleteReadError, ProtocolError) as exc:
                raise self._set_failed(self._lost(how, exc)) from None
            finally:
                if not done and self._failed is None:
                    self._set_failed(AccountUnavailable(f"{how} was interrupted"))
        if resp.kind != "OK":
            raise self._auth_failed(how, resp, challenge)
        await self._after_auth()

    def _mechanisms(self) -> set[str]:
        return {c[5:] for c in self.capabilities if c.startswith("AUTH=")}

    async def _after_auth(self) -> None:
        self.authenticated = True
        if not self._caps_fresh:  # servers may offer more after login (RFC 3501 7.2.1)
            await self._simple("CAPABILITY")

    # -- folders ------------------------------------------------------------------------
    async def list_folders(self) -> list[Folder]:
        """Every mailbox with its flags; special-use flags (RFC 6154) when the server has them."""
        folders: list[Folder] = []

        def on_list(r: Response) -> bool:
            if r.kind != "LIST" or len(r.data) < 3:
                return False
            flags, delim, name = r.data[0], r.data[1], r.data[2]
            text = name.decode("utf-8", "replace") if isinstance(name, bytes) else str(name)
            if not isinstance(name, bytes):
                text = protocol.decode_mailbox(text)
            folders.append(Folder(text, delim if isinstance(delim, str) else None,
                                  frozenset(str(f) for f in flags if f) if isinstance(flags, list)
                                  else frozenset()))
            return True

        if self.has("SPECIAL-USE") and self.has("LIST-EXTENDED"):
            await self._run(["LIST", '""', '"*"', "RETURN", "(SPECIAL-USE)"], on_list)
        else:
            await self._run(["LIST", '""', '"*"'], on_list)
        return folders

    async def resolve_folders(self, configured: Iterable[str]) -> list[Folder]:
        """Map configured names to mailboxes: `INBOX`; exact names; `Sent`, `Archive` (and
        `\\Sent`) through special use, so "Sent" finds `Sent Items` or `[Gmail]/Sent Mail`.

        Junk, Drafts, Trash, All Mail, Flagged/Starred and Important are refused, whether
        the server flags them or only names them so. Raises `FolderError` naming every
        configured folder that is missing or refused; duplicates resolve once.
        """
        folders = await self.list_folders()
        out: list[Folder] = []
        problems: dict[str, str] = {}
        for want in configured:
            found = _resolve(want, folders)
            if isinstance(found, str):
                problems[want] = found
            elif found not in out:
                out.append(found)
        if problems:
            raise FolderError(problems)
        return out

    # -- reading a mailbox --------------------------------------------------------------
    async def examine(self, folder: Folder | str) -> MailboxState:
        """Open the mailbox read-only (EXAMINE; with CONDSTORE when offered)."""
        name = folder.name if isinstance(folder, Folder) else folder
        info: dict[str, int | None] = {"exists": 0, "uidvalidity": None, "uidnext": None,
                                       "highestmodseq": None}

        def on_examine(r: Response) -> bool:
            if r.kind == "EXISTS" and r.number is not None:
                info["exists"] = r.number
                return True
            if r.kind == "OK" and r.code in ("UIDVALIDITY", "UIDNEXT", "HIGHESTMODSEQ"):
                args = r.code_args.split()
                if not args:   # `* OK [UIDVALIDITY] x`
                    raise ProtocolError(f"EXAMINE {name}: [{r.code}] without a number")
                limit = protocol.NUMBER_MAX if r.code == "HIGHESTMODSEQ" else protocol.UID_MAX
                info[r.code.lower()] = protocol.parse_number(args[0], limit=limit, what=r.code)
                return True
            return r.kind in ("FLAGS", "RECENT", "OK")

        self.selected = None
        self._events.clear()
        words: list[str | protocol.Literal] = ["EXAMINE", _mailbox_arg(name)]
        if self.condstore:
            words.append("(CONDSTORE)")
        resp = await self._run(words, on_examine, what=f"EXAMINE {name}")
        if info["uidvalidity"] is None:
            raise self._set_failed(AccountUnavailable(f"EXAMINE {name}: the server sent no UIDVALIDITY"))
        state = MailboxState(name=name, uidvalidity=int(info["uidvalidity"]),
                             uidnext=info["uidnext"], exists=int(info["exists"] or 0),
                             highestmodseq=info["highestmodseq"],
                             read_only=resp.code == "READ-ONLY")
        self.selected = state
        return state

    async def search(self, *criteria: str) -> list[int]:
        """UID SEARCH with raw criteria; returns UIDs ascending (ESEARCH when offered).
        An answer naming more than `SEARCH_LIMIT` UIDs, or anything but UIDs, raises
        `AccountUnavailable` (a `ProtocolError` underneath)."""
        return await self._search(criteria)

    async def _search(self, criteria: Sequence[str], low: int = 1,
                      high: int = protocol.UID_MAX) -> list[int]:
        """`search`, keeping only the UIDs in [low, high]: an ESEARCH range is clipped to
        them before it is counted against `SEARCH_LIMIT` and expanded."""
        self._need_selected("UID SEARCH")
        uids: list[int] = []

        def room() -> int:
            return SEARCH_LIMIT - len(uids)

        def on_search(r: Response) -> bool:
            if r.kind == "SEARCH":
                found = [protocol.parse_number(x, limit=protocol.UID_MAX, what="UID")
                         for x in r.data if not isinstance(x, list)]   # (MODSEQ n) dropped
                uids.extend(u for u in found if low <= u <= high)
                if room() < 0:
                    raise ProtocolError(f"UID SEARCH answered more than {SEARCH_LIMIT} UIDs")
                return True
            if r.kind == "ESEARCH":
                items = r.data[1:] if r.data and isinstance(r.data[0], list) else r.data  # (TAG "x")
                for i, key in enumerate(items):
                    if isinstance(key, str) and key.upper() == "ALL":
                        value = items[i + 1] if i + 1 < len(items) else None
                        if not isinstance(value, str):
                            raise ProtocolError("ESEARCH ALL without a sequence set")
                        uids.extend(protocol.parse_uid_set(value, limit=room(), low=low, high=high))
                return True
            return False

        words = ["UID", "SEARCH"]
        if self.has("ESEARCH"):
            words += ["RETURN", "(ALL)"]
        await self._run([*words, *criteria], on_search, what="UID SEARCH")
        return sorted(set(uids))

    async def search_since(self, since: date | datetime) -> list[int]:
        """UIDs of messages whose internal date is on or after that day."""
        return await self.search("SINCE", protocol.format_search_date(since))

    async def search_uids(self, first: int, last: int | None = None) -> list[int]:
        """UIDs that exist in [first, last] (last open: up to the newest message)."""
        upper = "*" if last is None else str(last)
        return await self._search(("UID", f"{first}:{upper}"), low=first,
                                  high=protocol.UID_MAX if last is None else last)

    async def fetch_headers(self, uids: Sequence[int], *, fields: Sequence[str] = HEADER_FIELDS,
                            batch: int | None = None) -> AsyncIterator[MessageHeaders]:
        """Header fields, size, internal date and flags, one UID FETCH per batch (<= 200
        UIDs by default), yielded in the order of `uids`; expunged UIDs are skipped."""
        self._need_selected("UID FETCH")
        section = f"BODY.PEEK[HEADER.FIELDS ({' '.join(f.upper() for f in fields)})]"
        items = f"(UID RFC822.SIZE INTERNALDATE FLAGS {section}{' MODSEQ' if self.condstore else ''})"
        for chunk in _chunks(uids, batch or self.fetch_batch):
            got = await self._fetch(chunk, items)
            for uid in chunk:
                d = got.get(uid)
                if d is None:
                    continue
                yield MessageHeaders(uid=uid, header=_section(d, "BODY[HEADER"),
                                     size=_int(d.get("RFC822.SIZE")) or 0,
                                     internaldate=_date(d.get("INTERNALDATE")),
                                     flags=_flags(d.get("FLAGS")), modseq=_modseq(d.get("MODSEQ")))

    async def fetch_bodies(self, uids: Sequence[int], *, batch: int | None = None
                           ) -> AsyncIterator[MessageBody]:
        """Whole messages with BODY.PEEK[] (never sets \\Seen), `body_batch` UIDs a FETCH."""
        self._need_selected("UID FETCH")
        for chunk in _chunks(uids, batch or self.body_batch):
            got = await self._fetch(chunk, "(UID FLAGS INTERNALDATE BODY.PEEK[])")
            for uid in chunk:
                d = got.pop(uid, None)
                if d is None:
                    continue
                yield MessageBody(uid=uid, raw=_section(d, "BODY[]"), flags=_flags(d.get("FLAGS")),
                                  internaldate=_date(d.get("INTERNALDATE")))

    async def changed_since(self, modseq: int, uids: Sequence[int] | None = None) -> list[FlagChange]:
        """Messages whose flags changed after `modseq` (CONDSTORE `CHANGEDSINCE`)."""
        self._need_selected("UID FETCH")
        if not self.condstore:
            raise IMAPCommandError("the server does not offer CONDSTORE", command="UID FETCH")
        got = await self._fetch(None if uids is None else list(uids), "(UID FLAGS)",
                                modifier=f"(CHANGEDSINCE {int(modseq)})")
        return [FlagChange(uid, _flags(d.get("FLAGS")), _modseq(d.get("MODSEQ")))
                for uid, d in sorted(got.items())]

    async def _fetch(self, uids: Sequence[int] | None, items: str,
                     modifier: str | None = None) -> dict[int, dict[str, Any]]:
        wanted = set(uids) if uids is not None else None
        by_seq: dict[int, dict[str, Any]] = {}

        def on_fetch(r: Response) -> bool:
            if r.kind != "FETCH" or r.number is None or not r.data or not isinstance(r.data[0], list):
                return False
            pairs = r.data[0]
            d = {str(pairs[i]).upper(): pairs[i + 1] for i in range(0, len(pairs) - 1, 2)}
            uid = _int(d.get("UID"))
            if uid is None or (wanted is not None and uid not in wanted):
                return False  # an unsolicited flag update: an event
            by_seq.setdefault(r.number, {}).update(d)
            return True

        words = ["UID", "FETCH", protocol.uid_set(uids) if uids else "1:*", items]
        if modifier:
            words.append(modifier)
        await self._run(words, on_fetch, what="UID FETCH")
        out: dict[int, dict[str, Any]] = {}
        for d in by_seq.values():
            uid = _int(d.get("UID"))
            if uid is not None:
                out[uid] = d
        return out

    def _need_selected(self, name: str) -> None:
        if self.selected is None:
            raise IMAPCommandError(f"{name} needs a mailbox opened with examine()", command=name)

    # -- waiting for changes ------------------------------------------------------------
    async def noop(self) -> list[IdleEvent]:
        """NOOP: a liveness check that also collects changes the server reports."""
        await self._simple("NOOP")
        return self.take_events()

    def take_events(self) -> list[IdleEvent]:
        """Changes (EXISTS, EXPUNGE, FETCH, VANISHED) reported during earlier commands."""
        events, self._events = self._events, []
        return events

    async def idle(self, interval: float | None = None) -> IdleResult:
        """IDLE (RFC 2177) until the mailbox changes or `interval` (default `idle_interval`,
        25 min: re-issue well before servers' 29-30 min limit) elapses; then DONE.

        Liveness: when nothing arrives for `idle_liveness` seconds, DONE is sent and the
        tagged OK must come back within `timeout` (else `AccountTimeout`), then IDLE goes
        on. A server that closes the connection raises `AccountUnavailable` at once.
        Cancelling `idle()` closes the connection.
        """
        self._need_selected("IDLE")
        if self._events:
            return IdleResult(tuple(self.take_events()), "pending")
        if not self.can_idle:
            raise IMAPCommandError("the server does not offer IDLE; poll with noop()", command="IDLE")
        if self._failed is not None:
            raise self._failed
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (self.idle_interval if interval is None else interval)
        async with self._lock:
            done = False
            try:
                while True:
                    events = await self._idle_once(deadline)
                    if events:
                        done = True
                        return IdleResult(tuple(events), "event")
                    if loop.time() >= deadline:
                        done = True
                        return IdleResult((), "interval")
            except TimeoutError:
                raise self._set_failed(AccountTimeout(
                    f"IDLE: {self.host}:{self.port} stopped answering "
                    f"(no reply to DONE within {self.timeout:g}s)")) from None
            except (OSError, ssl.SSLError, asyncio.IncompleteReadError, ProtocolError) as exc:
                raise self._set_failed(self._lost("IDLE", exc)) from None
            finally:
                if not done and self._failed is None:
                    self._set_failed(AccountUnavailable("IDLE was interrupted"))

    async def _idle_once(self, deadline: float) -> list[IdleEvent]:
        """One IDLE ... DONE round; a pending read is never cut off mid-response."""
        loop = asyncio.get_running_loop()
        tag = self._next_tag()
        await self._write(f"{tag} IDLE\r\n".encode())
        while True:
            r = await self._read()
            if r.tag == "+":
                break
            if r.tag == tag:
                raise self._refused("IDLE", r)
            self._untagged(r, None)
        events: list[IdleEvent] = []
        reading: asyncio.Task[Response] | None = None
        self.idling = True
        try:
            while not events:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                if reading is None:
                    reading = asyncio.ensure_future(self._read_raw())
                finished, _ = await asyncio.wait({reading}, timeout=min(remaining, self.idle_liveness))
                if not finished:
                    break  # interval over, or silence: DONE below proves the connection alive
                r, reading = reading.result(), None
                if r.tag == "*" and r.kind in _EVENT_KINDS:
                    events.append(IdleEvent(r.kind, r.number, tuple(r.data)))
                elif r.tag == tag:  # the server ended IDLE by itself
                    if r.kind != "OK":
                        raise self._refused("IDLE", r)
                    return events
            await self._write(b"DONE\r\n")
            async with asyncio.timeout(self.timeout):
                while True:
                    if reading is None:
                        reading = asyncio.ensure_future(self._read_raw())
                    r, reading = await reading, None
                    if r.tag == tag:
                        if r.kind != "OK":
                            raise self._refused("IDLE", r)
                        return events
                    if r.tag == "*" and r.kind in _EVENT_KINDS:
                        events.append(IdleEvent(r.kind, r.number, tuple(r.data)))
        finally:
            self.idling = False
            if reading is not None and not reading.done():
                reading.cancel()
                with contextlib.suppress(BaseException):
                    await reading

    # -- the one write ------------------------------------------------------------------
    async def append(self, folder: Folder | str, raw: bytes, *, flags: Sequence[str] = ("\\Seen",),
                     date: datetime | None = None) -> int | None:
        """APPEND a message (the Sent copy of mail sent through the gateway); returns its UID
        when the server reports it (UIDPLUS APPENDUID), else None."""
        name = folder.name if isinstance(folder, Folder) else folder
        words: list[str | protocol.Literal] = ["APPEND", _mailbox_arg(name)]
        words.append("(" + " ".join(flags) + ")")
        if date is not None:
            words.append(protocol.format_internaldate(date))
        words.append(protocol.Literal(raw))
        resp = await self._run(words, what=f"APPEND {name}")
        if resp.code == "APPENDUID":
            parts = resp.code_args.split()
            if len(parts) == 2:
                with contextlib.suppress(ProtocolError):   # the UID is a hint: None
                    return protocol.parse_number(parts[1], limit=protocol.UID_MAX, what="UID")
        return None


# -- helpers -----------------------------------------------------------------------------

def _mailbox_arg(name: str) -> str | protocol.Literal:
    if name.upper() == "INBOX":
        return "INBOX"
    return protocol.quote_astring(protocol.encode_mailbox(name))


def _resolve(want: str, folders: list[Folder]) -> Folder | str:
    """One configured name -> a Folder, or the reason it cannot be synced."""
    if want.upper() == "INBOX":
        return next((f for f in folders if f.name.upper() == "INBOX"), Folder("INBOX", "/"))
    found = next((f for f in folders if f.name == want), None)
    flag = want if want.startswith("\\") else _ALIASES.get(want.lower())
    if found is None and flag is not None:
        canon = next((s for s in _SPECIAL_USE if s.lower() == flag.lower()), flag)
        found = next((f for f in folders if f.special_use == canon), None)
        if found is None:  # a server without SPECIAL-USE: go by well-known names
            names = {k for k, v in _ALIASES.items() if v == canon}
            found = next((f for f in folders if f.special_use is None
                          and f.leaf.lower() in names), None)
    if found is None:
        found = next((f for f in folders if f.name.lower() == want.lower()), None)
    if found is None:
        listing = ", ".join(sorted(f.name for f in folders)) or "none"
        return f"no such folder on the server (it has: {listing})"
    use = found.special_use or _ALIASES.get(found.leaf.lower())
    if use in REFUSED_SPECIAL_USE and found.name.upper() != "INBOX":
        return f"{found.name!r} is a {use} folder; those are never synced"
    if not found.selectable:
        return f"{found.name!r} cannot be opened (\\Noselect)"
    return found


def _chunks(uids: Sequence[int], size: int) -> Iterable[list[int]]:
    seq = list(uids)
    for i in range(0, len(seq), size):
        yield seq[i:i + size]


def _int(value: Any) -> int | None:
    """A number from a FETCH item (UID, RFC822.SIZE, MODSEQ); None when it is not ASCII
    digits, `ProtocolError` when it is too long or too large for any IMAP number."""
    if isinstance(value, str) and value.isascii() and value.isdigit():
        return protocol.parse_number(value)
    return None


def _flags(value: Any) -> frozenset[str]:
    return frozenset(str(f) for f in value if f) if isinstance(value, list) else frozenset()


def _modseq(value: Any) -> int | None:
    if isinstance(value, list) and value:
        return _int(value[0])
    return None


def _date(value: Any) -> datetime | None:
    return protocol.parse_internaldate(value) if isinstance(value, str) else None


def _section(d: dict[str, Any], prefix: str) -> bytes:
    for key, value in d.items():
        if key.startswith(prefix):
            if isinstance(value, bytes):
                return value
            if isinstance(value, str):
                return value.encode("utf-8", "surrogateescape")
            return b""
    return b""


def _b64text(text: str) -> str:
    try:
        return base64.b64decode(text, validate=True).decode("utf-8", "replace")
    except ValueError:
        return text


def _describe(exc: BaseException) -> str:
    if isinstance(exc, asyncio.IncompleteReadError):
        return "the server closed the connection"
    return str(exc) or type(exc).__name__
