"""`mailgw accounts ...` and `mailgw sync status` as an admin runs them, against a running daemon
(subprocesses) that tails a real Dovecot."""

from __future__ import annotations

import contextlib
import io
import json
import re
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from gateway.cli import main
from gateway.config import load_config
from tests.conftest import free_port
from tests.integration.harness import Daemon, write_config
from tests.integration.tailer_support import FAST_SYNC, LEAD, account_dict, new_user
from tests.support.dovecot import Dovecot, message
from tests.support.wait import wait_for_sync

pytestmark = pytest.mark.integration


def mailgw(cfg: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`mailgw ARGS -c CFG` in this process (the daemon is the subprocess here)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([*args, "-c", str(cfg)])
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def mailgw_process(cfg: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", *args, "-c", str(cfg)],
                          capture_output=True, text=True, timeout=60)


def listing(cfg: Path) -> dict[str, dict[str, Any]]:
    r = mailgw(cfg, "accounts", "list", "--json")
    assert r.returncode == 0, r.stderr
    return {a["id"]: a for a in json.loads(r.stdout)}


def db(cfg: Path) -> dict[str, dict[str, Any]]:
    """Account rows and IMAP message counts read straight from the SQLite store (cheap polling)."""
    con = sqlite3.connect(cfg.parent / "state" / "crm.db", timeout=10)
    try:
        con.row_factory = sqlite3.Row
        rows = {r["id"]: dict(r) for r in con.execute(
            "SELECT id, status, lease_owner FROM accounts")}
        for aid, n in con.execute("SELECT account, count(DISTINCT message_pk) FROM message_sources "
                                  "WHERE source = 'imap' GROUP BY account"):
            rows.setdefault(aid, {})["messages"] = n
        return rows
    finally:
        con.close()


def eventually(check: Callable[[], bool], timeout: float, what: str) -> None:
    """Wait for `check()`, reading the database every 0.2 s."""
    wait_for_sync(check, timeout, what, interval=0.2)


def test_accounts_and_sync_status_against_a_running_daemon(dovecot: Dovecot, tmp_path: Path) -> None:
    user, other = new_user(dovecot), new_user(dovecot)
    dovecot.append(user, "INBOX", message("first", sender=LEAD, to=user, message_id="<c1@test>"))
    dovecot.append(user, "Sent Items", message("reply", sender=user, to=LEAD, message_id="<c0@test>"))
    cfg = write_config(tmp_path, upstream_port=free_port(),
                       accounts=[account_dict(dovecot, user, tmp_path),
                                 account_dict(dovecot, other, tmp_path, aid="bad", password="wrong")],
                       sync={**FAST_SYNC, "check_interval": 0.2}, crm={"exclude": []})
    contacts = tmp_path / "contacts.csv"
    contacts.write_text(f"email\n{LEAD}\n")
    assert mailgw(cfg, "contacts", "import", str(contacts)).returncode == 0

    # before the daemon ever ran: configured accounts are listed as they will be
    before = listing(cfg)
    assert before["rep"]["status"] == "active" and before["rep"]["last_sync_at"] is None

    daemon = Daemon(cfg).start()
    try:
        eventually(lambda: (a := db(cfg)).get("rep", {}).get("messages") == 2
                   and a.get("bad", {}).get("status") == "needs_reconnect", 30,
                   "sync and the refused login")
        r = mailgw_process(cfg, "accounts", "list")
        assert r.returncode == 0
        assert "needs_reconnect" in r.stdout and "AUTHENTICATIONFAILED" in r.stdout, r.stdout
        assert "INBOX, Sent" in r.stdout
        assert re.search(r"tailed by node \S+", r.stdout), r.stdout
        r = mailgw(cfg, "sync", "nodes", "--json")      # the daemon's workers: a live node each
        assert r.returncode == 0, r.stderr
        nodes = json.loads(r.stdout)
        assert len(nodes) == load_config(cfg).worker_count, nodes
        assert all(n["live"] is True for n in nodes), nodes
        [node] = [n for n in nodes if n["accounts"]]    # one of them tails the mailbox
        assert node["accounts"] == ["rep"], nodes
        r = mailgw(cfg, "sync", "nodes")
        assert r.returncode == 0 and node["id"] in r.stdout and " live " in r.stdout, r.stdout

        r = mailgw(cfg, "accounts", "test", "rep")
        assert r.returncode == 0, r.stdout + r.stderr
        assert re.search(r"Sent +-> Sent Items \(\\Sent\): 1 message", r.stdout), r.stdout
        assert "IDLE yes" in r.stdout and "Sent copies go to: Sent Items" in r.stdout
        r = mailgw(cfg, "accounts", "test", "bad")
        assert r.returncode == 1 and "AUTHENTICATIONFAILED" in r.stdout, r.stdout
        r = mailgw(cfg, "accounts", "test", "bad", "--json")
        assert r.returncode == 1 and "AUTHENTICATIONFAILED" in json.loads(r.stdout)["server_text"]
        r = mailgw(cfg, "accounts", "test", "nosuch")
        assert r.returncode == 1 and "no account 'nosuch'" in r.stderr

        # disable: the daemon lets go within seconds; enable: it resumes and catches up
        r = mailgw(cfg, "accounts", "disable", "rep")
        assert r.returncode == 0 and "disabled (was active)" in r.stdout
        eventually(lambda: db(cfg)["rep"]["lease_owner"] is None, 10, "the daemon let go")
        dovecot.append(user, "INBOX", message("second", sender=LEAD, to=user, message_id="<c2@test>"))
        assert listing(cfg)["rep"]["status"] == "disabled"
        r = mailgw(cfg, "accounts", "enable", "rep")
        assert r.returncode == 0 and "enabled (was disabled)" in r.stdout
        eventually(lambda: db(cfg)["rep"].get("messages") == 3, 15, "caught up after enable")

        r = mailgw(cfg, "sync", "status", "rep", "--json")
        assert r.returncode == 0, r.stderr
        info = json.loads(r.stdout)
        folders = {f["folder"]: f for f in info["folders_synced"]}
        assert set(folders) == {"INBOX", "Sent Items"}
        assert folders["INBOX"]["messages"] == 2 and folders["INBOX"]["initial_done"]
        assert info["totals"]["messages"] == 3 and info["recent_runs"]
        r = mailgw(cfg, "sync", "status")
        assert r.returncode == 0 and "Sent Items" in r.stdout and "recent runs:" in r.stdout
        assert "AUTHENTICATIONFAILED" in r.stdout                      # bad's refused login
        assert mailgw(cfg, "sync", "status", "nosuch").returncode == 1

        # SIGHUP after fixing the password: the account that needed reconnecting is retried once
        (tmp_path / "bad.password").write_text(dovecot.users[other] + "\n")
        daemon.signal(signal.SIGHUP)
        eventually(lambda: db(cfg)["bad"]["status"] == "active", 15, "bad reconnected after SIGHUP")

        # delete --purge: stops the sync, removes the mail stored from the mailbox
        r = mailgw_process(cfg, "accounts", "delete", "rep", "--purge")
        assert r.returncode == 0, r.stderr
        assert "purged: 3 message(s) removed" in r.stdout, r.stdout
        r = mailgw(cfg, "messages", "list", "--json")
        assert json.loads(r.stdout) == []
        after = listing(cfg)["rep"]
        assert after["status"] == "deleted" and after["messages"] == 0 and after["lease_owner"] is None
    finally:
        daemon.stop_cleanly()
    assert "tailer_started" in daemon.log()
