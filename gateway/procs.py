"""Child processes that do not outlive their parent (Linux's parent-death signal)."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal

PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGTERM, parent: int | None = None) -> None:
    """Ask the kernel to send this process `sig` when its parent dies, even by kill -9
    (Linux; elsewhere nothing happens). With `parent` (the pid the parent had), a parent
    already gone before the request was made is noticed too, and `sig` is raised now."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    if parent is not None and os.getppid() != parent:
        os.kill(os.getpid(), sig)
