"""sd_notify messages reach a datagram socket named by NOTIFY_SOCKET (path or abstract)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from gateway.sdnotify import Notifier
from tests.support.wait import wait_for


def _recv_all(sock: socket.socket) -> list[str]:
    out = []
    sock.setblocking(False)
    while True:
        try:
            out.append(sock.recv(4096).decode())
        except BlockingIOError:
            return out


def test_ready_stopping_status(tmp_path: Path) -> None:
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        n = Notifier({"NOTIFY_SOCKET": path})
        n.ready(status="accepting mail")
        n.reloading()
        n.stopping()
        msgs = _recv_all(sock)
    assert msgs[0].split("\n")[:2] == ["READY=1", f"MAINPID={os.getpid()}"]
    assert "STATUS=accepting mail" in msgs[0]
    assert msgs[1].startswith("RELOADING=1\nMONOTONIC_USEC=")
    assert msgs[2] == "STOPPING=1"


def test_abstract_socket() -> None:
    name = f"mailgw-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        n = Notifier({"NOTIFY_SOCKET": "@" + name})
        assert n.notify("READY=1")
        assert _recv_all(sock) == ["READY=1"]


def test_disabled_without_socket() -> None:
    n = Notifier({})
    assert not n.enabled
    assert n.notify("READY=1") is False


async def test_watchdog_pings(tmp_path: Path) -> None:
    path = str(tmp_path / "wd")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        n = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "100000"})
        assert n.watchdog_interval == 0.05
        n.start_watchdog()
        got: list[str] = []

        def three_pings() -> bool:
            got.extend(_recv_all(sock))
            return got.count("WATCHDOG=1") >= 3

        try:
            await wait_for(three_pings, what="three watchdog pings")
        finally:
            await n.stop_watchdog()


def test_watchdog_for_other_pid_ignored() -> None:
    n = Notifier({"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "100000", "WATCHDOG_PID": "1"})
    assert n.watchdog_interval is None
