"""systemd notification protocol (sd_notify): READY, RELOADING, STOPPING, WATCHDOG, STATUS.

Speaks the datagram protocol directly over `$NOTIFY_SOCKET` (a path, or an abstract
socket when it starts with `@`), so no libsystemd binding is needed. Without
`$NOTIFY_SOCKET` every call is a no-op.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import Callable


class Notifier:
    """Sends sd_notify messages; `watchdog_interval` is half of `$WATCHDOG_USEC`, if set."""

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        addr = env.get("NOTIFY_SOCKET", "")
        self._addr: str | None = None
        if addr:
            self._addr = "\0" + addr[1:] if addr.startswith("@") else addr
        self.watchdog_interval: float | None = None
        usec = env.get("WATCHDOG_USEC")
        pid = env.get("WATCHDOG_PID")
        if usec and usec.isdigit() and (not pid or pid == str(os.getpid())):
            self.watchdog_interval = int(usec) / 2_000_000
        self._task: asyncio.Task[None] | None = None

    @property
    def enabled(self) -> bool:
        return self._addr is not None

    def notify(self, *fields: str) -> bool:
        if self._addr is None:
            return False
        msg = "\n".join(fields).encode()
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            try:
                s.sendto(msg, self._addr)
            except OSError:
                return False
        return True

    def ready(self, status: str = "") -> None:
        self.notify("READY=1", f"MAINPID={os.getpid()}",
                    *([f"STATUS={status}"] if status else []))

    def reloading(self) -> None:
        self.notify("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")

    def stopping(self) -> None:
        self.notify("STOPPING=1")

    def status(self, text: str) -> None:
        self.notify(f"STATUS={text}")

    def start_watchdog(self, healthy: Callable[[], bool] | None = None) -> None:
        if self.watchdog_interval is None or self._addr is None:
            return

        async def ping() -> None:
            assert self.watchdog_interval is not None
            while True:
                if healthy is None or healthy():
                    self.notify("WATCHDOG=1")
                await asyncio.sleep(self.watchdog_interval)

        self._task = asyncio.create_task(ping(), name="sd-watchdog")

    async def stop_watchdog(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


