"""Config loading: valid files load; every error names file, line and key."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import load_config, parse_duration, read_secret
from gateway.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
HASH = "$argon2id$v=19$m=65536,t=3,p=4$kumKlkCTqYtNQ2fFQqJ3oA$T7n9YXOz6qMoKUjDgNgw15ZhvCBQzCxNsuxICupOA44"


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "gateway.yaml"
    p.write_text(text)
    return p


def test_example_config_loads() -> None:
    cfg = load_config(ROOT / "gateway.example.yaml")
    assert cfg.listeners.submission is not None
    assert cfg.listeners.submission.port == 2525
    assert cfg.delivery.route == "smarthost"
    assert cfg.store_url.startswith("sqlite+aiosqlite:////")
    assert cfg.delivery.retry.schedule == [60, 300, 900, 3600, 14400]
    assert cfg.delivery.retry.give_up_after == 5 * 86400


def test_errors_name_file_line_and_key(tmp_path: Path) -> None:
    p = write(tmp_path, """hostname: gw.example.com
listeners:
  submission:
    port: notaport
    bogus: 1
users:
  - login: a@example.com
    password_hash: plain-text
delivery:
  route: smarthost
  smarthost: {host: 127.0.0.1}
  retry: {schedule: [1m, soon]}
""")
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    lines = [str(x) for x in ei.value.problems]
    assert f"{p}:4: listeners.submission.port: " in lines[0]
    assert any(s.startswith(f"{p}:5: listeners.submission.bogus: unknown key") for s in lines)
    assert any(s.startswith(f"{p}:8: users[0].password_hash: ") for s in lines)
    assert any(s.startswith(f"{p}:12: delivery.retry.schedule[1]: ") and "soon" in s
               for s in lines)
    assert len(lines) == 4


def test_semantic_errors(tmp_path: Path) -> None:
    p = write(tmp_path, f"""users:
  - login: a@example.com
    password_hash: "{HASH}"
    account: nope
delivery:
  route: smarthost
  smarthost: {{host: 127.0.0.1, username: u, password_file: missing.txt}}
""")
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    text = str(ei.value)
    assert f"{p}:4: users[0].account: no account with id 'nope'" in text
    assert f"{p}:7: delivery.smarthost.password_file: cannot read missing.txt" in text


def test_yaml_syntax_error_has_line(tmp_path: Path) -> None:
    p = write(tmp_path, "hostname: x\nlisteners: [\n  bad\n")
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    assert ei.value.problems[0].line is not None
    assert "YAML syntax error" in ei.value.problems[0].message


def test_tls_needs_cert(tmp_path: Path) -> None:
    p = write(tmp_path, "listeners:\n  submission:\n    tls: starttls\n")
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    assert "needs cert_file and key_file" in str(ei.value)
    assert ei.value.problems[0].line == 2  # the section holding tls:



@pytest.mark.parametrize("listener", ["submission", "ingest"])
def test_unreadable_tls_files_of_an_smtp_listener(tmp_path: Path, listener: str) -> None:
    p = write(tmp_path, f"""listeners:
  {listener}:
    tls: starttls
    cert_file: missing.crt
    key_file: missing.key
""")
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    text = str(ei.value)
    assert f"{p}:4: listeners.{listener}.cert_file: cannot read missing.crt" in text
    assert f"{p}:5: listeners.{listener}.key_file: cannot read missing.key" in text


def test_secrets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "pw").write_text("s3cret\n")
    assert read_secret("pw", tmp_path) == "s3cret"
    monkeypatch.setenv("MAILGW_PW", "fromenv")
    assert read_secret("env:MAILGW_PW", tmp_path) == "fromenv"
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "smarthost.password").write_text("cred")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    assert read_secret("credential:smarthost.password", tmp_path) == "cred"
    monkeypatch.delenv("MAILGW_PW")
    with pytest.raises(FileNotFoundError):
        read_secret("env:MAILGW_PW", tmp_path)


def test_relative_paths_follow_config_dir(tmp_path: Path) -> None:
    p = write(tmp_path, "state_dir: ./state\nstore: {url: 'sqlite+aiosqlite:///./state/x.db'}\n")
    cfg = load_config(p)
    assert cfg.spool_path == tmp_path / "state" / "spool"
    assert cfg.store_url == f"sqlite+aiosqlite:///{tmp_path}/state/x.db"


@pytest.mark.parametrize(("text", "seconds"), [("30s", 30), ("5m", 300), ("4h", 14400),
                                                ("5d", 432000), (90, 90), ("1.5m", 90)])
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


def test_bad_duration() -> None:
    with pytest.raises(ValueError):
        parse_duration("soon")


@pytest.mark.parametrize(("value", "workers"), [("auto", None), ("0", 0), ("3", 3)])
def test_parse_workers(tmp_path: Path, value: str, workers: int | None) -> None:
    from gateway.imap.parsing import MAX_AUTO_WORKERS, workers_for

    cfg = load_config(write(tmp_path, f"hostname: gw.example.com\nsync:\n  parse_workers: {value}\n"))
    got = workers_for(cfg.sync.parse_workers)
    if workers is None:
        assert 1 <= got <= MAX_AUTO_WORKERS
    else:
        assert got == workers


@pytest.mark.parametrize("value", ["-1", "65", "many"])
def test_parse_workers_refused(tmp_path: Path, value: str) -> None:
    with pytest.raises(ConfigError) as ei:
        load_config(write(tmp_path, f"hostname: gw.example.com\nsync:\n  parse_workers: {value}\n"))
    assert any("sync.parse_workers" in str(p) for p in ei.value.problems)


@pytest.mark.parametrize("value", ["0", "many", "true", "1.5", "300"])
def test_workers_must_be_auto_or_a_count(tmp_path: Path, value: str) -> None:
    p = write(tmp_path, f"hostname: gw.example.com\nworkers: {value}\n")
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    (problem,) = [str(x) for x in ei.value.problems]
    assert problem.startswith(f"{p}:2: workers: ") and "`auto` or a number" in problem


def test_workers_auto_is_the_usable_cores_and_the_default(tmp_path: Path) -> None:
    import os

    cores = len(os.sched_getaffinity(0))
    assert load_config(write(tmp_path, "hostname: gw.example.com\n")).worker_count == cores
    assert load_config(write(tmp_path, "hostname: gw.example.com\nworkers: 1\n")).worker_count == 1
    cfg = load_config(write(tmp_path, "hostname: gw.example.com\nworkers: auto\n"))
    assert cfg.worker_count == len(os.sched_getaffinity(0))
    cfg = load_config(write(tmp_path, "hostname: gw.example.com\nworkers: 3\n"))
    assert cfg.worker_count == 3
    assert cfg.worker_spool_path(1) == cfg.spool_path == cfg.state_path / "spool"
    assert cfg.worker_spool_path(3) == cfg.state_path / "spool-3"


def test_parse_workers_auto_shares_the_cores_among_the_daemons_workers() -> None:
    import os

    from gateway.imap.parsing import MAX_AUTO_WORKERS, workers_for

    cores = len(os.sched_getaffinity(0))
    assert workers_for("auto", processes=1) == max(1, min(MAX_AUTO_WORKERS, cores))
    assert workers_for("auto", processes=cores) == 1
    assert workers_for("auto", processes=cores * 4) == 1     # one each at least
    assert workers_for(3, processes=8) == 3                  # a number is taken as given
