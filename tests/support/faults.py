"""Injected faults for the fault suite and bench/chaos.py: a small tmpfs, a private PostgreSQL, an
upstream that resets the connection mid-DATA.

- :class:`Tmpfs` mounts a tmpfs of a given size (root only; :func:`can_mount` says whether
  this machine allows it) and fills it to the last byte with :meth:`Tmpfs.fill`.
- :class:`PrivatePostgres` is a throw-away PostgreSQL cluster (``initdb`` + ``pg_ctl`` from
  ``/usr/lib/postgresql/*/bin``) on its own port and socket directory, run as the
  ``postgres`` user when we are root (initdb refuses root), trust authentication on
  127.0.0.1. :meth:`PrivatePostgres.crash` is ``pg_ctl stop -m immediate`` (every backend
  killed, no checkpoint: a crash as far as clients can tell).
- :class:`ResettingUpstream` is a raw asyncio SMTP server that accepts the envelope, reads
  the start of the DATA and then cuts the connection (TCP RST) while `should_reset()` says
  so; otherwise it takes the message and answers 250. It counts what it received by
  Message-ID, so a caller sees duplicates.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import glob
import os
import pwd
import re
import shutil
import socket
import struct
import subprocess
import tempfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

# -- a small file system -------------------------------------------------------------------


def can_mount() -> bool:
    """Whether a tmpfs can be mounted here (root, and a kernel/container that allows it)."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    probe = Path(tempfile.mkdtemp(prefix="mailgw-tmpfs-probe-"))
    try:
        ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(probe)],
                            capture_output=True, timeout=20).returncode == 0
        if ok:
            subprocess.run(["umount", str(probe)], capture_output=True, timeout=20)
        return ok
    finally:
        with contextlib.suppress(OSError):
            probe.rmdir()


class Tmpfs:
    """A tmpfs of `size` bytes mounted at `path` (created), unmounted by :meth:`close`."""

    def __init__(self, path: Path, size: int) -> None:
        self.path = Path(path)
        self.size = size
        self.path.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs",
                        str(self.path)], check=True, capture_output=True, timeout=20)
        self._fillers: list[Path] = []

    def free(self) -> int:
        st = os.statvfs(self.path)
        return st.f_bavail * st.f_frsize

    def fill(self, leave: int = 0) -> int:
        """Write filler files until the file system is full (or only `leave` bytes are free);
        returns the bytes written. :meth:`unfill` takes them away."""
        path = self.path / f"filler.{len(self._fillers)}"
        self._fillers.append(path)
        written = 0
        chunk = b"\0" * 65536
        with open(path, "wb", buffering=0) as f:
            while True:
                room = self.free() - leave
                if room <= 0:
                    break
                try:
                    written += f.write(chunk[:min(len(chunk), room)])
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    break
        return written

    def unfill(self) -> None:
        for p in self._fillers:
            p.unlink(missing_ok=True)
        self._fillers.clear()

    def close(self) -> None:
        subprocess.run(["umount", "-l", str(self.path)], capture_output=True, timeout=20)


# -- a PostgreSQL of our own ---------------------------------------------------------------


def pg_bindir() -> Path | None:
    """The newest ``/usr/lib/postgresql/<version>/bin`` with initdb and pg_ctl, or None
    (None too when we are root and there is no ``postgres`` user to run them as)."""
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return None
    found = [Path(p).parent for p in glob.glob("/usr/lib/postgresql/*/bin/initdb")
             if (Path(p).parent / "pg_ctl").exists()]

    def version(p: Path) -> int:
        m = re.search(r"/(\d+)/bin$", str(p))
        return int(m.group(1)) if m else 0

    return max(found, key=version) if found else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PrivatePostgres:
    """A PostgreSQL cluster in a temporary directory on its own port (database ``postgres``)."""

    def __init__(self, bindir: Path, port: int | None = None) -> None:
        self.bindir = bindir
        self.port = port or _free_port()
        # not under pytest's tmp_path: those directories are 0700 root, the server runs as
        # postgres and needs its data and socket directories
        self.dir = Path(tempfile.mkdtemp(prefix="mailgw-pg-"))
        self.data = self.dir / "data"
        self.log = self.dir / "postgres.log"
        self.user: str | None = None
        if os.geteuid() == 0:
            self.user = "postgres"
            pw = pwd.getpwnam(self.user)
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "-E", "UTF8",
                  "--no-sync", "--no-instructions")

    @property
    def url(self) -> str:
        """The SQLAlchemy URL of its ``postgres`` database (asyncpg driver)."""
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, tool: str, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(self.bindir / tool), *args], user=self.user, cwd=self.dir,
                              capture_output=True, text=True, timeout=timeout, check=True)

    def start(self) -> PrivatePostgres:
        opts = (f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 "
                "-c fsync=off -c max_connections=50")
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", opts, "-w",
                  "-t", "30", "start")
        return self

    def crash(self) -> None:
        """``pg_ctl stop -m immediate``: every connection cut, no shutdown checkpoint."""
        self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")

    def stop(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    @property
    def running(self) -> bool:
        try:
            self._run("pg_ctl", "-D", str(self.data), "status")
        except subprocess.CalledProcessError:
            return False
        return True

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


# -- an upstream that cuts DATA ------------------------------------------------------------

_MID = re.compile(rb"(?im)^Message-ID:[ \t]*(<[^>\r\n]*>)")


class ResettingUpstream:
    """An SMTP server on 127.0.0.1 that resets the connection mid-DATA while `should_reset()`.

    `resets` counts the cut transactions, `transactions` the MAIL commands, `sessions` the
    connections, `received` counts complete messages by Message-ID
    (a value above 1 is a duplicate delivery), `messages` keeps the bytes in arrival order.
    """

    def __init__(self, should_reset: Callable[[], bool] | None = None,
                 resets_first: int = 0) -> None:
        self._left = resets_first
        self.should_reset = should_reset or self._first_n
        #: answers to RCPT by address (e.g. "451 4.2.1 try later"); others get 250
        self.rcpt_replies: dict[str, str] = {}
        #: called when a message has been received, before the 250 is sent
        self.on_message: Callable[[], object] | None = None
        #: the recipients each complete message was accepted for, in arrival order
        self.rcpts: list[list[str]] = []
        self.resets = 0
        self.received: Counter[str] = Counter()
        self.messages: list[bytes] = []
        self.sessions = 0
        self.transactions = 0      # MAIL commands
        self.port = 0
        self._server: asyncio.Server | None = None

    def _first_n(self) -> bool:
        if self._left > 0:
            self._left -= 1
            return True
        return False

    async def start(self) -> ResettingUpstream:
        self._server = await asyncio.start_server(self._session, "127.0.0.1", 0, limit=2**26)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5)
            self._server = None

    async def __aenter__(self) -> ResettingUpstream:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def distinct(self) -> int:
        return len(self.received)

    @property
    def duplicates(self) -> int:
        return sum(n - 1 for n in self.received.values())

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.sessions += 1

        def say(line: bytes) -> None:
            writer.write(line + b"\r\n")

        rcpts: list[str] = []
        try:
            say(b"220 reset.upstream.test ESMTP")
            while True:
                line = await reader.readline()
                if not line:
                    return
                verb = line[:4].upper()
                if verb in (b"EHLO", b"HELO"):
                    say(b"250-reset.upstream.test\r\n250-8BITMIME\r\n250 SIZE 50000000")
                elif verb == b"RCPT":
                    addr = line.split(b"<", 1)[-1].split(b">", 1)[0].decode(errors="replace")
                    refusal = self.rcpt_replies.get(addr)
                    if refusal is None:
                        rcpts.append(addr)
                    say((refusal or "250 2.1.5 OK").encode())
                elif verb in (b"MAIL", b"RSET"):
                    rcpts = []
                    self.transactions += verb == b"MAIL"
                    say(b"250 2.0.0 OK")
                elif verb == b"NOOP":
                    say(b"250 2.0.0 OK")
                elif verb == b"QUIT":
                    say(b"221 2.0.0 Bye")
                    await writer.drain()
                    return
                elif verb == b"DATA":
                    say(b"354 End data with <CR><LF>.<CR><LF>")
                    await writer.drain()
                    if self.should_reset():
                        await reader.read(1)   # the client has started sending the message
                        self.resets += 1
                        _reset(writer)
                        return
                    data = await reader.readuntil(b"\r\n.\r\n")
                    m = _MID.search(data)
                    self.received[m.group(1).decode() if m else "?"] += 1
                    self.messages.append(data)
                    self.rcpts.append(rcpts)
                    if self.on_message is not None:
                        self.on_message()
                    say(b"250 2.0.0 OK queued")
                else:
                    say(b"502 5.5.2 Command not implemented")
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            return
        finally:
            with contextlib.suppress(Exception):
                writer.close()


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP RST (SO_LINGER 0), as a crashing or rebooted server does."""
    sock: Any = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


# -- a sending MTA under load --------------------------------------------------------------

async def smtp_send(port: int, mail_from: str, rcpt: str, msg: bytes, *,
                    login: tuple[str, str] | None = None, timeout: float = 30.0) -> int:
    """One SMTP transaction on a new connection to 127.0.0.1:port; the reply code to the end
    of DATA (or of the command that refused it), 0 when the connection broke first.

    `msg` is the message without the final dot; lines starting with a dot are stuffed.
    A sending MTA keeps the message and tries again unless it got 250 here."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 5)
    except (OSError, TimeoutError):
        return 0

    async def reply() -> int:
        while True:
            line = await asyncio.wait_for(reader.readline(), timeout)
            if len(line) < 4:
                raise ConnectionError("connection closed")
            if line[3:4] != b"-":
                return int(line[:3])

    async def cmd(data: bytes) -> int:
        writer.write(data)
        await writer.drain()
        return await reply()

    try:
        if await reply() != 220 or await cmd(b"EHLO client.fault.test\r\n") != 250:
            return 0
        if login is not None:
            import base64
            token = base64.b64encode(b"\0" + login[0].encode() + b"\0" + login[1].encode())
            if (code := await cmd(b"AUTH PLAIN " + token + b"\r\n")) != 235:
                return code
        for line in (f"MAIL FROM:<{mail_from}>\r\n", f"RCPT TO:<{rcpt}>\r\n"):
            if (code := await cmd(line.encode())) != 250:
                return code
        if (code := await cmd(b"DATA\r\n")) != 354:
            return code
        body = msg if msg.endswith(b"\r\n") else msg + b"\r\n"
        body = re.sub(rb"(?m)^\.", b"..", body)
        code = await cmd(body + b".\r\n")
        with contextlib.suppress(Exception):
            writer.write(b"QUIT\r\n")
            await writer.drain()
        return code
    except (OSError, TimeoutError, ConnectionError, ValueError, asyncio.IncompleteReadError):
        return 0
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


class Load:
    """`sessions` concurrent senders working through `messages`, each message retried on a
    new connection until it gets 250 (as a sending MTA does). `accepted` holds the indexes
    that got 250; `refused` counts replies by code."""

    def __init__(self, port: int, messages: list[bytes], *, sessions: int = 4,
                 mail_from: str = "alice@example.com", rcpt: str = "bob@example.net",
                 login: tuple[str, str] | None = None, pause: float = 0.1) -> None:
        self.port, self.messages, self.sessions = port, messages, sessions
        self.mail_from, self.rcpt, self.login, self.pause = mail_from, rcpt, login, pause
        self.pending = list(range(len(messages)))
        self.accepted: set[int] = set()
        self.refused: Counter[int] = Counter()
        self.attempts = 0

    async def _sender(self) -> None:
        while self.pending:
            i = self.pending.pop(0)
            self.attempts += 1
            code = await smtp_send(self.port, self.mail_from, self.rcpt, self.messages[i],
                                   login=self.login)
            if code == 250:
                self.accepted.add(i)
            else:
                self.refused[code] += 1
                self.pending.append(i)
                await asyncio.sleep(self.pause)

    async def run(self) -> None:
        await asyncio.gather(*(self._sender() for _ in range(self.sessions)))
