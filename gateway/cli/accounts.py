"""`mailgw accounts list|test|disable|enable|delete`: connected mailboxes, their status and errors.

`disable`, `enable` and `delete` change the account's status in the store; a running
daemon notices within `sync.check_interval` (2 s by default) and stops or resumes
tailing it. `delete --purge` waits (briefly) for the daemon to let go of the mailbox, then
removes the mail stored from it.
"""

from __future__ import annotations

import argparse
import asyncio
from datetime import UTC, datetime
from typing import Any

from gateway.cli.common import EXIT_FAIL, EXIT_OK, Subparsers, config, print_json
from gateway.config import Account, Config
from gateway.errors import AccountError, FolderError, NotFound


def register(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    a = sub.add_parser("accounts", parents=[common], help="connected mailboxes (IMAP sync)")
    a.set_defaults(func=_accounts)
    cmds = a.add_subparsers(dest="accounts_cmd", required=True, parser_class=type(common))
    ls = cmds.add_parser("list", parents=[common],
                         help="every account: status, reason, last sync, folders, messages")
    ls.add_argument("--json", action="store_true")
    t = cmds.add_parser("test", parents=[common],
                        help="connect, log in, resolve the folders; exit 1 with the server's words")
    t.add_argument("id")
    t.add_argument("--json", action="store_true")
    for name, what in (("disable", "stop syncing the account (its history is kept)"),
                       ("enable", "sync the account again (also after needs_reconnect)")):
        x = cmds.add_parser(name, parents=[common], help=what)
        x.add_argument("id")
    d = cmds.add_parser("delete", parents=[common], help="stop syncing the account for good")
    d.add_argument("id")
    d.add_argument("--purge", action="store_true", help="also remove the mail stored from it")


def _accounts(args: argparse.Namespace) -> int:
    cfg = config(args)
    cmd = args.accounts_cmd
    if cmd == "test":
        return asyncio.run(_test(cfg, args.id, args.json))
    return asyncio.run(_with_store(cfg, args))


async def _with_store(cfg: Config, args: argparse.Namespace) -> int:
    from gateway.crm.accounts import Accounts
    from gateway.crm.store import Store

    store = await Store.from_config(cfg)
    try:
        accounts = Accounts(store)
        if args.accounts_cmd == "list":
            rows = await accounts.overview(cfg.accounts)
            if args.json:
                print_json(rows)
            else:
                _print_list(rows)
            return EXIT_OK
        return await _change(cfg, accounts, args)
    finally:
        await store.close()


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
    print(f"{'ID':<16} {'EMAIL':<32} {'PROVIDER':<12} {'STATUS':<16} {'LAST SYNC':<28} "
          f"{'MSGS':>6}  FOLDERS")
    for r in rows:
        status = r["status"]
        if r["configured"] and not r["enabled"]:
            status += " (sync off)"
        elif r["configured"] and r["direction"] == "one-way":
            status += " (one-way)"
        elif not r["configured"]:
            status += " (not in config)"
        print(f"{r['id']:<16} {r['email']:<32} {r['provider'] or '-':<12} {status:<16} "
              f"{when_ago(r['last_sync_at']):<28} {r['messages']:>6}  {', '.join(r['folders']) or '-'}")
        if r["reason"] and r["status"] != "active":
            print(f"{'':<16} reason: {r['reason']}")
        last = r.get("last_run")
        if last and last["status"] == "error":
            print(f"{'':<16} last error ({last['kind']}{' ' + last['folder'] if last['folder'] else ''}"
                  f", {when_ago(last['started_at'])}): {last['error']}")


async def _change(cfg: Config, accounts: Any, args: argparse.Namespace) -> int:
    aid = args.id
    configured = cfg.account(aid)
    row = await accounts.get(aid)
    if configured is None and row is None:
        raise NotFound(f"no account {aid!r} (not in {cfg.source}, never synced)")
    email = configured.email if configured else row["email"]
    cmd = args.accounts_cmd
    if cmd == "disable":
        was = await accounts.set_status(aid, "disabled", "disabled with `mailgw accounts disable`",
                                        email=email)
        print(f"account {aid} disabled (was {was or 'active'}); its stored mail is kept. "
              "A running daemon stops syncing it within seconds.")
        return EXIT_OK
    if cmd == "enable":
        was = await accounts.set_status(aid, "active", None, email=email)
        print(f"account {aid} enabled (was {was or 'active'}). A running daemon syncs it within seconds.")
        if configured is None:
            print(f"note: {aid} is not in {cfg.source}; nothing syncs it until it is configured")
        elif not configured.tailed:
            print(f"note: {aid} has sync.enabled: false or direction: one-way; nothing is imported")
        return EXIT_OK
    # delete
    was = await accounts.set_status(aid, "deleted", "deleted with `mailgw accounts delete`", email=email)
    print(f"account {aid} deleted (was {was or 'active'}): it is no longer synced"
          + (f" (remove it from {cfg.source} too)" if configured else ""))
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


async def _test(cfg: Config, aid: str, as_json: bool) -> int:
    account = cfg.account(aid)
    if account is None:
        raise NotFound(f"no account {aid!r} in {cfg.source}")
    report: dict[str, Any] = {"id": aid, "email": account.email, "ok": False}
    endpoint = account.imap_endpoint()
    report["server"] = f"{endpoint.host}:{endpoint.port} ({endpoint.tls})" if endpoint else None
    try:
        report.update(await _probe(cfg, account))
        report["ok"] = not report.get("folder_problems")
    except AccountError as exc:
        report["error"] = str(exc)
        report["server_text"] = exc.server_text or None
        report["kind"] = type(exc).__name__
    if as_json:
        print_json(report)
    else:
        _print_test(report)
    return EXIT_OK if report["ok"] else EXIT_FAIL


async def _probe(cfg: Config, account: Account) -> dict[str, Any]:
    from gateway.imap.account import open_account

    out: dict[str, Any] = {}
    tokens = None
    store = None
    if account.auth.method == "oauth2":
        from gateway.crm.store import Store
        from gateway.imap.manager import token_manager_for

        store = await Store.from_config(cfg)
        tokens = token_manager_for(cfg, store)
    try:
        imap = await open_account(account, cfg.base_dir, tokens=tokens, timeout=cfg.sync.timeout,
                                  connect_timeout=cfg.sync.timeout)
        try:
            out["logged_in"] = True
            out["capabilities"] = {c: imap.has(c) for c in ("IDLE", "CONDSTORE", "SPECIAL-USE",
                                                            "UIDPLUS")}
            folders: list[dict[str, Any]] = []
            problems: dict[str, str] = {}
            for want in account.sync.folders:
                try:
                    [f] = await imap.resolve_folders([want])
                except FolderError as exc:
                    problems.update(exc.problems)
                    continue
                state = await imap.examine(f)
                folders.append({"configured": want, "folder": f.name, "special_use": f.special_use,
                                "messages": state.exists, "uidvalidity": state.uidvalidity})
            out["folders"] = folders
            out["folder_problems"] = problems
            try:
                [sent] = await imap.resolve_folders(["Sent"])
                out["sent_copies_to"] = sent.name
            except FolderError as exc:
                out["sent_copies_to"] = None
                out["sent_problem"] = exc.problems.get("Sent")
        finally:
            await imap.logout()
    finally:
        if tokens is not None:
            await tokens.close()
        if store is not None:
            await store.close()
    return out


def _print_test(r: dict[str, Any]) -> None:
    print(f"account {r['id']} <{r['email']}> at {r['server'] or '(no IMAP server)'}")
    if r.get("error"):
        print(f"FAILED: {r['error']}")
        if r.get("server_text") and r["server_text"] not in r["error"]:
            print(f"server said: {r['server_text']}")
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
    print("OK" if r["ok"] else "FAILED: some configured folders cannot be synced")
