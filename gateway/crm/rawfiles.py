"""Raw message files on disk, content-addressed: ``<dir>/ab/cd/<sha256>``, each written once, never half.

The file half of :class:`gateway.crm.blobs.RawStore` (``store.raw: disk``), with nothing
but the standard library, so that a process that only parses and writes files (the IMAP
parse workers, :mod:`gateway.imap.parsing`) need not import the database layer.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

__all__ = ["path", "write_files"]


def path(directory: Path, digest: str) -> Path:
    """Where the blob of `digest` lives under `directory`."""
    return directory / digest[:2] / digest[2:4] / digest


def write_files(directory: Path, blobs: Mapping[str, bytes]) -> None:
    """Write each blob not on disk yet (tmp, fsync, rename): never twice, never half.

    The fsyncs of a batch run side by side (the filesystem's journal commits them
    together), so a batch costs about one disk flush, not one per message."""
    pending: list[tuple[Path, Path, int]] = []
    try:
        for digest, data in blobs.items():
            final = path(directory, digest)
            if final.exists():
                continue
            final.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
            tmp = final.with_name(f".{digest}.{os.getpid()}.{uuid.uuid4().hex[:8]}")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
            pending.append((tmp, final, fd))
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        if len(pending) > 1:
            with ThreadPoolExecutor(min(16, len(pending))) as pool:
                list(pool.map(os.fsync, [fd for _, _, fd in pending]))
        elif pending:
            os.fsync(pending[0][2])
        for tmp, final, _ in pending:
            os.replace(tmp, final)
    finally:
        for tmp, _, fd in pending:
            os.close(fd)
            tmp.unlink(missing_ok=True)   # only left over when something failed
