"""`mailgw run` as a real process: kill -9 safety (one kill under load, and kills at seeded
random moments), SIGTERM, SIGHUP, sd_notify, queue commands."""

from __future__ import annotations

import itertools
import json
import os
import random
import signal
import smtplib
import socket
import sqlite3
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import free_port
from tests.integration.harness import PASSWORD, USER, Daemon, Sink, password_hash, write_config
from tests.support.wait import wait_for_sync

#: every test runs with one process and with a supervisor and two workers (`workers: 2`)
pytestmark = [pytest.mark.integration, pytest.mark.parametrize("workers", [1, 2])]


def message(tag: str) -> bytes:
    return (f"From: {USER}\r\nTo: bob@example.net\r\nSubject: {tag}\r\n"
            f"Message-ID: <{tag}@example.com>\r\n\r\nbody of {tag}\r\n").encode()


def send_one(port: int, tag: str, login: str = USER, password: str = PASSWORD) -> str:
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as c:
        c.login(login, password)
        c.mail(login)
        c.rcpt("bob@example.net")
        code, reply = c.data(message(tag))
        assert code == 250, reply
        return reply.decode()


@pytest.fixture
def sink() -> Iterator[Sink]:
    s = Sink().start()
    yield s
    s.stop()


def test_kill_9_loses_no_accepted_message(tmp_path: Path, sink: Sink, workers: int) -> None:
    cfg = write_config(tmp_path, upstream_port=sink.port, logging={"level": "warning"},
                       workers=workers)
    daemon = Daemon(cfg).start()
    accepted: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()

    def client(n: int) -> None:
        i = 0
        try:
            with smtplib.SMTP("127.0.0.1", daemon.port, timeout=20) as c:
                c.login(USER, PASSWORD)
                while not stop.is_set():
                    tag = f"crash-{n}-{i}"
                    c.mail(USER)
                    c.rcpt("bob@example.net")
                    code, _ = c.data(message(tag))
                    if code == 250:
                        with lock:
                            accepted.append(tag)
                    i += 1
        except (smtplib.SMTPException, OSError):
            return  # the daemon died under us: expected

    threads = [threading.Thread(target=client, args=(n,)) for n in range(10)]
    for t in threads:
        t.start()
    wait_for_sync(lambda: len(accepted) >= 150, 60, "150 accepted messages")
    daemon.kill9()
    stop.set()
    for t in threads:
        t.join(30)
    got_250 = set(accepted)
    daemon.start()  # restart: recovery then delivery of what was queued
    try:
        def delivered_tags() -> list[str]:
            return [d.split(b"Subject: ", 1)[1].split(b"\r\n", 1)[0].decode()
                    for _, _, d in list(sink.received)]
        wait_for_sync(lambda: got_250 <= set(delivered_tags()), 60,
                 "every message that got a 250 to be delivered")
        tags = delivered_tags()
        dups = len(tags) - len(set(tags))
        assert dups <= 25, f"{dups} duplicates"
        print(f"accepted before kill -9: {len(got_250)}, delivered: {len(set(tags))}, "
              f"duplicates: {dups}")
    finally:
        daemon.stop_cleanly()


# --- kill -9 at random moments ---------------------------------------------------------

#: messages the run gets accepted in all; the daemon's whole process group is SIGKILLed
#: KILLS times, at accepted counts drawn by a seeded random choice (never by sleeping)
KILL_MESSAGES = 90
KILLS = 3
KILL_SEED = 9


@dataclass
class KillRun:
    """What one run of `_kill_run` saw (tags are the Message-IDs' local parts)."""

    kills: list[int]            # the accepted counts at which the daemon was killed
    accepted: set[str]          # got a 250
    delivered: Counter[str]     # copies received by the sink
    records: set[str]           # have a relay record in the CRM store
    sent: Counter[str]          # `sent` events for the recipient
    exit_code: int              # of the last daemon, on SIGTERM


class KillingSink(Sink):
    """A sink that, once armed, runs its `kill` at the next delivery it receives: the copy
    before it had its 250 read by the gateway a moment ago, so its `sent` event is in
    the store writer's batch window (a random moment that a crash can really meet)."""

    def __init__(self) -> None:
        super().__init__()
        self.kill: Any = None
        self.killed = threading.Event()

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        reply = await super().handle_DATA(server, session, envelope)
        kill, self.kill = self.kill, None
        if kill is not None:
            kill()
            self.killed.set()
        return reply


def _tag(data: bytes) -> str:
    return data.split(b"Subject: ", 1)[1].split(b"\r\n", 1)[0].decode()


def _kill_run(tmp_path: Path, workers: int) -> KillRun:
    sink = KillingSink()
    sink.start()
    try:
        cfg = write_config(tmp_path, upstream_port=sink.port, logging={"level": "warning"},
                           workers=workers)
        daemon = Daemon(cfg, group=True).start()
        rng = random.Random(KILL_SEED * 10 + workers)
        kills = sorted(rng.sample(range(5, KILL_MESSAGES - 10), KILLS))
        accepted: list[str] = []
        lock = threading.Lock()
        stop = threading.Event()
        up = threading.Event()      # the daemon listens (cleared before each kill)
        up.set()
        numbers = itertools.count()

        def client() -> None:
            """Sends new messages until told to stop; after a broken session it waits
            until the daemon is up again. A message is never sent twice."""
            while not stop.is_set():
                try:
                    with smtplib.SMTP("127.0.0.1", daemon.port, timeout=20) as c:
                        c.login(USER, PASSWORD)
                        while not stop.is_set():
                            tag = f"random-kill-{workers}-{next(numbers)}"
                            c.mail(USER)
                            c.rcpt("bob@example.net")
                            code, _ = c.data(message(tag))
                            if code == 250:
                                with lock:
                                    accepted.append(tag)
                except (smtplib.SMTPException, OSError):
                    up.wait(60)     # killed under us: on again once restarted

        threads = [threading.Thread(target=client) for _ in range(4)]
        for t in threads:
            t.start()
        try:
            for at in kills:
                wait_for_sync(lambda at=at: len(accepted) >= at, 60,  # type: ignore[misc]
                              f"{at} accepted messages")
                up.clear()
                sink.killed.clear()
                sink.kill = daemon.kill9_group     # at the next delivery
                wait_for_sync(sink.killed.is_set, 60, f"the kill after {at} accepted")
                daemon.start()      # recovery, then delivery of what was queued
                up.set()
            wait_for_sync(lambda: len(accepted) >= KILL_MESSAGES, 60,
                          f"{KILL_MESSAGES} accepted messages")
        finally:
            stop.set()
            up.set()
            for t in threads:
                t.join(30)
        got_250 = set(accepted)
        try:
            wait_for_sync(lambda: got_250 <= {_tag(d) for _, _, d in list(sink.received)}, 60,
                          "every message that got a 250 to be delivered")
        finally:
            exit_code = daemon.stop()     # SIGTERM: the store writer drains, then the files are final
        delivered = Counter(_tag(d) for _, _, d in list(sink.received))
    finally:
        sink.stop()
    with sqlite3.connect(tmp_path / "state" / "crm.db") as db:
        records = {str(mid)[1:].split("@", 1)[0] for (mid,) in db.execute(
            "SELECT m.message_id FROM messages m WHERE EXISTS (SELECT 1 FROM message_sources s "
            "WHERE s.message_pk = m.id AND s.source = 'relay')")}
        sent = Counter(str(mid)[1:].split("@", 1)[0] for (mid,) in db.execute(
            "SELECT m.message_id FROM events e JOIN messages m ON m.id = e.message_pk "
            "WHERE e.type = 'sent' AND lower(e.recipient) = 'bob@example.net'"))
    return KillRun(kills=kills, accepted=got_250, delivered=delivered, records=records,
                   sent=sent, exit_code=exit_code)


@pytest.fixture(scope="module")
def kill_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[int, KillRun]:
    """One run per `workers` value, shared by the tests that read it."""
    return {}


def kill_run(runs: dict[int, KillRun], factory: pytest.TempPathFactory, workers: int) -> KillRun:
    if workers not in runs:
        runs[workers] = _kill_run(factory.mktemp(f"random-kill-{workers}"), workers)
    return runs[workers]


def test_kill_9_at_random_moments_loses_no_accepted_message_or_record(
        kill_runs: dict[int, KillRun], tmp_path_factory: pytest.TempPathFactory,
        workers: int) -> None:
    run = kill_run(kill_runs, tmp_path_factory, workers)
    assert len(run.kills) == KILLS and len(run.accepted) >= KILL_MESSAGES
    assert run.accepted <= set(run.delivered), "accepted, never delivered"
    assert not run.accepted - run.records, f"no CRM record: {sorted(run.accepted - run.records)}"
    dups = sum(run.delivered.values()) - len(run.delivered)
    assert dups <= 10 * KILLS, f"{dups} duplicates"
    assert run.exit_code == 0


def test_kill_9_at_random_moments_keeps_one_sent_event_per_delivered_recipient(
        kill_runs: dict[int, KillRun], tmp_path_factory: pytest.TempPathFactory,
        workers: int) -> None:
    run = kill_run(kill_runs, tmp_path_factory, workers)
    wrong = {t: run.sent[t] for t in run.delivered if run.sent[t] != 1}
    assert not wrong, f"{len(wrong)} of {len(run.delivered)} delivered: sent events {wrong}"


def test_sigterm_drains_and_exits_0(tmp_path: Path, sink: Sink, workers: int) -> None:
    cfg = write_config(tmp_path, upstream_port=sink.port, workers=workers)
    daemon = Daemon(cfg).start()
    send_one(daemon.port, "before-term")
    wait_for_sync(lambda: len(sink.received) == 1, 15, "delivery")
    # An idle session does not hold up the drain: it is told 421 at once, while a session
    # with a transaction under way is still served (until the listener's grace runs out).
    idle = smtplib.SMTP("127.0.0.1", daemon.port, timeout=20)
    idle.ehlo("idle")
    busy = smtplib.SMTP("127.0.0.1", daemon.port, timeout=20)
    busy.login(USER, PASSWORD)
    assert busy.mail(USER)[0] == 250
    daemon.signal(signal.SIGTERM)
    assert idle.getreply() == (421, b"4.3.2 Service shutting down")
    idle.close()
    assert busy.noop()[0] == 250
    assert busy.quit()[0] == 221
    assert daemon.proc is not None and daemon.proc.wait(timeout=15) == 0
    assert '"event": "stopped"' in daemon.log()


def test_a_reload_asked_for_while_draining_does_not_kill_the_drain(
        tmp_path: Path, sink: Sink, workers: int) -> None:
    # SIGHUP to every process of the service (as `systemctl reload` racing a stop, or a
    # supervisor's reload owed to a worker that became ready as the stop began) while a
    # session holds the drain: the drain goes on and ends with exit 0
    cfg = write_config(tmp_path, upstream_port=sink.port, workers=workers)
    daemon = Daemon(cfg, group=True).start()
    if workers > 1:
        wait_for_sync(lambda: len(daemon.events("worker_ready")) == workers, 30,
                      "every worker ready")
    busy = smtplib.SMTP("127.0.0.1", daemon.port, timeout=20)
    busy.login(USER, PASSWORD)
    assert busy.mail(USER)[0] == 250
    daemon.signal(signal.SIGTERM)
    stopping = workers + 1 if workers > 1 else 1    # the supervisor's line, then each worker's
    wait_for_sync(lambda: len(daemon.events("stopping")) == stopping, 15, "the drain to begin")
    assert daemon.proc is not None
    os.killpg(daemon.proc.pid, signal.SIGHUP)
    assert busy.noop()[0] == 250      # still served: the session's drain goes on
    assert busy.quit()[0] == 221
    code = daemon.proc.wait(timeout=15)     # no second SIGTERM: the first one's drain ends
    assert code == 0, f"exit {code}; the daemon's log ends:\n{daemon.log()[-6000:]}"


def test_sighup_reloads_and_refuses_invalid_config(tmp_path: Path, sink: Sink, workers: int) -> None:
    cfg = write_config(tmp_path, upstream_port=sink.port, workers=workers)
    daemon = Daemon(cfg).start()
    try:
        good = cfg.read_text()
        bad = yaml.safe_load(good)    # (a second listeners: key would be refused as a duplicate)
        bad["listeners"]["submission"]["port"] = "not-a-port"
        cfg.write_text(yaml.safe_dump(bad))
        daemon.signal(signal.SIGHUP)
        wait_for_sync(lambda: "reload_refused" in daemon.log(), 15, "the reload to be refused")
        assert "listeners.submission.port" in daemon.log()
        send_one(daemon.port, "after-bad-reload")  # still serving on the old config
        data = yaml.safe_load(good)
        data["users"].append({"login": "bob@example.com", "password_hash": password_hash()})
        cfg.write_text(yaml.safe_dump(data))
        daemon.signal(signal.SIGHUP)
        wait_for_sync(lambda: '"event": "reloaded"' in daemon.log(), 15, "the reload")
        send_one(daemon.port, "new-user", login="bob@example.com")
        wait_for_sync(lambda: len(sink.received) == 2, 15, "both deliveries")
    finally:
        daemon.stop_cleanly()


def test_systemd_notify(tmp_path: Path, sink: Sink, workers: int) -> None:
    cfg = write_config(tmp_path, upstream_port=sink.port, workers=workers)
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(0.2)
    got: list[str] = []

    def drain() -> None:
        try:
            while True:
                got.append(sock.recv(4096).decode())
        except TimeoutError:
            pass

    def seen(prefix: str) -> bool:
        drain()
        return any(m.startswith(prefix) for m in got)

    daemon = Daemon(cfg, env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "400000"}).start()
    try:
        wait_for_sync(lambda: seen("READY=1"), 15, "READY=1")
        def pings() -> int:
            drain()
            return sum(m == "WATCHDOG=1" for m in got)
        wait_for_sync(lambda: pings() >= 2, 10, "watchdog pings")
        n_ready = sum(m.startswith("READY=1") for m in got)
        daemon.signal(signal.SIGHUP)
        wait_for_sync(lambda: seen("RELOADING=1"), 10, "RELOADING=1")
        wait_for_sync(lambda: sum(m.startswith("READY=1") for m in got) > n_ready, 10,
                 "READY=1 after the reload")
    finally:
        daemon.stop_cleanly()
    wait_for_sync(lambda: seen("STOPPING=1"), 5, "STOPPING=1")
    sock.close()


def test_queue_commands(tmp_path: Path, workers: int) -> None:
    """With two workers the messages are in either worker's spool: the commands see both."""
    down = free_port()  # nothing listens here yet: deliveries are deferred
    cfg = write_config(tmp_path, upstream_port=down, workers=workers,
                       delivery={"retry": {"schedule": ["1h"]}})
    daemon = Daemon(cfg).start()
    sink = None
    try:
        qid = send_one(daemon.port, "queued-1").rsplit(" ", 1)[1]
        qid2 = send_one(daemon.port, "queued-2").rsplit(" ", 1)[1]

        def listing() -> list[dict[str, Any]]:
            out = daemon.cli("queue", "list", "--json")
            assert out.returncode == 0, out.stderr
            rows: list[dict[str, Any]] = json.loads(out.stdout)
            return rows

        wait_for_sync(lambda: {r["id"]: r["state"] for r in listing()} ==
                 {qid: "deferred", qid2: "deferred"}, 20, "both messages deferred")
        row = next(r for r in listing() if r["id"] == qid)
        rc = row["recipients"][0]
        assert rc["status"] == "pending" and rc["last_reply"].startswith("4")
        show = daemon.cli("queue", "show", qid)
        assert show.returncode == 0 and "Subject: queued-1" in show.stdout
        assert daemon.cli_process("queue", "hold", qid2).returncode == 0   # the real entry point
        assert daemon.cli_process("queue", "delete", "01NOSUCHQUEUEIDNOSUCHQUEU").returncode == 1
        # the upstream comes back; retry delivers now instead of in an hour
        sink = Sink()
        sink.port = down
        sink.start()
        out = daemon.cli("queue", "retry")
        assert out.returncode == 0, out.stderr
        wait_for_sync(lambda: len(sink.received) == 1, 20, "delivery after queue retry")
        assert b"Subject: queued-1" in sink.received[0][2]
        assert [r["state"] for r in listing()] == ["hold"]
        assert daemon.cli("queue", "release", qid2).returncode == 0
        wait_for_sync(lambda: len(sink.received) == 2, 20, "delivery after release")
        assert listing() == []
        assert daemon.cli("queue", "show", qid).returncode == 1
    finally:
        daemon.stop_cleanly()
        if sink is not None:
            sink.stop()
