"""The `mailgw` command line: argument parsing and output formatting only.

Exit codes: 0 ok, 1 failure at run time, 2 bad usage or invalid configuration.
Listing commands take `--json` and then print machine-readable JSON only.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import ssl
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from gateway import __version__
from gateway.config import Config, find_config, load_config
from gateway.errors import ConfigError, GatewayError, NotFound, Problem, UsageError

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # argparse exits 2 on usage errors: keep that
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"mailgw: error: {message}\n")


def _parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    common.add_argument("-c", "--config", metavar="PATH",
                        help="configuration file (default ./gateway.yaml, then "
                             "/etc/mailgw/gateway.yaml)")
    p = _Parser(prog="mailgw", description="CRM mail gateway", parents=[common])
    p.add_argument("--version", action="version", version=f"mailgw {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    sub.add_parser("run", parents=[common], help="run the daemon")
    sub.add_parser("check", parents=[common], help="validate the configuration and its files")

    users = sub.add_parser("users", parents=[common], help="SMTP AUTH users")
    us = users.add_subparsers(dest="users_cmd", required=True, parser_class=_Parser)
    us.add_parser("hash", parents=[common],
                  help="read a password (prompt, or one line on stdin), print its hash")

    q = sub.add_parser("queue", parents=[common], help="inspect and steer the delivery queue")
    qs = q.add_subparsers(dest="queue_cmd", required=True, parser_class=_Parser)
    ql = qs.add_parser("list", parents=[common], help="every queued message")
    ql.add_argument("--json", action="store_true")
    qsh = qs.add_parser("show", parents=[common], help="one queued message: envelope, headers")
    qsh.add_argument("id")
    qsh.add_argument("--json", action="store_true")
    qr = qs.add_parser("retry", parents=[common],
                       help="deliver a deferred message now (all of them without ID)")
    qr.add_argument("id", nargs="?")
    for name, what in (("delete", "remove a message from the queue for good"),
                       ("hold", "set a message aside (not delivered until released)"),
                       ("release", "put a held message back into delivery")):
        x = qs.add_parser(name, parents=[common], help=what)
        x.add_argument("id")

    m = sub.add_parser("messages", parents=[common], help="stored mail and its events")
    ms = m.add_subparsers(dest="messages_cmd", required=True, parser_class=_Parser)
    mlist = ms.add_parser("list", parents=[common])
    mlist.add_argument("--contact", metavar="EMAIL")
    mlist.add_argument("--since", metavar="DATE", help="YYYY-MM-DD or ISO 8601")
    mlist.add_argument("--limit", type=int, default=50)
    mlist.add_argument("--json", action="store_true")
    mshow = ms.add_parser("show", parents=[common])
    mshow.add_argument("id", help="message id, or a queue id")
    mshow.add_argument("--json", action="store_true")

    db = sub.add_parser("db", parents=[common], help="the CRM store")
    dbs = db.add_subparsers(dest="db_cmd", required=True, parser_class=_Parser)
    dbs.add_parser("upgrade", parents=[common], help="apply schema migrations (Alembic)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _dispatch(args)
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
    except KeyboardInterrupt:
        return EXIT_FAIL


def _config(args: argparse.Namespace) -> Config:
    return load_config(args.config)


def _dispatch(args: argparse.Namespace) -> int:
    cmd = args.command
    if cmd == "users":
        return _users_hash()
    if cmd == "check":
        return _check(args)
    cfg = _config(args)
    if cmd == "run":
        return _run(cfg, args)
    if cmd == "queue":
        return _queue(cfg, args)
    if cmd == "messages":
        return asyncio.run(_messages(cfg, args))
    if cmd == "db":
        return asyncio.run(_db_upgrade(cfg))
    raise UsageError(f"unknown command {cmd}")


# -- run / check ----------------------------------------------------------------------
def _run(cfg: Config, args: argparse.Namespace) -> int:
    from gateway.app import run_daemon
    from gateway.log import setup_logging

    setup_logging(cfg.logging)
    path = find_config(args.config)
    try:
        return asyncio.run(run_daemon(cfg, path))
    except GatewayError as exc:
        import structlog

        structlog.get_logger("mailgw").error("startup_failed", error=str(exc))
        print(f"mailgw: {exc}", file=sys.stderr)
        return EXIT_FAIL
    except OSError as exc:  # e.g. the port is taken
        print(f"mailgw: cannot start: {exc}", file=sys.stderr)
        return EXIT_FAIL


def _check(args: argparse.Namespace) -> int:
    path = find_config(args.config)
    cfg = load_config(path)  # raises ConfigError with every problem
    problems: list[Problem] = []
    sub = cfg.listeners.submission
    if sub is not None and sub.tls != "none":
        from gateway.smtp.server import server_tls_context

        try:
            server_tls_context(cfg, sub)
        except (ssl.SSLError, OSError) as exc:
            problems.append(Problem(str(path), None, "listeners.submission.cert_file",
                                    f"certificate and key do not load together: {exc}"))
    try:
        from sqlalchemy.engine import make_url

        make_url(cfg.store_url)
    except Exception as exc:
        problems.append(Problem(str(path), None, "store.url", f"not a database URL: {exc}"))
    if problems:
        raise ConfigError(problems)
    print(f"{path}: OK ({len(cfg.users)} users, {len(cfg.accounts)} accounts, "
          f"route {cfg.delivery.route})")
    return EXIT_OK


def _users_hash() -> int:
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


# -- queue ----------------------------------------------------------------------------
def _ts(t: float | None) -> str | None:
    return datetime.fromtimestamp(t, UTC).isoformat() if t else None


def _queue_entry(state: str, env: Any) -> dict[str, Any]:
    return {
        "id": env.id, "state": state, "size": env.size, "arrival": _ts(env.received_at),
        "sender": env.mail_from, "user": env.user, "message_id": env.message_id,
        "attempts": env.attempts,
        "next_attempt": _ts(env.next_attempt) if state == "deferred" else None,
        "bounce": env.is_bounce,
        "recipients": [{"address": r.addr, "status": r.status, "attempts": r.attempts,
                        "last_reply": r.last_reply, "remote": r.remote}
                       for r in env.recipients],
    }


def _queue(cfg: Config, args: argparse.Namespace) -> int:
    from gateway.spool import CorruptQueueFile, Spool

    spool = Spool(cfg.spool_path)
    if not spool.root.exists():
        raise NotFound(f"no spool at {spool.root} (has the daemon run with this config?)")
    spool.setup()
    qc = args.queue_cmd
    if qc == "list":
        rows: list[dict[str, Any]] = []
        for state, qid in spool.iter_all():
            if state == "corrupt":
                rows.append({"id": qid, "state": "corrupt"})
                continue
            try:
                rows.append(_queue_entry(state, spool.read_envelope(state, qid)))
            except (CorruptQueueFile, NotFound):
                continue
        if args.json:
            print(json.dumps(rows, indent=2))
            return EXIT_OK
        if not rows:
            print("Mail queue is empty")
            return EXIT_OK
        for r in rows:
            if r["state"] == "corrupt":
                print(f"{r['id']}  corrupt")
                continue
            print(f"{r['id']}  {r['state']:<8} {r['size']:>8}  {r['arrival'][:19]}  "
                  f"<{r['sender']}>")
            for rc in r["recipients"]:
                if rc["status"] == "pending":
                    reason = f"  ({rc['last_reply']})" if rc["last_reply"] else ""
                    print(f"        {rc['address']}{reason}")
        print(f"-- {len(rows)} message(s)")
        return EXIT_OK
    if qc == "show":
        state = spool.find(args.id)
        if state == "corrupt":
            raw = (spool.dir("corrupt") / args.id).read_bytes()
            print(raw[:4096].decode("utf-8", "replace"))
            return EXIT_OK
        env, data = spool.read(state, args.id)
        from gateway.pipeline.headers import split_message

        header, _ = split_message(data)
        entry = _queue_entry(state, env)
        if args.json:
            entry["headers"] = header.decode("utf-8", "replace")
            print(json.dumps(entry, indent=2))
        else:
            for k, v in entry.items():
                if k != "recipients":
                    print(f"{k}: {v}")
            for rc in entry["recipients"]:
                print(f"recipient: {rc['address']} {rc['status']} attempts={rc['attempts']}"
                      f" last_reply={rc['last_reply']!r}")
            print()
            sys.stdout.write(header.decode("utf-8", "replace"))
        return EXIT_OK
    if qc == "retry":
        ids = [args.id] if args.id else spool.list_ids("deferred")
        for qid in ids:
            state = spool.find(qid)
            if state not in ("deferred", "incoming"):
                raise UsageError(f"{qid} is in {state}/, not deferred (use `queue release`)")
            if state == "deferred":
                spool.move(qid, "deferred", "incoming")
        print(f"{len(ids)} message(s) scheduled for delivery now")
        return EXIT_OK
    if qc == "delete":
        state = spool.delete(args.id)
        print(f"{args.id} deleted from {state}/")
        return EXIT_OK
    if qc == "hold":
        state = spool.find(args.id)
        if state not in ("incoming", "deferred"):
            raise UsageError(f"{args.id} is in {state}/ and cannot be held")
        spool.move(args.id, state, "hold")
        print(f"{args.id} held")
        return EXIT_OK
    if qc == "release":
        state = spool.find(args.id)
        if state != "hold":
            raise UsageError(f"{args.id} is in {state}/, not on hold")
        spool.move(args.id, "hold", "incoming")
        print(f"{args.id} released")
        return EXIT_OK
    raise UsageError(f"unknown queue command {qc}")


# -- messages / db ---------------------------------------------------------------------
def _parse_since(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        dt = datetime.fromisoformat(value)
    except ValueError:
        raise UsageError(f"--since {value!r}: expected YYYY-MM-DD or ISO 8601") from None
    return dt if dt.tzinfo else dt.replace(tzinfo=UTC)


async def _messages(cfg: Config, args: argparse.Namespace) -> int:
    from gateway.crm.store import Store

    store = await Store.open(cfg.store_url, auto_upgrade=True)
    try:
        if args.messages_cmd == "list":
            rows = await store.list_messages(contact=args.contact,
                                             since=_parse_since(args.since), limit=args.limit)
            if args.json:
                print(json.dumps(rows, indent=2, default=str))
                return EXIT_OK
            for r in rows:
                last = r["events"][-1]["type"] if r["events"] else "-"
                print(f"{r['id']:>6}  {(r['date'] or '')[:16]:<16}  {r['direction']:<8} "
                      f"{r['from'][:30]:<30} {r['subject'][:40]:<40} {last}")
            print(f"-- {len(rows)} message(s)")
            return EXIT_OK
        row = None
        if args.id.isdigit():
            row = await store.get_message(int(args.id))
        if row is None:
            row = await store.get_message_by_queue_id(args.id)
        if row is None:
            raise NotFound(f"no message {args.id}")
        if args.json:
            print(json.dumps(row, indent=2, default=str))
            return EXIT_OK
        for k, v in row.items():
            if k != "events":
                print(f"{k}: {v}")
        for e in row["events"]:
            print(f"  {e['at']}  {e['type']:<9} {e['recipient']}  "
                  f"{(e.get('details') or {}).get('reply', '')}")
        return EXIT_OK
    finally:
        await store.close()


async def _db_upgrade(cfg: Config) -> int:
    from gateway.crm.migrate import current_revision, upgrade

    t = time.monotonic()
    await upgrade(cfg.store_url)
    rev = await current_revision(cfg.store_url)
    print(f"store at revision {rev} ({time.monotonic() - t:.1f}s)")
    return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
