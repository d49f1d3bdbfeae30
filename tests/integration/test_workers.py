"""`mailgw run` with `workers: 2` as real processes: both workers relay, kill -9 of a worker
loses nothing, SIGTERM drains, SIGHUP with a bad config changes nothing, /metrics sums."""

from __future__ import annotations

import os
import signal
import smtplib
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import free_port
from tests.integration.harness import PASSWORD, USER, Daemon, Sink, write_config
from tests.support.wait import wait_for_sync

pytestmark = pytest.mark.integration


def message(tag: str) -> bytes:
    return (f"From: {USER}\r\nTo: bob@example.net\r\nSubject: {tag}\r\n"
            f"Message-ID: <{tag}@example.com>\r\n\r\nbody of {tag}\r\n").encode()


def send(port: int, tag: str) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as c:
        c.login(USER, PASSWORD)
        c.mail(USER)
        c.rcpt("bob@example.net")
        code, reply = c.data(message(tag))
        assert code == 250, reply


def events(daemon: Daemon, name: str) -> list[dict[str, Any]]:
    return daemon.events(name)


def start_workers(cfg: Path, env: dict[str, str] | None = None) -> Daemon:
    daemon = Daemon(cfg, env=env).start()
    try:
        wait_for_sync(lambda: len(events(daemon, "worker_ready")) >= 2, 60, "both workers ready")
    except BaseException:
        daemon.stop()
        raise
    return daemon


def worker_pids(daemon: Daemon) -> dict[int, int]:
    """The current pid of each worker (the latest `worker_started` of each)."""
    return {e["worker"]: e["pid"] for e in events(daemon, "worker_started")}


def subjects(sink: Sink) -> set[str]:
    return {d.split(b"Subject: ", 1)[1].split(b"\r\n", 1)[0].decode()
            for _, _, d in list(sink.received)}


@pytest.fixture
def sink() -> Iterator[Sink]:
    s = Sink().start()
    yield s
    s.stop()


def metric(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return str(r.read().decode())


def test_two_workers_relay_and_metrics_sum(tmp_path: Path, sink: Sink) -> None:
    admin = free_port()
    cfg = write_config(tmp_path, upstream_port=sink.port, workers=2,
                       listeners={"admin": {"host": "127.0.0.1", "port": admin}})
    daemon = start_workers(cfg)
    try:
        tags = [f"w-{i}" for i in range(30)]
        for tag in tags:          # one connection each: the kernel spreads them
            send(daemon.port, tag)
        wait_for_sync(lambda: set(tags) <= subjects(sink), 30, "every message delivered")
        by = {e["worker"] for e in events(daemon, "queued_copy")}
        assert by == {1, 2}, f"accepted by workers {by}"
        # every scrape, whichever worker answers, counts both workers' messages
        for _ in range(6):
            text = scrape(admin)
            assert metric(text, "mailgw_messages_accepted_total") == 30, text
            assert metric(text, 'mailgw_deliveries_total{result="delivered"}') == 30
    finally:
        assert daemon.stop(timeout=30) == 0


def test_kill_9_of_a_worker_restarts_it_and_delivers_its_spool(tmp_path: Path) -> None:
    sink = Sink()                 # not listening yet: every copy waits in its worker's spool
    cfg = write_config(tmp_path, upstream_port=sink.port, workers=2)
    daemon = start_workers(cfg)
    state = tmp_path / "state"
    try:
        def queued(spool: str) -> int:
            return sum(len(os.listdir(state / spool / s)) for s in ("incoming", "deferred")
                       if (state / spool / s).exists())

        sent: list[str] = []
        for i in range(60):
            tag = f"k-{i}"
            send(daemon.port, tag)
            sent.append(tag)
            if queued("spool-2") and queued("spool") and i >= 5:
                break
        assert queued("spool-2"), "no message landed in worker 2's spool"
        old = worker_pids(daemon)[2]
        os.kill(old, signal.SIGKILL)
        wait_for_sync(lambda: worker_pids(daemon).get(2) not in (None, old), 30,
                      "worker 2 started again")
        wait_for_sync(lambda: len([e for e in events(daemon, "worker_ready")
                                   if e["worker"] == 2]) >= 2, 60, "worker 2 ready again")
        assert any(e["worker"] == 2 and e["status"] == "signal 9"
                   for e in events(daemon, "worker_died"))
        sink.start()
        try:
            wait_for_sync(lambda: set(sent) <= subjects(sink), 60,
                          "every accepted message delivered, worker 2's included")
            wait_for_sync(lambda: queued("spool-2") == 0, 30, "worker 2's spool emptied")
        finally:
            sink.stop()
    finally:
        assert daemon.stop(timeout=30) == 0


def test_sigterm_drains_every_worker(tmp_path: Path, sink: Sink) -> None:
    cfg = write_config(tmp_path, upstream_port=sink.port, workers=2)
    daemon = start_workers(cfg)
    pids = worker_pids(daemon)
    sessions = []
    for _ in range(8):            # sessions in both workers with a transaction under way
        c = smtplib.SMTP("127.0.0.1", daemon.port, timeout=20)
        c.login(USER, PASSWORD)
        assert c.mail(USER)[0] == 250
        sessions.append(c)
    daemon.signal(signal.SIGTERM)
    for c in sessions:            # each is still served by its draining worker
        assert c.noop()[0] == 250
        assert c.quit()[0] == 221
    assert daemon.proc is not None and daemon.proc.wait(timeout=30) == 0
    assert {e["worker"] for e in events(daemon, "stopped") if "worker" in e} == {1, 2}
    for pid in pids.values():
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_sighup_bad_config_reloads_no_worker_good_one_reloads_all(tmp_path: Path,
                                                                   sink: Sink) -> None:
    cfg = write_config(tmp_path, upstream_port=sink.port, workers=2)
    daemon = start_workers(cfg)
    try:
        good = cfg.read_text()
        bad = yaml.safe_load(good)
        bad["listeners"]["submission"]["port"] = "not-a-port"
        cfg.write_text(yaml.safe_dump(bad))
        daemon.signal(signal.SIGHUP)
        wait_for_sync(lambda: events(daemon, "reload_refused"), 15, "the reload refused")
        assert "listeners.submission.port" in daemon.log()
        assert not [e for e in events(daemon, "reload_refused") if "worker" in e], \
            "a worker was asked to reload a config the supervisor refused"
        assert not events(daemon, "reloaded")
        send(daemon.port, "after-bad")
        data = yaml.safe_load(good)
        data["users"][0]["name"] = "Alice Reloaded"
        cfg.write_text(yaml.safe_dump(data))
        daemon.signal(signal.SIGHUP)
        wait_for_sync(lambda: any("worker" not in e for e in events(daemon, "reloaded")), 30,
                      "the supervisor's reloaded")
        assert {e["worker"] for e in events(daemon, "reloaded") if "worker" in e} == {1, 2}
    finally:
        assert daemon.stop(timeout=30) == 0


def test_systemd_ready_after_all_workers_and_watchdog(tmp_path: Path, sink: Sink) -> None:
    import socket

    cfg = write_config(tmp_path, upstream_port=sink.port, workers=2)
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(0.1)
    got: list[str] = []

    def drain() -> list[str]:
        try:
            while True:
                got.append(sock.recv(4096).decode())
        except TimeoutError:
            pass
        return got

    daemon = Daemon(cfg, env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "400000"}).start()
    try:
        wait_for_sync(lambda: any(m.startswith("READY=1") for m in drain()), 60, "READY=1")
        assert len(events(daemon, "worker_ready")) == 2, "READY=1 before both workers were"
        wait_for_sync(lambda: drain().count("WATCHDOG=1") >= 2, 10, "watchdog pings")
        os.kill(worker_pids(daemon)[1], signal.SIGKILL)
        wait_for_sync(lambda: len(events(daemon, "worker_died")) == 1, 10, "the death seen")
        drain()
        got.clear()
        # while worker 1 is down (backoff, then starting) the watchdog is not fed
        wait_for_sync(lambda: worker_pids(daemon)[1] and
                      len([e for e in events(daemon, "worker_ready") if e["worker"] == 1]) >= 2,
                      60, "worker 1 back")
        before_back = [m for m in drain()]
        assert before_back.count("WATCHDOG=1") <= 1, before_back
        got.clear()
        wait_for_sync(lambda: drain().count("WATCHDOG=1") >= 2, 10, "pings again")
    finally:
        assert daemon.stop(timeout=30) == 0
    sock.close()


def test_sighup_while_a_worker_starts_kills_none_and_reloads_it_once_ready(
        tmp_path: Path, sink: Sink) -> None:
    cfg = write_config(tmp_path, upstream_port=sink.port, workers=2)
    daemon = Daemon(cfg)
    assert daemon.proc is None
    daemon.start()                # returns once the first worker listens
    try:
        data = yaml.safe_load(cfg.read_text())
        data["users"][0]["name"] = "Alice Reloaded"
        cfg.write_text(yaml.safe_dump(data))
        daemon.signal(signal.SIGHUP)
        wait_for_sync(lambda: len(events(daemon, "worker_ready")) >= 2, 60, "both workers ready")
        wait_for_sync(lambda: {e["worker"] for e in events(daemon, "reloaded")
                               if "worker" in e} == {1, 2}, 30, "both workers reloaded")
        assert not events(daemon, "worker_died"), "a starting worker was killed by SIGHUP"
        send(daemon.port, "after-early-hup")
        wait_for_sync(lambda: "after-early-hup" in subjects(sink), 15, "delivery")
    finally:
        assert daemon.stop(timeout=30) == 0
