"""The durable directory queue: crash safety, fsync order, corrupt files kept, group commit."""

from __future__ import annotations

import asyncio
import errno
import functools
import os
import stat
import threading
import time
from pathlib import Path

import pytest

from gateway.dirqueue import DirQueue
from gateway.errors import NotFound

STATES = ("new", "done", "corrupt")


class FsyncLog:
    """An injected fsync that records, for every call, what was fsynced and what the
    queue's state directories held at that moment; then really fsyncs."""

    def __init__(self, q: DirQueue, slow_dirs: float = 0.0) -> None:
        self.q = q
        self.slow_dirs = slow_dirs
        self.events: list[tuple[str, dict[str, list[str]]]] = []
        self._lock = threading.Lock()

    def __call__(self, fd: int) -> None:
        st = os.fstat(fd)
        what = "file"
        if stat.S_ISDIR(st.st_mode):
            what = next(s for s in self.q.states if self.q.dir(s).stat().st_ino == st.st_ino)
            if self.slow_dirs:
                time.sleep(self.slow_dirs)  # a slow disk: later callers queue up behind it
        with self._lock:
            self.events.append((what, {s: self.q.names(s) for s in self.q.states}))
        os.fsync(fd)

    def kinds(self) -> list[str]:
        return [what for what, _ in self.events]


def make(root: Path, *, keep_dirs_open: bool = True) -> tuple[DirQueue, FsyncLog]:
    log: list[FsyncLog] = []
    q = DirQueue(root, STATES, corrupt="corrupt", keep_dirs_open=keep_dirs_open,
                 fsync=lambda fd: log[0](fd), thread_name="test-queue")
    log.append(FsyncLog(q))
    q.setup()
    return q, log[0]


def test_a_file_still_in_tmp_is_not_queued_and_recovery_removes_it(tmp_path: Path) -> None:
    q, _ = make(tmp_path / "q")
    pending = q.create_tmp("A", b"written, never committed")  # the process dies here
    os.close(pending.fd)
    assert pending.path.parent == q.tmp
    assert q.names("new") == [] and q.find("A") is None
    with pytest.raises(NotFound):
        q.read("new", "A")
    counts = DirQueue(tmp_path / "q", STATES, corrupt="corrupt").recover(lambda s, n: True)
    assert counts == {"new": 0, "done": 0, "corrupt": 0}
    assert list(q.tmp.iterdir()) == []


@pytest.mark.parametrize("keep_dirs_open", [True, False])
def test_the_directory_is_fsynced_after_the_rename(tmp_path: Path, keep_dirs_open: bool) -> None:
    q, log = make(tmp_path / "q", keep_dirs_open=keep_dirs_open)
    q.write("new", "A", b"entry A")
    # the file is fsynced while still in tmp/, its directory after it was renamed into new/
    assert log.events == [("file", {"new": [], "done": [], "corrupt": []}),
                          ("new", {"new": ["A"], "done": [], "corrupt": []})]
    assert q.read("new", "A") == b"entry A" and list(q.tmp.iterdir()) == []
    q.write("new", "B", b"entry B")
    assert log.kinds()[2:] == ["file", "new"]     # a second write: its own directory fsync


def test_a_crash_before_the_rename_leaves_no_entry(tmp_path: Path) -> None:
    q = DirQueue(tmp_path / "q", STATES, corrupt="corrupt", fsync=_eio)
    q.setup()
    with pytest.raises(OSError):
        q.write("new", "A", b"entry A")
    assert q.names("new") == [] and list(q.tmp.iterdir()) == []


def _eio(fd: int) -> None:
    raise OSError(errno.EIO, "Input/output error")


def test_write_all_fsyncs_every_file_before_the_first_rename(tmp_path: Path) -> None:
    q, log = make(tmp_path / "q")
    q.write_all("new", ((name, name.encode()) for name in ("A", "B", "C")))
    assert log.kinds() == ["file", "file", "file", "new"]
    assert all(seen["new"] == [] for what, seen in log.events if what == "file")
    assert log.events[-1][1]["new"] == ["A", "B", "C"]


def test_write_all_is_all_or_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    q, _ = make(tmp_path / "q")
    real = os.rename
    calls = 0

    def rename(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError):
        q.write_all("new", [("A", b"a"), ("B", b"b"), ("C", b"c")])
    assert q.names("new") == [] and list(q.tmp.iterdir()) == []


def test_replace_commits_the_new_file_before_the_old_one_goes(tmp_path: Path) -> None:
    q, log = make(tmp_path / "q")
    q.write("new", "A", b"first")
    assert q.replace("A", b"second", "new", "done")
    assert log.kinds() == ["file", "new", "file", "done", "new"]
    both = log.events[3][1]
    assert both["new"] == ["A"] and both["done"] == ["A"]   # never without a copy
    assert log.events[4][1]["new"] == []
    assert q.names("new") == [] and q.read("done", "A") == b"second"
    q.remove("done", "A")
    assert not q.replace("A", b"third", "done", "done")     # gone: nothing comes back
    assert q.names("done") == [] and list(q.tmp.iterdir()) == []


def test_recover_moves_unparseable_files_to_corrupt_and_never_deletes_them(
        tmp_path: Path) -> None:
    q, _ = make(tmp_path / "q")
    q.write("new", "GOOD", b"OK 1")
    q.write("new", "BAD1", b"garbage")
    q.write("done", "BAD2", b"")
    q.write("corrupt", "OLD", b"garbage from before")   # the corrupt state is not checked
    (q.tmp / "GOOD.1234").write_bytes(b"OK half-writ")

    def valid(state: str, name: str) -> bool:
        return q.read(state, name).startswith(b"OK")

    again = DirQueue(tmp_path / "q", STATES, corrupt="corrupt")
    assert again.recover(valid) == {"new": 1, "done": 0, "corrupt": 3}
    assert q.names("new") == ["GOOD"] and q.names("done") == []
    assert q.names("corrupt") == ["BAD1", "BAD2", "OLD"]
    assert q.read("corrupt", "BAD1") == b"garbage" and q.read("corrupt", "OLD").startswith(b"garbage")
    assert list(q.tmp.iterdir()) == []
    assert again.recover(valid) == {"new": 1, "done": 0, "corrupt": 3}  # kept, every time


def test_move_is_durable_in_both_directories(tmp_path: Path) -> None:
    q, log = make(tmp_path / "q")
    q.write("new", "A", b"a")
    q.quarantine("new", "A")
    assert q.names("corrupt") == ["A"] and q.find("A") == "corrupt"
    assert log.kinds()[2:] == ["new", "corrupt"]
    assert log.events[2][1]["corrupt"] == ["A"]            # fsynced after the rename
    q.move("A", "corrupt", "done", sync=False)
    assert q.find("A") == "done" and len(log.events) == 4
    with pytest.raises(NotFound):
        q.move("A", "new", "done")


def test_names_ignore_hidden_files_and_missing_directories(tmp_path: Path) -> None:
    q = DirQueue(tmp_path / "q", STATES, corrupt="corrupt")
    assert q.names("new") == []                             # before setup()
    q.setup()
    (q.dir("new") / ".editor-swap").write_bytes(b"x")
    q.write("new", "B", b"b")
    q.write("new", "A", b"a")
    assert q.names("new") == ["A", "B"]
    with pytest.raises(ValueError):
        q.dir("tmp")
    with pytest.raises(ValueError):
        DirQueue(tmp_path / "other", ("new",), corrupt="corrupt")


def test_remove(tmp_path: Path) -> None:
    q, log = make(tmp_path / "q")
    q.write("new", "A", b"a")
    q.remove("new", "A")
    assert q.names("new") == [] and log.kinds()[-1] == "new"
    q.remove("new", "A")                                    # already gone: fine
    with pytest.raises(FileNotFoundError):
        q.remove("new", "A", sync=False, missing_ok=False)


async def test_run_uses_the_queues_threads_and_group_commits(tmp_path: Path) -> None:
    q, log = make(tmp_path / "q")
    log.slow_dirs = 0.002
    names = [f"E{i:03d}" for i in range(100)]

    def write(name: str) -> str:
        q.write("new", name, name.encode())
        return threading.current_thread().name

    try:
        threads = await asyncio.gather(*(q.run(functools.partial(write, n)) for n in names))
        assert q.names("new") == names
        assert {t.rsplit("-", 1)[0] for t in threads} == {"test-queue"}
        assert log.kinds().count("file") == 100
        assert log.kinds().count("new") < 100              # concurrent writers shared fsyncs
        assert q.syncs["new"]._done == 100
        with pytest.raises(NotFound):
            await q.run(lambda: q.read("new", "missing"))
    finally:
        q.close()


def test_adopt_moves_every_entry_but_tmp_and_keeps_name_clashes(tmp_path: Path) -> None:
    from gateway.dirqueue import adopt

    src, dst = tmp_path / "spool-2", tmp_path / "spool"
    for state, name in (("incoming", "A"), ("deferred", "B"), ("hold", "C"), ("tmp", "T"),
                        ("incoming", "CLASH")):
        (src / state).mkdir(parents=True, exist_ok=True)
        (src / state / name).write_bytes(name.encode())
    (dst / "incoming").mkdir(parents=True)
    (dst / "incoming" / "CLASH").write_bytes(b"theirs")
    assert adopt(src, dst) == 3
    assert (dst / "incoming" / "A").read_bytes() == b"A"
    assert (dst / "deferred" / "B").exists() and (dst / "hold" / "C").exists()
    assert (src / "tmp" / "T").exists() and not (dst / "tmp").exists()
    assert (src / "incoming" / "CLASH").exists()            # never overwritten
    assert (dst / "incoming" / "CLASH").read_bytes() == b"theirs"
    assert adopt(tmp_path / "missing", dst) == 0
