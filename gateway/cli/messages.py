"""`mailgw messages list|show`: stored mail with its links and events, from the CRM store."""

from __future__ import annotations

import argparse
import asyncio

from gateway.cli.common import EXIT_OK, Subparsers, config, parse_since, print_json
from gateway.config import Config
from gateway.errors import NotFound


def register(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    m = sub.add_parser("messages", parents=[common], help="stored mail and its events")
    m.set_defaults(func=_messages)
    ms = m.add_subparsers(dest="messages_cmd", required=True, parser_class=type(common))
    mlist = ms.add_parser("list", parents=[common])
    mlist.add_argument("--contact", metavar="EMAIL")
    mlist.add_argument("--since", metavar="DATE", help="YYYY-MM-DD or ISO 8601")
    mlist.add_argument("--account", metavar="ID", help="stored for, or seen in, this account")
    mlist.add_argument("--direction", choices=("inbound", "outbound"))
    mlist.add_argument("--limit", type=int, default=50)
    mlist.add_argument("--json", action="store_true")
    mshow = ms.add_parser("show", parents=[common])
    mshow.add_argument("id", help="message id, or a queue id")
    mshow.add_argument("--json", action="store_true")


def _messages(args: argparse.Namespace) -> int:
    return asyncio.run(_amessages(config(args), args))


async def _amessages(cfg: Config, args: argparse.Namespace) -> int:
    from gateway.crm.store import Store

    store = await Store.from_config(cfg)
    try:
        if args.messages_cmd == "list":
            rows = await store.list_messages(contact=args.contact, since=parse_since(args.since),
                                             account=args.account, direction=args.direction,
                                             limit=args.limit)
            if args.json:
                print_json(rows)
                return EXIT_OK
            for r in rows:
                last = r["events"][-1]["type"] if r["events"] else "-"
                print(f"{r['id']:>6}  {(r['date'] or '')[:16]:<16}  {r['direction']:<8} "
                      f"{r['from'][:30]:<30} {r['subject'][:40]:<40} {last}")
            print(f"-- {len(rows)} message(s)")
            return EXIT_OK
        row = None
        if args.id.isdigit():
            row = await store.get_message(int(args.id), bodies=True)
        if row is None:
            row = await store.get_message_by_queue_id(args.id, bodies=True)
        if row is None:
            raise NotFound(f"no message {args.id}")
        if args.json:
            print_json(row)
            return EXIT_OK
        for k, v in row.items():
            if k in ("events", "text_body", "html_body", "contacts", "seen"):
                continue
            print(f"{k}: {v}")
        for c in row["contacts"]:
            print(f"contact: {c['email']} ({c['role']}) {c['name']}")
        for s in row["seen"]:
            print("seen: " + " ".join(f"{k}={v}" for k, v in s.items()))
        for e in row["events"]:
            print(f"  {e['at']}  {e['type']:<9} {e['recipient']}  "
                  f"{(e.get('details') or {}).get('reply', '')}")
        return EXIT_OK
    finally:
        await store.close()
