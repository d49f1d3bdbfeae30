"""`mailgw check` refuses what `mailgw run` would refuse, with the same message; what `run`
can make itself (a tracking key, a DKIM key from keygen) it makes. Real processes."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa
import yaml

from tests.conftest import PG_ADMIN, free_port, require
from tests.integration.harness import wait_port

ROOT = Path(__file__).resolve().parents[2]


def mailgw(*args: str, cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "gateway", *args], capture_output=True,
                          text=True, cwd=cwd, env=env, timeout=timeout)


def write(tmp_path: Path, **extra: object) -> Path:
    data: dict[str, object] = {
        "hostname": "gw.example.test",
        "state_dir": "./var",
        "listeners": {"submission": {"host": "127.0.0.1", "port": free_port()}},
        "delivery": {"route": "mx"},
        "logging": {"format": "json"},
        **extra,
    }
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def check_and_run_refuse(tmp_path: Path, cfg: Path, message: str) -> None:
    """check exits non-zero naming `message`; run exits non-zero with it too, no traceback."""
    check = mailgw("check", "-c", str(cfg), cwd=tmp_path)
    assert check.returncode != 0, check.stdout
    assert message in check.stderr, check.stderr
    run = mailgw("run", "-c", str(cfg), cwd=tmp_path)
    assert run.returncode != 0
    assert message in run.stderr, run.stderr
    assert "Traceback" not in run.stderr, run.stderr


def test_unsupported_store_url(tmp_path: Path) -> None:
    cfg = write(tmp_path, store={"url": "mysql://crm@db.example.test/crm"})
    check_and_run_refuse(tmp_path, cfg, "gateway.yaml:")
    check_and_run_refuse(tmp_path, cfg, "store.url: unsupported store URL scheme mysql://")


def test_inline_store_password_is_refused(tmp_path: Path) -> None:
    cfg = write(tmp_path, store={"url": "postgresql+asyncpg://crm:hunter2@127.0.0.1/crm"})
    check_and_run_refuse(tmp_path, cfg, "store.url: the URL carries a password inline")
    check_and_run_refuse(tmp_path, cfg, "store.password_file")


def test_unreadable_store_password_file(tmp_path: Path) -> None:
    cfg = write(tmp_path, store={"url": "postgresql+asyncpg://crm@127.0.0.1/crm",
                                 "password_file": "./missing.password"})
    check_and_run_refuse(tmp_path, cfg, "store.password_file: cannot read ./missing.password")


def _pg_reachable() -> bool:
    import asyncio

    import asyncpg

    async def probe() -> bool:
        try:
            conn = await asyncio.wait_for(asyncpg.connect(PG_ADMIN), 5)
        except (OSError, asyncpg.PostgresError, TimeoutError):
            return False
        await conn.close()
        return True

    return asyncio.run(probe())


@pytest.mark.integration
def test_missing_postgresql_database(tmp_path: Path) -> None:
    require(_pg_reachable(), f"PostgreSQL at {sa.make_url(PG_ADMIN).host}")
    admin = sa.make_url(PG_ADMIN)
    store: dict[str, str] = {"url": admin.set(drivername="postgresql+asyncpg", password=None,
                                              database="mailgw_no_such_db").render_as_string()}
    if admin.password is not None:
        (tmp_path / "pg.password").write_text(str(admin.password))
        store["password_file"] = "./pg.password"
    cfg = write(tmp_path, store=store)
    message = 'database "mailgw_no_such_db" does not exist (create it: createdb'
    check_and_run_refuse(tmp_path, cfg, message)
    check = mailgw("check", "-c", str(cfg), cwd=tmp_path)
    assert "store.url: cannot open the store" in check.stderr


def test_store_password_file_reaches_the_url(tmp_path: Path) -> None:
    from gateway.config import load_config

    (tmp_path / "pg.password").write_text("p@ss:w/rd\n")
    cfg = load_config(write(tmp_path, store={"url": "postgresql+asyncpg://crm@db.example.test/crm",
                                             "password_file": "./pg.password"}))
    url = sa.make_url(cfg.store_url)
    assert url.password == "p@ss:w/rd" and url.username == "crm" and url.database == "crm"


def test_tracking_secret_file_is_generated_at_run(tmp_path: Path) -> None:
    port = free_port()
    cfg = write(tmp_path, tracking={"secret_file": "./secrets/tracking.key"},
                listeners={"submission": {"host": "127.0.0.1", "port": free_port()},
                           "tracking": {"host": "127.0.0.1", "port": port}})
    key = tmp_path / "secrets" / "tracking.key"
    check = mailgw("check", "-c", str(cfg), cwd=tmp_path)
    assert check.returncode == 0, check.stderr
    assert ("tracking.secret_file: ./secrets/tracking.key does not exist yet: `mailgw run` "
            "generates a new key there (mode 0600)") in check.stderr
    assert not key.exists()   # check changes nothing
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "run", "-c", str(cfg)], cwd=tmp_path,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_port(port, 60, proc)   # the tracking endpoint is up: it signs with the new key
        assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert key.exists()
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert len(key.read_text().strip()) >= 32
    again = mailgw("check", "-c", str(cfg), cwd=tmp_path)
    assert again.returncode == 0 and "does not exist yet" not in again.stderr


def test_empty_tracking_secret_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "tracking.key").write_text("\n")
    cfg = write(tmp_path, tracking={"secret_file": "./tracking.key"})
    check = mailgw("check", "-c", str(cfg), cwd=tmp_path)
    assert check.returncode == 2
    assert "tracking.secret_file: ./tracking.key is empty" in check.stderr


def test_duplicate_key_names_line_and_key(tmp_path: Path) -> None:
    cfg = tmp_path / "gateway.yaml"
    cfg.write_text("hostname: gw.example.test\n"
                   "listeners:\n"
                   "  submission:\n"
                   "    host: 127.0.0.1\n"
                   "    port: 2525\n"
                   "    port: 2587\n"
                   "hostname: other.example.test\n")
    for command in ("check", "run"):
        out = mailgw(command, "-c", str(cfg), cwd=tmp_path)
        assert out.returncode == 2, out.stderr
        assert (f"{cfg}:6: listeners.submission.port: duplicate key 'port' (first given at line 5"
                in out.stderr), out.stderr
        assert f"{cfg}:7: hostname: duplicate key 'hostname' (first given at line 1" in out.stderr
        assert "Traceback" not in out.stderr


def test_empty_file_is_an_error(tmp_path: Path) -> None:
    cfg = tmp_path / "gateway.yaml"
    cfg.write_text("# nothing yet\n")
    for command in ("check", "run"):
        out = mailgw(command, "-c", str(cfg), cwd=tmp_path)
        assert out.returncode == 2, out.stderr
        assert f"{cfg}:1: the file is empty" in out.stderr, out.stderr


def test_dkim_keygen_writes_the_key_the_config_names(tmp_path: Path) -> None:
    cfg = write(tmp_path, dkim={"example.com": {"selector": "s1", "key_file": "./keys/s1.pem"}})
    before = mailgw("check", "-c", str(cfg), cwd=tmp_path)
    assert before.returncode == 2 and "dkim.example.com.key_file: cannot read ./keys/s1.pem" \
        in before.stderr
    gen = mailgw("dkim", "keygen", "-c", str(cfg), "--domain", "example.com", "--selector", "s1",
                 cwd=tmp_path)
    assert gen.returncode == 0, gen.stderr
    key = tmp_path / "keys" / "s1.pem"      # where the config says, not state_dir/dkim/
    assert f"Wrote {key}" in gen.stdout
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    after = mailgw("check", "-c", str(cfg), cwd=tmp_path)
    assert after.returncode == 0, after.stderr


def test_duplicate_key_in_a_policy_file(tmp_path: Path) -> None:
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "10-x.yaml").write_text("- name: one\n"
                                        "  set: {track_opens: false}\n"
                                        "  set: {track_clicks: false}\n")
    cfg = write(tmp_path, policies_dir="./policies")
    out = mailgw("check", "-c", str(cfg), cwd=tmp_path)
    assert out.returncode == 2
    assert "10-x.yaml:3: [0].set: duplicate key 'set' (first given at line 2" in out.stderr, out.stderr
