"""Run the `mailgw` command line for tests: in this process, or as the real subprocess.

`mailgw_in_process` calls :func:`gateway.cli.main` as ``python -m gateway`` does (same
parser, handlers and exit-code mapping), with stdin, stdout and stderr replaced by buffers
(``.buffer`` included, for the commands that write bytes) and the answer shaped like
:func:`subprocess.run`'s: ``returncode``, ``stdout``, ``stderr``. An argparse exit
(``--help``, a usage error) is its exit code, as in a shell. Logging set up by a command
(``setup_logging``) is put back as it was after the call, so later tests do not log into
a closed buffer.

Most CLI tests use it: a subprocess costs an interpreter start and every import again
(seconds on a loaded CI machine), for the same code. `mailgw_process` is the real thing,
``sys.executable -m gateway``; each command family keeps tests that run it, so the entry
point, the interpreter's exit and a closed pipe are still tested as a shell sees them.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import structlog

__all__ = ["mailgw_in_process", "mailgw_process"]


def _stream(data: bytes = b"") -> io.TextIOWrapper:
    return io.TextIOWrapper(io.BytesIO(data), encoding="utf-8", newline="\n",
                            write_through=True)


def _text(stream: io.TextIOWrapper) -> str:
    """What `subprocess.run(text=True)` makes of the bytes: universal newlines."""
    stream.flush()
    raw = stream.buffer
    assert isinstance(raw, io.BytesIO)
    return raw.getvalue().decode("utf-8", "replace").replace("\r\n", "\n").replace("\r", "\n")


@contextlib.contextmanager
def _logging_kept() -> Iterator[None]:
    """Put structlog's configuration and the root logger back as they were."""
    config = structlog.get_config()
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    levels = {name: logging.getLogger(name).level for name in ("mail.log", "aiosmtpd")}
    try:
        yield
    finally:
        structlog.configure(**config)
        root.handlers[:] = handlers
        root.setLevel(level)
        for name, lvl in levels.items():
            logging.getLogger(name).setLevel(lvl)


def mailgw_in_process(args: Sequence[str], *, stdin: str = "",
                      cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """`mailgw ARGS` run by this interpreter (see the module docstring)."""
    from gateway.cli import main

    out, err, inp = _stream(), _stream(), _stream(stdin.encode())
    chdir = contextlib.chdir(cwd) if cwd is not None else contextlib.nullcontext()
    saved = sys.stdin, sys.stdout, sys.stderr
    sys.stdin, sys.stdout, sys.stderr = inp, out, err
    try:
        with chdir, _logging_kept():
            try:
                code = main(list(args))
            except SystemExit as exc:   # argparse: --help, --version, a usage error
                if exc.code is None or isinstance(exc.code, int):
                    code = exc.code or 0
                else:
                    print(exc.code, file=sys.stderr)
                    code = 1
    finally:
        sys.stdin, sys.stdout, sys.stderr = saved
    return subprocess.CompletedProcess(list(args), code, _text(out), _text(err))


def mailgw_process(args: Sequence[str], *, stdin: str | None = None, cwd: Path | None = None,
                   env: dict[str, str] | None = None,
                   timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """`python -m gateway ARGS` as a real subprocess."""
    return subprocess.run([sys.executable, "-m", "gateway", *args], input=stdin,
                          capture_output=True, text=True, timeout=timeout, cwd=cwd,
                          env={**os.environ, **env} if env is not None else None)
