"""The `mailgw` command line: argument parsing and output formatting only.

Each command group lives in its own module (`gateway.cli.<group>`) with a
``register(sub, common)`` function that adds its sub-parser and sets
``func=<handler>`` on it; a handler takes the parsed arguments and returns the exit
code. This module builds the parser from :data:`GROUPS` and maps errors to exit codes:
0 ok, 1 failure at run time (also "not found": `mailgw: no ...` on stderr), 2 bad usage or
invalid configuration, 130 interrupted (Ctrl-C), 141 stdout closed (a pipe's reader left). Listing commands
take `--json` and then print machine-readable JSON only.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from typing import Any

from gateway import __version__
from gateway.cli.common import EXIT_FAIL, EXIT_INTERRUPTED, EXIT_PIPE, EXIT_USAGE, Parser
from gateway.errors import ConfigError, GatewayError, NotFound, UsageError

#: Command-group modules under gateway.cli, in the order `mailgw --help` lists them.
GROUPS: tuple[str, ...] = ("core", "policy", "preview", "dkim", "queue", "messages", "contacts",
                           "companies", "accounts", "sync", "report", "suppressions", "db")


def _parser() -> argparse.ArgumentParser:
    common = Parser(add_help=False)
    common.add_argument("-c", "--config", metavar="PATH",
                        help="configuration file (default ./gateway.yaml, then "
                             "/etc/mailgw/gateway.yaml)")
    p = Parser(prog="mailgw", description="CRM mail gateway", parents=[common])
    p.add_argument("--version", action="version", version=f"mailgw {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)
    for name in GROUPS:
        importlib.import_module(f"gateway.cli.{name}").register(sub, common)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; its exit code. No traceback for the terminal's own events: a
    closed pipe (`mailgw messages list | head -1`) exits 141 quietly, Ctrl-C 130, Ctrl-D
    at a prompt 1 with one line on stderr."""
    try:
        code = _main(argv)
        sys.stdout.flush()   # a reader gone shows here, not in the interpreter's exit
        return code
    except BrokenPipeError:
        _drop_stdout()
        return EXIT_PIPE
    except KeyboardInterrupt:
        print("mailgw: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except EOFError:
        print("mailgw: no input (end of file)", file=sys.stderr)
        return EXIT_FAIL


def _drop_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's last flush has nowhere to fail."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):   # no real descriptor (stdout replaced): nothing to flush
        pass


def _main(argv: Sequence[str] | None) -> int:
    args = _parser().parse_args(argv)
    try:
        result: Any = args.func(args)
        return int(result)
    except ConfigError as exc:
        for p in exc.problems:
            print(p, file=sys.stderr)
        return EXIT_USAGE
    except UsageError as exc:
        print(f"mailgw: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except NotFound as exc:
        print(f"mailgw: {exc}", file=sys.stderr)
        return EXIT_FAIL
    except GatewayError as exc:
        print(f"mailgw: {exc}", file=sys.stderr)
        return EXIT_FAIL


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
