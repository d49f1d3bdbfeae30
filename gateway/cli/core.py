"""`mailgw run`, `mailgw check` and `mailgw users hash`."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import ssl
import sys

from gateway.cli.common import EXIT_FAIL, EXIT_OK, Subparsers, config
from gateway.config import Config, find_config, load_config
from gateway.errors import ConfigError, GatewayError, Problem, UsageError


def register(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    run = sub.add_parser("run", parents=[common], help="run the daemon")
    # started by the supervisor (`workers` > 1): "I/N", this process is worker I of N
    run.add_argument("--worker", metavar="I/N", help=argparse.SUPPRESS)
    run.set_defaults(func=_run)
    sub.add_parser("check", parents=[common],
                   help="validate the configuration, policies, templates and key files"
                   ).set_defaults(func=_check)
    users = sub.add_parser("users", parents=[common], help="SMTP AUTH users")
    us = users.add_subparsers(dest="users_cmd", required=True, parser_class=type(common))
    us.add_parser("hash", parents=[common],
                  help="read a password (prompt, or one line on stdin), print its hash"
                  ).set_defaults(func=_users_hash)


def _worker(value: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in value.split("/"))
    except ValueError:
        raise UsageError(f"--worker {value!r}: expected I/N") from None
    if not 1 <= i <= n:
        raise UsageError(f"--worker {value!r}: expected 1 <= I <= N")
    return i, n


def _run(args: argparse.Namespace) -> int:
    import os

    from gateway.app import Worker, run_daemon
    from gateway.log import setup_logging

    cfg = config(args)
    setup_logging(cfg.logging)
    path = find_config(args.config)
    try:
        if args.worker:
            from gateway.procs import die_with_parent

            index, count = _worker(args.worker)
            parent = os.getppid()
            die_with_parent()
            if os.getppid() != parent:   # the supervisor died before the line above
                return EXIT_FAIL
            worker = Worker(index, count, os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
            return asyncio.run(run_daemon(cfg, path, worker))
        if cfg.worker_count > 1:
            from gateway.supervisor import run_supervisor

            return asyncio.run(run_supervisor(cfg, path))
        return asyncio.run(run_daemon(cfg, path))
    except ConfigError:
        raise  # invalid policies at start: every problem listed, exit 2
    except GatewayError as exc:
        import structlog

        structlog.get_logger("mailgw").error("startup_failed", error=str(exc))
        print(f"mailgw: {exc}", file=sys.stderr)
        return EXIT_FAIL
    except OSError as exc:  # e.g. the port is taken
        print(f"mailgw: cannot start: {exc}", file=sys.stderr)
        return EXIT_FAIL


def _check(args: argparse.Namespace) -> int:
    from gateway.policy import policies_for

    path = find_config(args.config)
    warnings: list[Problem] = []
    cfg = load_config(path, warnings)  # raises ConfigError with every problem
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    problems: list[Problem] = []
    policies = None
    try:
        policies = policies_for(cfg)
    except ConfigError as exc:
        problems += exc.problems
    for name in ("submission", "ingest"):
        lst = getattr(cfg.listeners, name)
        if lst is not None and lst.tls != "none":
            from gateway.smtp.server import server_tls_context

            try:
                server_tls_context(cfg, lst)
            except (ssl.SSLError, OSError) as exc:
                problems.append(Problem(str(path), None, f"listeners.{name}.cert_file",
                                        f"certificate and key do not load together: {exc}"))
    problems += _store_problems(cfg, str(path))
    if problems:
        raise ConfigError(problems)
    assert policies is not None
    print(f"{path}: OK ({len(cfg.users)} users, {len(cfg.accounts)} accounts, "
          f"route {cfg.delivery.route}, {len(policies)} policy rules in "
          f"{len(policies.files)} files, {len(policies.templates)} templates)")
    return EXIT_OK


def _store_problems(cfg: Config, file: str) -> list[Problem]:
    """A PostgreSQL store is opened as `run` opens it (connection, database, schema), so
    check fails with the message run would give. SQLite is created by `run`; not touched."""
    from gateway.crm.engine import parse_url
    from gateway.crm.store import Store
    from gateway.errors import StoreError

    url = cfg.store_url
    try:
        if parse_url(url).get_backend_name() != "postgresql":
            return []

        async def probe() -> None:
            store = await Store.open(url, auto_upgrade=False)
            await store.close()

        asyncio.run(probe())
    except StoreError as exc:
        line = _line_of(cfg, ("store", "url"))
        return [Problem(file, line, "store.url", str(exc))]
    return []


def _line_of(cfg: Config, loc: tuple[str, ...]) -> int | None:
    from pathlib import Path

    from gateway.config import load_yaml_with_nodes, node_location

    try:
        _, node = load_yaml_with_nodes(Path(cfg.source))
    except ConfigError:
        return None
    return node_location(node, loc)[0]


def _users_hash(args: argparse.Namespace) -> int:
    from gateway.passwords import hash_password

    if sys.stdin.isatty():
        pw = getpass.getpass("Password: ")
        if pw != getpass.getpass("Again: "):
            raise UsageError("the passwords differ")
    else:
        pw = sys.stdin.readline().rstrip("\r\n")
    if not pw:
        raise UsageError("empty password")
    print(hash_password(pw))
    return EXIT_OK
