"""`mailgw sync status [ID]`: per account and folder the last sync, totals and recent runs with
errors; `mailgw sync nodes`: the nodes heard from and the mailboxes each tails."""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from gateway.cli.accounts import when_ago
from gateway.cli.common import EXIT_OK, Subparsers, config, print_json
from gateway.config import Config
from gateway.errors import NotFound


def register(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    s = sub.add_parser("sync", parents=[common], help="IMAP sync history")
    cmds = s.add_subparsers(dest="sync_cmd", required=True, parser_class=type(common))
    st = cmds.add_parser("status", parents=[common],
                         help="per account and folder: last sync, counts, recent runs and errors")
    st.add_argument("id", nargs="?", help="one account (all of them without)")
    st.add_argument("--runs", type=int, default=None,
                    help="recent runs to show (default 20 for one account, 5 for all)")
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=_sync)
    nd = cmds.add_parser("nodes", parents=[common],
                         help="the nodes (daemons) heard from and the mailboxes each tails")
    nd.add_argument("--json", action="store_true")
    nd.set_defaults(func=_nodes)


def _nodes(args: argparse.Namespace) -> int:
    return asyncio.run(_list_nodes(config(args), args))


async def _list_nodes(cfg: Config, args: argparse.Namespace) -> int:
    from gateway.crm.accounts import Accounts
    from gateway.crm.store import Store

    store = await Store.from_config(cfg)
    try:
        rows = await Accounts(store).nodes()
    finally:
        await store.close()
    ttl = cfg.sync.lease_ttl
    for r in rows:
        r["live"] = r["heartbeat_age"] <= ttl
    if args.json:
        print_json(rows)
        return EXIT_OK
    if not rows:
        print("no node has run (a daemon records its heartbeat while it runs)")
        return EXIT_OK
    print(f"{'NODE':<40} {'STATE':<6} {'HEARTBEAT':<28} {'MAILBOXES':>9}  ACCOUNTS")
    for r in rows:
        state = "live" if r["live"] else "gone"
        print(f"{r['id']:<40} {state:<6} {when_ago(r['heartbeat_at']):<28} "
              f"{len(r['accounts']):>9}  {', '.join(r['accounts']) or '-'}")
    return EXIT_OK


def _sync(args: argparse.Namespace) -> int:
    return asyncio.run(_status(config(args), args))


async def _status(cfg: Config, args: argparse.Namespace) -> int:
    from gateway.crm.accounts import Accounts
    from gateway.crm.store import Store

    store = await Store.from_config(cfg)
    try:
        accounts = Accounts(store)
        if args.id:
            ids = [args.id]
            if cfg.account(args.id) is None and await accounts.get(args.id) is None:
                raise NotFound(f"no account {args.id!r} (not in {cfg.source}, never synced)")
        else:
            ids = [r["id"] for r in await accounts.overview(cfg.accounts)]
        runs = args.runs if args.runs is not None else (20 if args.id else 5)
        infos = [await accounts.sync_info(i, configured=cfg.account(i), runs=runs) for i in ids]
    finally:
        await store.close()
    if args.json:
        print_json(infos[0] if args.id else infos)
        return EXIT_OK
    if not infos:
        print("no accounts (add them under accounts: in the configuration)")
    for n, info in enumerate(infos):
        if n:
            print()
        _print(info)
    return EXIT_OK


def _print(i: dict[str, Any]) -> None:
    mode = "-" if not i["configured"] else (i["direction"] if i["enabled"] else "sync off")
    print(f"{i['id']} <{i['email']}>  {i['provider'] or '-'}  {mode}  status: {i['status']}"
          f"  last sync: {when_ago(i['last_sync_at'])}")
    if i["reason"] and i["status"] != "active":
        print(f"  reason: {i['reason']}")
    if i["lease_owner"]:
        print(f"  tailed by: {i['lease_owner']} (lease until {i['lease_expires_at']})")
    folders = i["folders_synced"]
    if folders:
        print(f"  {'FOLDER':<20} {'UIDVALIDITY':>12} {'LAST UID':>9} {'INITIAL':<10} {'MSGS':>6}  LAST SYNC")
        for f in folders:
            initial = "done" if f["initial_done"] else f"at {f['backfill_uid']}"
            print(f"  {f['folder']:<20} {f['uidvalidity'] or '-':>12} {f['last_uid']:>9} {initial:<10} "
                  f"{f['messages']:>6}  {when_ago(f['last_sync_at'])}")
    else:
        print("  no folder synced yet")
    t = i["totals"]
    print(f"  totals: {t['messages']} message(s) stored; {t['runs']} run(s): {t['fetched']} looked at, "
          f"{t['stored']} stored, {t['skipped']} skipped, {t['errors']} error(s)")
    d = i["today"]
    print(f"  today ({d['date']}, UTC): {d['synced']} synced, {d['linked']} linked to contacts, "
          f"{d['sent']} sent, {d['received']} received")
    if i["recent_runs"]:
        print("  recent runs:")
        for r in i["recent_runs"]:
            secs = f" {r['seconds']:.1f}s" if r["seconds"] is not None else ""
            print(f"    {(r['started_at'] or '')[:19].replace('T', ' ')}  {r['folder'] or '-':<16} "
                  f"{r['kind']:<8} {r['status']:<7} looked at {r['fetched']}, stored {r['stored']}, "
                  f"skipped {r['skipped']}{secs}")
            if r["error"]:
                print(f"      error: {r['error']}")
