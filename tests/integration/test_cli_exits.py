"""`mailgw` exit codes as a shell sees them: a closed pipe, Ctrl-C and Ctrl-D never print a
traceback, and every command's "not found" exits 1 with `mailgw: ...` on stderr."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from gateway import cli
from gateway.config import load_config
from gateway.spool import Spool

pytestmark = pytest.mark.integration


@pytest.fixture
def cfg(tmp_path: Path) -> Path:
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump({
        "hostname": "gw.example.test", "state_dir": str(tmp_path / "state"),
        "delivery": {"route": "mx"}, "users": []}))
    return path


def test_a_closed_pipe_exits_quietly(cfg: Path) -> None:
    """`mailgw messages list | head -1`: the reader is gone before the command writes."""
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "messages", "list", "-c", str(cfg)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()                 # like `head` exiting
    err = proc.stderr.read().decode()
    assert proc.wait(60) == 141, err
    assert err == ""


@pytest.mark.parametrize("raised, code, message", [
    (KeyboardInterrupt, 130, "mailgw: interrupted\n"),
    (EOFError, 1, "mailgw: no input (end of file)\n"),
])
def test_ctrl_c_and_ctrl_d_at_a_prompt(cfg: Path, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str],
                                       raised: type[BaseException], code: int,
                                       message: str) -> None:
    class Stdin(io.StringIO):
        def isatty(self) -> bool:
            return True
    monkeypatch.setattr(sys, "stdin", Stdin())

    def prompt(text: str = "") -> str:
        raise raised()
    monkeypatch.setattr("getpass.getpass", prompt)
    assert cli.main(["users", "hash", "-c", str(cfg)]) == code
    assert capsys.readouterr().err == message


def test_ctrl_c_in_a_real_process_is_130(cfg: Path) -> None:
    """SIGINT while reading --secret-stdin: 130 and one line, no traceback."""
    code = ("import signal, os, sys; from gateway import cli\n"
            "class In:\n"
            "    def readline(self):\n"
            "        os.kill(os.getpid(), signal.SIGINT); signal.pause()\n"
            "sys.stdin = In()\n"
            f"raise SystemExit(cli.main(['accounts', 'add', '--id', 'x', '--email', 'x@example.com', "
            f"'--secret-stdin', '-c', {str(cfg)!r}]))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert (r.returncode, r.stderr) == (130, "mailgw: interrupted\n"), r.stderr


def test_not_found_is_exit_1_with_one_line_everywhere(cfg: Path) -> None:
    spool = Spool(load_config(cfg).spool_path)
    spool.setup()
    spool.close()
    commands = [
        ("messages", "show", "999"),
        ("queue", "show", "NOPE1"),
        ("queue", "delete", "NOPE1"),
        ("queue", "hold", "NOPE1"),
        ("accounts", "disable", "nobody"),
        ("accounts", "test", "nobody"),
        ("sync", "status", "nobody"),
        ("suppressions", "remove", "nobody@example.com"),
    ]
    for args in commands:
        r = subprocess.run([sys.executable, "-m", "gateway", *args, "-c", str(cfg)],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 1, (args, r.stderr)
        assert r.stderr.startswith("mailgw: ") and r.stderr.count("\n") == 1, (args, r.stderr)
        assert "Traceback" not in r.stderr
