"""`mailgw accounts list|add|connect|test|disable|enable|delete`: connected mailboxes and their state.

`add` creates an account at run time (stored in the CRM store, its secret encrypted);
`connect` runs the OAuth device flow (RFC 8628: it prints a code and a URL and waits for
the rep to approve) or, with `--link`, prints a connect link for the rep. A running
daemon picks up a new or changed account, and notices `disable`, `enable` and `delete`,
within `sync.check_interval` (2 s by default). `delete --purge` waits (briefly) for the
daemon to let go of the mailbox, then removes the mail stored from it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from gateway.cli.common import EXIT_FAIL, EXIT_OK, Subparsers, config, print_json
from gateway.config import Config
from gateway.errors import NotFound, UsageError

if TYPE_CHECKING:
    from gateway.accounts.service import AccountService


def register(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    a = sub.add_parser("accounts", parents=[common], help="connected mailboxes (IMAP sync)")
    a.set_defaults(func=_accounts)
    cmds = a.add_subparsers(dest="accounts_cmd", required=True, parser_class=type(common))
    ls = cmds.add_parser("list", parents=[common],
                         help="every account: status, reason, last sync, folders, messages")
    ls.add_argument("--json", action="store_true")
    add = cmds.add_parser("add", parents=[common],
                          help="create an account at run time (kept in the store, secret encrypted)")
    add.add_argument("--id", required=True)
    add.add_argument("--email", required=True)
    add.add_argument("--provider", default="imap", help="gmail, microsoft365, ..., imap")
    add.add_argument("--imap-host")
    add.add_argument("--imap-port", type=int)
    add.add_argument("--imap-tls", choices=("implicit", "starttls", "none"))
    add.add_argument("--smtp-host")
    add.add_argument("--smtp-port", type=int)
    add.add_argument("--smtp-tls", choices=("implicit", "starttls", "none"))
    add.add_argument("--auth", dest="method", default="password",
                     choices=("password", "oauth2", "service"))
    add.add_argument("--username", help="the login, when it is not the email")
    add.add_argument("--service-account", help="for --auth service: an id under service_accounts:")
    add.add_argument("--oauth-provider",
                     help="for --auth oauth2: google, microsoft or an oauth.providers name")
    add.add_argument("--secret-stdin", action="store_true",
                     help="read the password (or, with --auth oauth2, the refresh token) from stdin")
    add.add_argument("--folders", help="comma-separated (default INBOX,Sent)")
    add.add_argument("--direction", choices=("two-way", "one-way"))
    add.add_argument("--history-days", type=int)
    add.add_argument("--send-as", action="append", default=[], metavar="LOGIN",
                     help="a submission user who sends as this account (repeatable)")
    add.add_argument("--json", action="store_true")
    c = cmds.add_parser("connect", parents=[common],
                        help="connect a mailbox through its OAuth provider (device flow, or --link)")
    c.add_argument("--provider", required=True, help="google, microsoft or an oauth.providers name")
    c.add_argument("--email", help="the mailbox to connect (the provider must vouch for it)")
    c.add_argument("--login", help="the submission user who will send as it")
    c.add_argument("--account", dest="account_id", help="reconnect this account")
    c.add_argument("--link", action="store_true", help="print a connect link for the rep instead")
    c.add_argument("--json", action="store_true")
    dsc = cmds.add_parser("discover", parents=[common],
                          help="find the IMAP and SMTP settings for an address (presets, MX, SRV)")
    dsc.add_argument("address")
    dsc.add_argument("--json", action="store_true")
    t = cmds.add_parser("test", parents=[common],
                        help="log in to IMAP (folders) and SMTP (TLS, AUTH); exit 1 with the server's words")
    t.add_argument("id")
    t.add_argument("--json", action="store_true")
    t.add_argument("--no-smtp", action="store_true", help="only IMAP")
    for name, what in (("disable", "stop syncing the account (its history is kept)"),
                       ("enable", "sync the account again (also after needs_reconnect)")):
        x = cmds.add_parser(name, parents=[common], help=what)
        x.add_argument("id")
    d = cmds.add_parser("delete", parents=[common], help="stop syncing the account for good")
    d.add_argument("id")
    d.add_argument("--purge", action="store_true", help="also remove the mail stored from it")


def _accounts(args: argparse.Namespace) -> int:
    from gateway.log import setup_logging

    cfg = config(args)
    setup_logging(cfg.logging)     # to stderr: stdout is the command's output (--json)
    # read the secret before the event loop runs: Ctrl-C at this prompt is then a plain
    # KeyboardInterrupt (exit 130), not a cancellation waiting for the blocked read
    args.secret_line = (sys.stdin.readline() if args.accounts_cmd == "add" and args.secret_stdin
                        else None)
    if args.accounts_cmd == "discover":
        return asyncio.run(_discover(cfg, args))
    return asyncio.run(_with_service(cfg, args))


async def _discover(cfg: Config, args: argparse.Namespace) -> int:
    from gateway.accounts.discover import discover

    try:
        d = await discover(args.address, nameservers=cfg.delivery.nameserver_addresses() or None)
    except ValueError as exc:
        raise UsageError(f"address: {exc}") from None
    out: dict[str, Any] = {"address": d.address, "domain": d.domain, "provider": d.provider,
                           "how": d.how,
           "imap": {"host": d.imap.host, "port": d.imap.port, "tls": d.imap.tls} if d.imap else None,
           "smtp": {"host": d.smtp.host, "port": d.smtp.port, "tls": d.smtp.tls} if d.smtp else None,
           "evidence": list(d.evidence), "warnings": list(d.warnings)}
    if args.json:
        print_json(out)
    elif not d.found:
        print(f"{d.address}: no settings found ({'; '.join(d.evidence) or 'nothing matched'})")
    else:
        print(f"{d.address}: provider {d.provider or '-'} (found by {d.how})")
        for name in ("imap", "smtp"):
            ep = out[name]
            print(f"  {name.upper()}: " + (f"{ep['host']}:{ep['port']} ({ep['tls']})" if ep else "-"))
        for w in d.warnings:
            print(f"  note: {w}")
    return EXIT_OK if d.found else EXIT_FAIL


async def _with_service(cfg: Config, args: argparse.Namespace) -> int:
    from gateway.accounts.service import AccountService
    from gateway.crm.store import Store

    store = await Store.from_config(cfg)
    service = AccountService(lambda: cfg, store)
    try:
        await service.registry.refresh(force=True)
        cmd = args.accounts_cmd
        if cmd == "list":
            rows = await service.registry.overview()
            if args.json:
                print_json(rows)
            else:
                _print_list(rows)
            return EXIT_OK
        if cmd == "add":
            return await _add(service, args)
        if cmd == "connect":
            return await _connect(service, args)
        if cmd == "test":
            return await _test(service, args.id, args.json, smtp=not args.no_smtp)
        return await _change(cfg, service, args)
    finally:
        await service.grants.close()
        await store.close()


async def _add(service: AccountService, args: argparse.Namespace) -> int:
    from gateway.accounts.registry import InvalidAccount

    d: dict[str, Any] = {"id": args.id, "email": args.email, "provider": args.provider}
    if args.imap_host:
        d["imap"] = {"host": args.imap_host, "port": args.imap_port or 993,
                     "tls": args.imap_tls or "implicit"}
    if args.smtp_host:
        d["smtp"] = {"host": args.smtp_host, "port": args.smtp_port or 587,
                     "tls": args.smtp_tls or "starttls"}
    auth: dict[str, Any] = {"method": args.method}
    if args.username:
        auth["username"] = args.username
    if args.service_account:
        auth["service_account"] = args.service_account
    if args.oauth_provider:
        auth["oauth_provider"] = args.oauth_provider
    d["auth"] = auth
    sync: dict[str, Any] = {}
    if args.folders:
        sync["folders"] = [f.strip() for f in args.folders.split(",") if f.strip()]
    if args.direction:
        sync["direction"] = args.direction
    if args.history_days is not None:
        sync["history_days"] = args.history_days
    if sync:
        d["sync"] = sync
    if args.send_as:
        d["send_as"] = args.send_as
    secret = args.secret_line.rstrip("\r\n") if args.secret_line is not None else None
    try:
        acct = await service.registry.create(d, secret=secret or None)
    except InvalidAccount as exc:
        raise UsageError("; ".join(f"--{k.replace('_', '-')}: {m}" if k else m
                                   for k, m in exc.problems)) from None
    rows = [r for r in await service.registry.overview() if r["id"] == acct.id]
    if args.json:
        print_json(rows[0] if rows else {"id": acct.id})
    else:
        print(f"account {acct.id} <{acct.email}> created; a running daemon starts syncing it within "
              "seconds (`mailgw accounts test " + acct.id + "` checks the login)")
    return EXIT_OK


async def _connect(service: AccountService, args: argparse.Namespace) -> int:
    from gateway.accounts.registry import InvalidAccount

    if args.link:
        try:
            link = await service.connect.create(args.provider, email=args.email, login=args.login,
                                                account_id=args.account_id, created_by="cli")
        except InvalidAccount as exc:
            raise UsageError("; ".join(f"{k}: {m}" for k, m in exc.problems)) from None
        if args.json:
            print_json({"id": link.id, "url": link.url, "expires_at": link.expires_at.isoformat()})
        else:
            print(f"Send this link to the rep (single use, expires {link.expires_at:%Y-%m-%d %H:%M} UTC):")
            print(link.url)
        return EXIT_OK

    def show(device: Any) -> None:
        where = device.verification_uri_complete or device.verification_uri
        if args.json:
            print(json.dumps({"user_code": device.user_code, "verification_uri": device.verification_uri,
                              "verification_uri_complete": device.verification_uri_complete}),
                  flush=True)
        else:
            print(f"To connect {args.email or 'the mailbox'}: open {where}", flush=True)
            print(f"and enter the code {device.user_code}. Waiting...", flush=True)

    outcome = await service.connect.device(args.provider, email=args.email, login=args.login,
                                           account_id=args.account_id, show=show)
    if args.json:
        print_json({"outcome": outcome.kind, "account": outcome.account_id, "email": outcome.email,
                    "detail": outcome.detail})
    elif outcome.ok:
        print(f"connected: account {outcome.account_id} <{outcome.email}>, folders "
              f"{', '.join(outcome.folders)}")
    else:
        print(f"not connected ({outcome.kind}): {outcome.detail}")
    return EXIT_OK if outcome.ok else EXIT_FAIL


def when_ago(iso: str | None) -> str:
    if not iso:
        return "never"
    t = datetime.fromisoformat(iso)
    ago = (datetime.now(UTC) - t).total_seconds()
    if ago < 120:
        rel = f"{ago:.0f}s ago"
    elif ago < 7200:
        rel = f"{ago / 60:.0f}m ago"
    elif ago < 172800:
        rel = f"{ago / 3600:.0f}h ago"
    else:
        rel = f"{ago / 86400:.0f}d ago"
    return f"{t.strftime('%Y-%m-%d %H:%M')} ({rel})"


def _print_list(rows: list[dict[str, Any]]) -> None:
    if not rows:
        print("no accounts (add them under accounts: in the configuration)")
        return
    day = rows[0].get("today", {}).get("date", "")
    print(f"today ({day}, UTC): SYNCED stored by the sync, LINKED of those linked to a contact, "
          "SENT and RECEIVED dated today")
    print(f"{'ID':<16} {'EMAIL':<32} {'PROVIDER':<12} {'STATUS':<16} {'LAST SYNC':<28} "
          f"{'MSGS':>6} {'SYNCED':>6} {'LINKED':>6} {'SENT':>5} {'RECEIVED':>8}  FOLDERS")
    for r in rows:
        status = r["status"]
        if r["configured"] and not r["enabled"]:
            status += " (sync off)"
        elif r["configured"] and r["direction"] == "one-way":
            status += " (one-way)"
        elif not r["configured"]:
            status += " (not in config)"
        t = r.get("today") or {}
        print(f"{r['id']:<16} {r['email']:<32} {r['provider'] or '-':<12} {status:<16} "
              f"{when_ago(r['last_sync_at']):<28} {r['messages']:>6} {t.get('synced', 0):>6} "
              f"{t.get('linked', 0):>6} {t.get('sent', 0):>5} {t.get('received', 0):>8}  "
              f"{', '.join(r['folders']) or '-'}")
        if r.get("shared"):
            a = r.get("assign") or {}
            users = ", ".join(a.get("users") or []) or "-"
            print(f"{'':<16} shared: unowned mail -> {a.get('fallback', 'none')} ({users})")
        if r["reason"] and r["status"] != "active":
            print(f"{'':<16} reason: {r['reason']}")
        until = r.get("lease_expires_at")
        if r.get("lease_owner") and until and datetime.fromisoformat(until) > datetime.now(UTC):
            print(f"{'':<16} tailed by node {r['lease_owner']}")
        last = r.get("last_run")
        if last and last["status"] == "error":
            print(f"{'':<16} last error ({last['kind']}{' ' + last['folder'] if last['folder'] else ''}"
                  f", {when_ago(last['started_at'])}): {last['error']}")


async def _change(cfg: Config, service: AccountService, args: argparse.Namespace) -> int:
    accounts = service.registry.state
    aid = args.id
    configured = service.registry.account(aid)
    row = await accounts.get(aid)
    if configured is None and row is None:
        raise NotFound(f"no account {aid!r} (not in {cfg.source}, not created at run time, never synced)")
    email = configured.email if configured else row["email"] if row else ""
    declared = cfg.account(aid) is not None
    cmd = args.accounts_cmd
    if cmd == "disable":
        was = await accounts.set_status(aid, "disabled", "disabled with `mailgw accounts disable`",
                                        email=email)
        print(f"account {aid} disabled (was {was or 'active'}); its stored mail is kept. "
              "A running daemon stops syncing it within seconds.")
        return EXIT_OK
    if cmd == "enable":
        if row is not None and row.get("origin") == "runtime" and row.get("status") == "deleted":
            raise UsageError(f"account {aid} was deleted and its secret with it: create it again "
                             "(`mailgw accounts add`, the API or a connect link)")
        was = await accounts.set_status(aid, "active", None, email=email)
        print(f"account {aid} enabled (was {was or 'active'}). A running daemon syncs it within seconds.")
        if configured is None:
            print(f"note: {aid} is neither in {cfg.source} nor created at run time; nothing syncs it")
        elif not configured.tailed:
            print(f"note: {aid} has sync.enabled: false or direction: one-way; nothing is imported")
        return EXIT_OK
    # delete
    was = await service.delete(aid, reason="deleted with `mailgw accounts delete`")
    print(f"account {aid} deleted (was {was or 'active'}): it is no longer synced"
          + (f" (remove it from {cfg.source} too)" if declared else ""))
    if not args.purge:
        print("its stored mail is kept; `mailgw accounts delete ID --purge` removes it")
        return EXIT_OK
    released = await _wait_released(accounts, aid, cfg.sync.check_interval + cfg.drain_timeout + 5)
    if not released:
        print(f"warning: a daemon still holds {aid}'s lease; purging anyway")
    result = await accounts.purge(aid)
    print(f"purged: {result.messages} message(s) removed, {result.sources} IMAP source record(s) "
          f"removed (messages also seen on another path keep those), {result.checkpoints} "
          f"folder checkpoint(s), {len(result.raw_blobs)} raw message file(s)")
    return EXIT_OK


async def _wait_released(accounts: Any, aid: str, timeout: float) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        row = await accounts.get(aid) or {}
        until = row.get("lease_expires_at")
        if not row.get("lease_owner") or (until is not None and until < datetime.now(UTC)):
            return True
        if loop.time() > deadline:
            return False
        await asyncio.sleep(0.2)


async def _test(service: AccountService, aid: str, as_json: bool, *, smtp: bool) -> int:
    report = await service.test(aid, smtp=smtp)
    if as_json:
        print_json(report)
    else:
        _print_test(report)
    return EXIT_OK if report["ok"] else EXIT_FAIL


def _print_test(r: dict[str, Any]) -> None:
    print(f"account {r['id']} <{r['email']}> at {r['server'] or '(no IMAP server)'}")
    if r.get("error"):
        print(f"FAILED: {r['error']}")
        if r.get("server_text") and r["server_text"] not in r["error"]:
            print(f"server said: {r['server_text']}")
        _print_smtp(r.get("smtp"))
        return
    caps = r.get("capabilities", {})
    print("logged in; " + ", ".join(f"{c} {'yes' if v else 'no'}" for c, v in caps.items()))
    for f in r.get("folders", []):
        use = f" ({f['special_use']})" if f["special_use"] else ""
        print(f"  {f['configured']:<12} -> {f['folder']}{use}: {f['messages']} message(s), "
              f"UIDVALIDITY {f['uidvalidity']}")
    for name, why in (r.get("folder_problems") or {}).items():
        print(f"  {name:<12} -> PROBLEM: {why}")
    print(f"Sent copies go to: {r.get('sent_copies_to') or 'nowhere (' + str(r.get('sent_problem')) + ')'}")
    _print_smtp(r.get("smtp"))
    print("OK" if r["ok"] else "FAILED: see above")


def _print_smtp(s: dict[str, Any] | None) -> None:
    if not s:
        return
    if s.get("skipped"):
        print(f"SMTP: skipped ({s['skipped']})")
    elif s.get("ok"):
        print(f"SMTP {s['server']}: connected, {'TLS' if s.get('tls') else 'no TLS'}, "
              f"AUTH {s.get('auth') or 'not used'}: OK")
    else:
        print(f"SMTP {s.get('server')}: FAILED: {s.get('error')}")
