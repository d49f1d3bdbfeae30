"""The durable spool: a message is accepted only once it is fsynced and renamed into place.

Queue state is where a file is (Postfix qmgr, Mailman's switchboard)::

    tmp/        being written; never acknowledged; removed at start-up
    incoming/   accepted (the client got 250), not yet attempted
    deferred/   a temporary failure happened; waits for `next_attempt`
    hold/       set aside by an admin (`mailgw queue hold`); not delivered until released
    corrupt/    could not be parsed; kept for a human, never deleted

A queue file is one file named by the queue id::

    MAILGW-SPOOL 1\\n
    {"id": ..., "mail_from": ..., "recipients": [...], ...}\\n      (the envelope, one JSON line)
    <the message bytes, exactly as they will be sent>

Writing is tmp -> write -> fsync -> rename -> fsync(directory). Directory fsyncs of
concurrent writers are coalesced (group commit), so many sessions share one.
Rewrites (a deferral updating recipient states) follow the same steps, so a crash
at any point leaves either the old or the new file, never half of one.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import secrets
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from gateway.errors import NotFound, SpoolError

MAGIC = b"MAILGW-SPOOL 1\n"
STATES = ("incoming", "deferred", "hold", "corrupt")
_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def new_queue_id(now: float | None = None) -> str:
    """A globally unique, time-sortable id (ULID layout: 48-bit ms time + 80 random bits)."""
    ms = int((time.time() if now is None else now) * 1000)
    value = (ms << 80) | secrets.randbits(80)
    out = []
    for _ in range(26):
        out.append(_CROCKFORD[value & 31])
        value >>= 5
    return "".join(reversed(out))


def valid_queue_id(qid: str) -> bool:
    return len(qid) == 26 and all(c in _CROCKFORD for c in qid)


@dataclass
class Recipient:
    addr: str
    status: str = "pending"  # pending | sent | bounced
    attempts: int = 0
    last_reply: str | None = None
    remote: str | None = None


@dataclass
class Envelope:
    id: str
    mail_from: str
    recipients: list[Recipient]
    received_at: float = field(default_factory=time.time)
    attempts: int = 0
    next_attempt: float = 0.0
    user: str | None = None
    account: str | None = None
    client_ip: str | None = None
    client_helo: str | None = None
    message_id: str | None = None
    is_bounce: bool = False
    size: int = 0
    #: the delivery route for this copy when a policy chose one, or "ingest" for the
    #: gateway's own ingest addresses (stored, never delivered); None: delivery.route
    route: str | None = None
    #: the queue id of the message's first copy (copies of one message share it)
    group: str | None = None

    @property
    def pending(self) -> list[Recipient]:
        return [r for r in self.recipients if r.status == "pending"]

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":"), ensure_ascii=True).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> Envelope:
        d: dict[str, Any] = json.loads(raw)
        d["recipients"] = [Recipient(**r) for r in d["recipients"]]
        known = cls.__dataclass_fields__
        return cls(**{k: v for k, v in d.items() if k in known})


class CorruptQueueFile(Exception):
    """A queue file that cannot be parsed."""


def parse_queue_file(raw: bytes) -> tuple[Envelope, bytes]:
    if not raw.startswith(MAGIC):
        raise CorruptQueueFile("bad magic")
    end = raw.find(b"\n", len(MAGIC))
    if end < 0:
        raise CorruptQueueFile("no envelope line")
    try:
        env = Envelope.from_json(raw[len(MAGIC):end])
    except (ValueError, TypeError, KeyError) as exc:
        raise CorruptQueueFile(f"bad envelope: {exc}") from None
    return env, raw[end + 1:]


class _DirSync:
    """Coalesces fsync() of one directory: every caller returns after an fsync that began
    after its call, but concurrent callers share one fsync (group commit)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = asyncio.Lock()
        self._requested = 0
        self._done = 0

    def _fsync(self) -> None:
        fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    async def sync(self) -> None:
        self._requested += 1
        mine = self._requested
        async with self._lock:
            if self._done >= mine:
                return
            upto = self._requested
            await asyncio.to_thread(self._fsync)
            self._done = upto


class Spool:
    """The queue directory; all writes are atomic and durable before they return."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.tmp = self.root / "tmp"
        self._dirsync: dict[str, _DirSync] = {}

    def dir(self, state: str) -> Path:
        if state not in STATES:
            raise ValueError(f"unknown queue state {state!r}")
        return self.root / state

    # -- start-up -----------------------------------------------------------------
    def setup(self) -> None:
        """Create the directories (mode 0700) if they are missing."""
        for d in (self.tmp, *(self.dir(s) for s in STATES)):
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._dirsync = {s: _DirSync(self.dir(s)) for s in STATES}

    def recover(self) -> dict[str, int]:
        """Clean up what a crash left: half-written tmp files (never acknowledged) are
        removed; unparseable queue files go to corrupt/. Returns counts per state."""
        self.setup()
        for p in self.tmp.iterdir():
            p.unlink(missing_ok=True)
        counts = {}
        for state in ("incoming", "deferred", "hold"):
            n = 0
            for qid in self.list_ids(state):
                try:
                    self.read_envelope(state, qid)
                    n += 1
                except CorruptQueueFile:
                    self.move(qid, state, "corrupt")
            counts[state] = n
        counts["corrupt"] = len(self.list_ids("corrupt"))
        return counts

    # -- reading ------------------------------------------------------------------
    def list_ids(self, state: str) -> list[str]:
        try:
            return sorted(n for n in os.listdir(self.dir(state)) if not n.startswith("."))
        except FileNotFoundError:
            return []

    def iter_all(self) -> Iterator[tuple[str, str]]:
        for state in STATES:
            for qid in self.list_ids(state):
                yield state, qid

    def find(self, qid: str) -> str:
        """The state a queue id is in; NotFound if it is in none."""
        for state in STATES:
            if (self.dir(state) / qid).exists():
                return state
        raise NotFound(f"no queue file with id {qid}")

    def read(self, state: str, qid: str) -> tuple[Envelope, bytes]:
        try:
            raw = (self.dir(state) / qid).read_bytes()
        except FileNotFoundError:
            raise NotFound(f"no queue file {state}/{qid}") from None
        return parse_queue_file(raw)

    def read_envelope(self, state: str, qid: str) -> Envelope:
        """Read only the envelope line (cheap for big messages)."""
        try:
            with open(self.dir(state) / qid, "rb") as f:
                head = f.readline()
                if head != MAGIC:
                    raise CorruptQueueFile("bad magic")
                line = f.readline()
        except FileNotFoundError:
            raise NotFound(f"no queue file {state}/{qid}") from None
        if not line.endswith(b"\n"):
            raise CorruptQueueFile("truncated envelope")
        try:
            return Envelope.from_json(line[:-1])
        except (ValueError, TypeError, KeyError) as exc:
            raise CorruptQueueFile(f"bad envelope: {exc}") from None

    # -- writing ------------------------------------------------------------------
    def _write_tmp(self, env: Envelope, data: bytes) -> Path:
        tmp = self.tmp / f"{env.id}.{secrets.token_hex(4)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            view = memoryview(b"".join((MAGIC, env.to_json(), b"\n", data)))
            while view:
                n = os.write(fd, view)
                view = view[n:]
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        os.close(fd)
        return tmp

    def _write_and_rename(self, env: Envelope, data: bytes, state: str) -> None:
        tmp = self._write_tmp(env, data)
        try:
            os.rename(tmp, self.dir(state) / env.id)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    async def put(self, env: Envelope, data: bytes, state: str = "incoming") -> None:
        """Store a new message durably; SpoolError (451 4.3.0) if that is impossible."""
        env.size = len(data)
        try:
            await asyncio.to_thread(self._write_and_rename, env, data, state)
            await self._dirsync[state].sync()
        except OSError as exc:
            raise SpoolError(_os_reason(exc), status="4.3.0") from exc

    def _write_all(self, items: list[tuple[Envelope, bytes]], state: str) -> None:
        tmps: list[Path] = []
        try:
            for env, data in items:
                tmps.append(self._write_tmp(env, data))
        except BaseException:
            for t in tmps:
                t.unlink(missing_ok=True)
            raise
        for (env, _), t in zip(items, tmps, strict=True):
            os.rename(t, self.dir(state) / env.id)

    async def put_all(self, items: list[tuple[Envelope, bytes]], state: str = "incoming") -> None:
        """Store the copies of one message durably, all or none: every file is written and
        fsynced in tmp/ before the first is renamed into `state`; SpoolError (451 4.3.0) if
        that is impossible, and then nothing is queued."""
        if len(items) == 1:
            await self.put(*items[0], state=state)
            return
        for env, data in items:
            env.size = len(data)
        try:
            await asyncio.to_thread(self._write_all, items, state)
            await self._dirsync[state].sync()
        except OSError as exc:
            raise SpoolError(_os_reason(exc), status="4.3.0") from exc

    async def rewrite(self, env: Envelope, data: bytes, old_state: str, new_state: str) -> bool:
        """Replace the queue file (new envelope) and move it to `new_state`.

        Returns False (and writes nothing) when the old file is gone, e.g. an admin
        deleted it while it was being delivered."""
        old = self.dir(old_state) / env.id
        if not old.exists():
            return False
        try:
            await asyncio.to_thread(self._write_and_rename, env, data, new_state)
            await self._dirsync[new_state].sync()
            if old_state != new_state:
                old.unlink(missing_ok=True)
                await self._dirsync[old_state].sync()
        except OSError as exc:
            raise SpoolError(_os_reason(exc)) from exc
        return True

    async def remove(self, state: str, qid: str) -> None:
        (self.dir(state) / qid).unlink(missing_ok=True)
        await self._dirsync[state].sync()

    def move(self, qid: str, src: str, dst: str) -> None:
        """Atomic rename between states (used by `mailgw queue` and recovery)."""
        try:
            os.rename(self.dir(src) / qid, self.dir(dst) / qid)
        except FileNotFoundError:
            raise NotFound(f"no queue file {src}/{qid}") from None
        for d in {src, dst}:
            fd = os.open(self.dir(d), os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def delete(self, qid: str) -> str:
        """Delete a queued message wherever it is (admin action); returns its old state."""
        state = self.find(qid)
        (self.dir(state) / qid).unlink()
        return state


def _os_reason(exc: OSError) -> str:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return "Insufficient disk space in the spool, try again later"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "Spool not writable, try again later"
    return "Local error writing the spool, try again later"
