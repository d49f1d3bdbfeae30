"""The IMAP parse workers (gateway.imap.parsing) never outlive the process that started
them, even when it is killed -9 (a restarted worker or node would otherwise leave a pool
behind each time)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = """
import asyncio
from gateway.imap.parsing import Parsers

async def main():
    parsers = Parsers(2)
    await parsers.start()
    print("ready", flush=True)
    await asyncio.sleep(120)

asyncio.run(main())
"""


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"      # a zombie has ended (only its parent has not reaped it)


def _is_parse_worker(pid: int) -> bool:
    try:
        return b"multiprocessing.spawn" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def test_parse_workers_die_when_their_process_is_killed() -> None:
    if not Path("/proc/self/task").exists():
        pytest.skip("needs Linux /proc")
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        workers = [c for c in _children(proc.pid) if _is_parse_worker(c)]
        assert len(workers) == 2, workers
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        deadline = time.monotonic() + 10
        while any(_alive(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not [w for w in workers if _alive(w)], "parse workers outlived their process"
    finally:
        if proc.poll() is None:
            proc.kill()
