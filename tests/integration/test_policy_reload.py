"""SIGHUP reloads config and policies together: a broken policy keeps both old ones; a fixed one applies."""

from __future__ import annotations

import signal
import smtplib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dkim
import pytest
import yaml

from gateway.keys import dkim as dkimkeys
from tests.integration.harness import PASSWORD, USER, Daemon, Sink, password_hash, write_config
from tests.support.wait import wait_for_sync

pytestmark = pytest.mark.integration


def events(daemon: Daemon, name: str) -> list[dict[str, Any]]:
    return daemon.events(name)


def can_login(port: int, login: str) -> bool:
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as c:
        try:
            c.login(login, PASSWORD)
            return True
        except smtplib.SMTPAuthenticationError:
            return False


@pytest.fixture
def sink() -> Iterator[Sink]:
    s = Sink().start()
    yield s
    s.stop()


def test_sighup_with_broken_policy_keeps_old_config_and_policies(tmp_path: Path,
                                                                 sink: Sink) -> None:
    pol = tmp_path / "policies"
    pol.mkdir()
    (pol / "10-base.yaml").write_text("- name: first rule\n  set: {track_opens: false}\n")
    # one process: the test counts its `policies_loaded` lines (with `workers: auto` each
    # worker logs its own, the second one at any moment; test_workers covers reloads there)
    cfg = write_config(tmp_path, upstream_port=sink.port, policies_dir=str(pol), workers=1)
    daemon = Daemon(cfg).start()
    try:
        wait_for_sync(lambda: events(daemon, "policies_loaded"), 10, "policies loaded at start")
        assert events(daemon, "policies_loaded")[0]["rules"] == ["first rule"]

        # a new config (adds a user) together with a broken policy: both refused
        data = yaml.safe_load(cfg.read_text())
        data["users"].append({"login": "bob@example.com", "password_hash": password_hash()})
        cfg.write_text(yaml.safe_dump(data))
        bad = pol / "20-new.yaml"
        bad.write_text("- name: second rule\n  set: {max_per_day: lots}\n")
        daemon.signal(signal.SIGHUP)
        wait_for_sync(lambda: events(daemon, "reload_refused"), 15, "the reload to be refused")
        problem = events(daemon, "reload_refused")[0]["problem"]
        assert problem.startswith(f"{bad}:2: [0].set.max_per_day: ")
        assert len(events(daemon, "policies_loaded")) == 1
        assert not can_login(daemon.port, "bob@example.com")     # old config still in force
        assert can_login(daemon.port, "alice@example.com")

        # the policy is fixed: config and policies apply together
        bad.write_text("- name: second rule\n  set: {max_per_day: 100}\n")
        daemon.signal(signal.SIGHUP)
        wait_for_sync(lambda: len(events(daemon, "policies_loaded")) == 2, 15, "the reload")
        assert events(daemon, "policies_loaded")[1]["rules"] == ["first rule", "second rule"]
        assert events(daemon, "reloaded")
        assert can_login(daemon.port, "bob@example.com")
    finally:
        daemon.stop_cleanly()


async def test_app_reload_swaps_policy_set(tmp_path: Path, sink: Sink) -> None:
    from tests.integration.harness import running_app

    pol = tmp_path / "policies"
    pol.mkdir()
    rule = pol / "10-cap.yaml"
    rule.write_text("- name: cap\n  set: {max_per_day: 10}\n")
    cfg = write_config(tmp_path, upstream_port=sink.port, policies_dir=str(pol))
    async with running_app(cfg) as app:
        def cap() -> int | None:
            return app.get_policies().decide("alice@example.com", "b@example.org").settings.max_per_day

        assert cap() == 10
        before = app.get_policies()
        rule.write_text("- name: cap\n  set: {max_per_day: many}\n")
        assert await app.reload(cfg) is False
        assert app.get_policies() is before and cap() == 10
        rule.write_text("- name: cap\n  set: {max_per_day: 20}\n")
        assert await app.reload(cfg) is True
        assert cap() == 20
        assert app.get_policies().cfg is app.get_config()


async def test_reload_applies_new_connection_reuse_limits(tmp_path: Path) -> None:
    """`delivery.connection_reuse_count` changed by a SIGHUP-style reload takes effect on
    the pooled upstream connection at once, without a restart."""
    import asyncio

    from tests.integration.harness import USER, running_app, wait_until
    from tests.support.upstream import Upstream

    async with Upstream() as up:
        cfg = write_config(tmp_path, upstream_port=up.port,
                           delivery={"connection_reuse_count": 0, "connection_idle": "1m"})
        async with running_app(cfg) as app:
            assert app.submission is not None
            port = app.submission.port

            def send(n: int) -> None:
                with smtplib.SMTP("127.0.0.1", port, timeout=30) as c:
                    c.login(USER, PASSWORD)
                    for i in range(n):
                        c.sendmail(USER, ["bob@acme.test"],
                                   f"Subject: m{i}\r\nFrom: {USER}\r\n\r\nbody\r\n".encode())

            async def delivered(total: int) -> None:
                await wait_until(lambda: len(up.messages) >= total, 20, f"{total} delivered")

            for i in range(3):   # one after the other: each reuses the pooled connection
                await asyncio.to_thread(send, 1)
                await delivered(i + 1)
            assert up.connections == 1
            data = yaml.safe_load(cfg.read_text())
            data["delivery"]["connection_reuse_count"] = 1
            cfg.write_text(yaml.safe_dump(data))
            assert await app.reload(cfg) is True
            for i in range(2):   # the pooled connection is worn out now: one per message
                await asyncio.to_thread(send, 1)
                await delivered(4 + i)
            assert up.connections == 3, up.connections


def test_sighup_signs_with_the_rotated_dkim_key(tmp_path: Path, sink: Sink) -> None:
    """Keys are parsed once per config (not per signature): a key file rewritten and a
    SIGHUP, and the next message is signed with the new key, not the one kept from before."""
    old, new = dkimkeys.generate("rsa-sha256", 1024), dkimkeys.generate("rsa-sha256", 1024)
    key_file = tmp_path / "dkim.pem"
    key_file.write_bytes(dkimkeys.private_pem(old))
    # one process: with `workers: auto` a worker still starting when the SIGHUP comes
    # reloads only once ready, after the supervisor's "reloaded" (README, SIGHUP with workers)
    cfg = write_config(tmp_path, upstream_port=sink.port, workers=1,
                       dkim={"example.com": {"selector": "s1", "key_file": str(key_file)}})

    def send(n: int) -> bytes:
        with smtplib.SMTP("127.0.0.1", daemon.port, timeout=20) as c:
            c.login(USER, PASSWORD)
            c.sendmail(USER, ["bob@example.net"],
                       f"From: {USER}\r\nTo: bob@example.net\r\nSubject: rotation {n}\r\n"
                       f"Message-ID: <rot{n}@example.com>\r\n\r\nbody {n}\r\n".encode())
        wait_for_sync(lambda: len(sink.received) >= n, 15, f"message {n} at the sink")
        return sink.received[n - 1][2]

    def verifies(raw: bytes, key: dkimkeys.PrivateKey) -> bool:
        record = dkimkeys.dns_record(key).encode()
        return bool(dkim.verify(raw, dnsfunc=lambda name, timeout=5: record))

    daemon = Daemon(cfg).start()
    try:
        first = send(1)
        assert verifies(first, old) and not verifies(first, new)
        key_file.write_bytes(dkimkeys.private_pem(new))
        daemon.signal(signal.SIGHUP)
        wait_for_sync(lambda: events(daemon, "reloaded"), 15, "the reload")
        second = send(2)
        assert verifies(second, new) and not verifies(second, old)
    finally:
        daemon.stop_cleanly()
