"""Run the gateway for tests: a config writer, the App in-process, and the daemon as a subprocess."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import sqlalchemy as sa
import yaml

from gateway.app import App
from gateway.config import load_config
from gateway.passwords import hash_password
from tests.conftest import free_port
from tests.support.cli import mailgw_in_process
from tests.support.wait import wait_for

USER = "alice@example.com"
PASSWORD = "alice-secret"
_HASH: list[str] = []


def password_hash() -> str:
    if not _HASH:
        _HASH.append(hash_password(PASSWORD))
    return _HASH[0]


def deep_update(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            deep_update(base[k], v)
        else:
            base[k] = v
    return base


def write_config(tmp_path: Path, *, upstream_port: int, port: int | None = None,
                 **extra: Any) -> Path:
    """A gateway.yaml relaying to 127.0.0.1:upstream_port with a fast retry schedule."""
    data: dict[str, Any] = {
        "hostname": "gw.example.test",
        "state_dir": str(tmp_path / "state"),
        "listeners": {"submission": {"host": "127.0.0.1", "port": port or free_port(),
                                     "timeout": "30s"}},
        "users": [{"login": USER, "password_hash": password_hash(), "name": "Alice"}],
        "delivery": {"route": "smarthost",
                     "smarthost": {"host": "127.0.0.1", "port": upstream_port, "tls": "none"},
                     "retry": {"schedule": ["1s"], "give_up_after": "1h"},
                     "connection_idle": "2s"},
        "logging": {"format": "json", "level": "info"},
        "drain_timeout": "5s",
    }
    deep_update(data, extra)
    store = data.get("store")
    if isinstance(store, dict) and store.get("url"):
        # a password (MAILGW_TEST_PG=postgresql://u:pw@...) goes to a file, never inline
        url = sa.make_url(store["url"])
        if url.password is not None:
            secret = tmp_path / "store.password"
            secret.write_text(str(url.password))
            store["url"] = url.set(password=None).render_as_string(hide_password=False)
            store["password_file"] = str(secret)
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@contextlib.asynccontextmanager
async def running_app(config_path: Path) -> AsyncIterator[App]:
    app = App(load_config(config_path))
    await app.start()
    try:
        yield app
    finally:
        await app.stop()


#: The integration tests' name for tests.support.wait.wait_for (a predicate, sync or async,
#: polled until true; AssertionError naming `what` after `timeout` seconds).
wait_until = wait_for


def wait_port(port: int, timeout: float = 60.0, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"daemon exited with {proc.returncode} before listening")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.05)
    raise AssertionError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


class Daemon:
    """`python -m gateway run -c PATH` as a real subprocess."""

    def __init__(self, config_path: Path, env: dict[str, str] | None = None, *,
                 group: bool = False) -> None:
        """`group`: the daemon leads a process group of its own (its workers in it), so
        `kill9_group` kills all of it at once as a crash or an OOM kill of the service would."""
        self.config_path = config_path
        self.group = group
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = config_path.parent / "daemon.log"
        self._port: int | None = None

    @property
    def port(self) -> int:
        if self._port is None:  # read once: a test may break the file to test reloads
            cfg = load_config(self.config_path)
            assert cfg.listeners.submission is not None
            self._port = cfg.listeners.submission.port
        return self._port

    def start(self) -> Daemon:
        log = open(self.log_path, "ab")  # noqa: SIM115 - kept open for the child's life
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "run", "-c", str(self.config_path)],
            stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=self.group)
        log.close()
        try:
            wait_port(self.port, proc=self.proc)
        except BaseException:
            # A daemon that never listened must not outlive the failed test.
            self.proc.kill()
            self.proc.wait(10)
            raise
        return self

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def kill9(self) -> None:
        self.signal(signal.SIGKILL)
        assert self.proc is not None
        self.proc.wait(10)

    def kill9_group(self) -> None:
        """SIGKILL to the daemon's whole process group (the supervisor and every worker)."""
        assert self.proc is not None and self.group
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self, timeout: float = 15.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def events(self, name: str) -> list[dict[str, Any]]:
        """The JSON log records of event `name`, in order: whole lines only (the last piece
        of the file may be a line a worker is still writing)."""
        want = f'"event": "{name}"'
        out = []
        for line in self.log().split("\n")[:-1]:
            if want in line:
                with contextlib.suppress(ValueError):
                    rec = json.loads(line)
                    if rec.get("event") == name:
                        out.append(rec)
        return out

    def stop_cleanly(self, timeout: float = 15.0) -> None:
        """SIGTERM, and assert exit 0, with the end of the daemon's log when it is not."""
        code = self.stop(timeout)
        assert code == 0, f"exit {code}; the daemon's log ends:\n{self.log()[-6000:]}"

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """`mailgw ARGS -c CONFIG` in this process (tests/support/cli.py): the daemon is the
        subprocess here; use it only from a plain (not async) test. The daemon's extra
        environment is not the CLI's: a command that needs it runs with `cli_process`."""
        return mailgw_in_process([*args, "-c", str(self.config_path)])

    def cli_process(self, *args: str) -> subprocess.CompletedProcess[str]:
        """`python -m gateway ARGS -c CONFIG` as a real subprocess, in the daemon's environment."""
        return subprocess.run([sys.executable, "-m", "gateway", *args, "-c",
                               str(self.config_path)], capture_output=True, text=True,
                              env=self.env, timeout=60)


def cli(config_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", *args, "-c", str(config_path)],
                          capture_output=True, text=True, timeout=60)


class Sink:
    """A real aiosmtpd upstream on loopback that records what it receives.

    `replies` scripts the answer to DATA: e.g. ["451 4.3.0 try later", None] answers 451
    once and then accepts (None = 250); `rcpt_reply` answers every RCPT with that line.
    """

    def __init__(self, replies: list[str | None] | None = None,
                 rcpt_reply: str | None = None) -> None:
        self.replies = list(replies or [])
        self.rcpt_reply = rcpt_reply
        self.received: list[tuple[str, list[str], bytes]] = []
        self.sessions = 0
        self.port = free_port()
        self._controller: Any = None

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str,
                          options: list[str]) -> str:
        if self.rcpt_reply:
            return self.rcpt_reply
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if self.replies:
            reply = self.replies.pop(0)
            if reply is not None:
                return reply
        self.received.append((envelope.mail_from, list(envelope.rcpt_tos),
                              envelope.original_content))
        return "250 2.0.0 OK"

    def start(self) -> Sink:
        from aiosmtpd.controller import Controller

        self._controller = Controller(self, hostname="127.0.0.1", port=self.port)
        self._controller.start()
        return self

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None
