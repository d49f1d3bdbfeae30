"""`mailgw messages list|search|show`: stored mail with its links and events, from the CRM store.

``search QUERY`` is ``list`` of the messages matching a search (gateway.crm.search).

``show`` prints readable text (:func:`format_message`): lists joined with commas, times
as ``YYYY-MM-DD HH:MM UTC``, the tracking summary as sentences; never a Python repr.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from gateway.cli.common import EXIT_OK, Subparsers, config, parse_since, print_json
from gateway.config import Config
from gateway.errors import NotFound, UsageError


def register(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    m = sub.add_parser("messages", parents=[common], help="stored mail and its events")
    m.set_defaults(func=_messages)
    ms = m.add_subparsers(dest="messages_cmd", required=True, parser_class=type(common))
    mlist = ms.add_parser("list", parents=[common])
    mlist.add_argument("--contact", metavar="EMAIL")
    mlist.add_argument("--since", metavar="DATE", help="YYYY-MM-DD or ISO 8601")
    mlist.add_argument("--account", metavar="ID", help="stored for, or seen in, this account")
    mlist.add_argument("--direction", choices=("inbound", "outbound"))
    mlist.add_argument("--assigned-to", metavar="LOGIN",
                       help="assigned to this user by a shared mailbox (a login under users:)")
    mlist.add_argument("--limit", type=int, default=50)
    mlist.add_argument("--json", action="store_true")
    msearch = ms.add_parser("search", parents=[common],
                            help='words, "quoted phrases" and addresses, all of them; newest first')
    msearch.add_argument("query", metavar="QUERY")
    msearch.add_argument("--contact", metavar="EMAIL")
    msearch.add_argument("--since", metavar="DATE", help="YYYY-MM-DD or ISO 8601")
    msearch.add_argument("--account", metavar="ID", help="stored for, or seen in, this account")
    msearch.add_argument("--direction", choices=("inbound", "outbound"))
    msearch.add_argument("--assigned-to", metavar="LOGIN",
                         help="assigned to this user by a shared mailbox (a login under users:)")
    msearch.add_argument("--limit", type=int, default=50)
    msearch.add_argument("--json", action="store_true")
    mshow = ms.add_parser("show", parents=[common])
    mshow.add_argument("id", help="message id, or a queue id")
    mshow.add_argument("--json", action="store_true")


def _messages(args: argparse.Namespace) -> int:
    return asyncio.run(_amessages(config(args), args))


async def _amessages(cfg: Config, args: argparse.Namespace) -> int:
    from gateway.crm.search import BadQuery
    from gateway.crm.store import Store

    assigned_to = None
    if args.messages_cmd in ("list", "search") and args.assigned_to is not None:
        user = cfg.user(args.assigned_to)
        if user is None:
            raise UsageError(f"--assigned-to {args.assigned_to!r}: no user with that login in "
                             f"users: of {cfg.source}")
        assigned_to = user.login
    store = await Store.from_config(cfg)
    try:
        if args.messages_cmd in ("list", "search"):
            query = args.query if args.messages_cmd == "search" else None
            try:
                rows = await store.list_messages(contact=args.contact,
                                                 since=parse_since(args.since),
                                                 account=args.account, direction=args.direction,
                                                 limit=args.limit, query=query,
                                                 assigned_to=assigned_to)
            except BadQuery as exc:
                raise UsageError(f"QUERY: {exc}") from None
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
        print(format_message(row))
        return EXIT_OK
    finally:
        await store.close()


#: fields `show` prints as "name: value" lines, in this order (the rest have their own lines)
_FIELDS = ("id", "message_id", "thread_id", "direction", "account", "user", "from", "from_name",
           "to", "cc", "subject", "date", "snippet", "size", "sources", "queue_id", "in_reply_to",
           "references", "template", "assigned_to", "assigned_rule")
_OWN_LINES = {"events", "text_body", "html_body", "contacts", "seen", "attachments", "tracking",
              "companies", "raw"}


def _when(value: Any, seconds: bool = False) -> str:
    """ISO 8601 text (UTC, as the store writes it) as "2026-12-01 10:00 UTC" (seconds
    always with `seconds`, else only when there are any)."""
    if not value:
        return "-"
    try:
        t = datetime.fromisoformat(str(value))
    except ValueError:
        return str(value)
    return t.strftime("%Y-%m-%d %H:%M:%S UTC" if seconds or t.second else "%Y-%m-%d %H:%M UTC")


def _text(value: Any) -> str:
    """A field's value as text: lists joined, mappings as k=v, None as "-"."""
    if value is None or value == "" or value == []:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, Mapping):
        return ", ".join(f"{k}={_text(v)}" for k, v in value.items()) or "-"
    if isinstance(value, list | tuple):
        return ", ".join(_text(v) for v in value)
    return str(value)


def _times(n: int) -> str:
    return "1 time" if n == 1 else f"{n} times"


def _by(categories: Mapping[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in categories.items())


def tracking_line(t: Mapping[str, Any]) -> str:
    """One tracking summary (a recipient's or the total) as a sentence."""
    opens = f"Opened {_times(t['opens'])} ({t['unique_opens']} unique, {t['human_opens']} human, " \
            f"{t['proxied_opens']} proxied, {t['machine_opens']} machine"
    if t["machine_opens_by_category"]:
        opens += f": {_by(t['machine_opens_by_category'])}"
    clicks = f"Clicked {_times(t['clicks'])} ({t['human_clicks']} human, {t['machine_clicks']} machine"
    if t["machine_clicks_by_category"]:
        clicks += f": {_by(t['machine_clicks_by_category'])}"
    if t["first_activity"]:
        activity = f"first {_when(t['first_activity'])}, last {_when(t['last_activity'])}"
    else:
        activity = "no activity by a person"
    return " · ".join([opens + ")", clicks + ")", activity])


def _links(t: Mapping[str, Any], indent: str) -> list[str]:
    return [f"{indent}link {url}: {n['clicks']} click{'' if n['clicks'] == 1 else 's'} "
            f"({n['human_clicks']} human)" for url, n in t["links"].items()]


def format_message(row: Mapping[str, Any]) -> str:
    """`messages show` without --json: the message, its contacts, paths, tracking and events."""
    out = [f"{k}: {_text(row[k])}" if k != "date" else f"date: {_when(row[k])}"
           for k in _FIELDS if k in row]
    out += [f"{k}: {_text(v)}" for k, v in row.items() if k not in _FIELDS and k not in _OWN_LINES]
    for a in row.get("attachments") or []:
        inline = ", inline" if a.get("inline") else ""
        out.append(f"attachment: {a.get('filename') or '(no name)'} ({a.get('content_type') or '-'}, "
                   f"{a.get('size', 0)} bytes{inline})")
    for c in row.get("contacts") or []:
        out.append(f"contact: {c['email']} ({c['role']}) {c['name']}".rstrip())
    for co in row.get("companies") or []:
        out.append(f"company: {co['domain']} {co['name']}".rstrip())
    raw = row.get("raw")
    if raw is not None:
        out.append(f"raw: {raw['size']} bytes kept, sha256 {raw['sha256']}" if raw["kept"]
                   else f"raw: {raw['reason']}")
    for s in row.get("seen") or []:
        out.append("seen: " + " ".join(f"{k}={_when(v) if k == 'at' else _text(v)}"
                                       for k, v in s.items()))
    tracking = row.get("tracking")
    if tracking is not None:
        total = tracking["total"]
        opened = f"{total['recipients_opened']} of {len(tracking['recipients'])} recipient(s) opened"
        out.append(f"tracking: {tracking_line(total)} · {opened}")
        out += _links(total, "  ")
        for r in tracking["recipients"]:
            out.append(f"  {r['recipient']}: {'opened' if r['opened'] else 'not opened'} · "
                       f"{tracking_line(r)}")
            out += _links(r, "    ")
    if row.get("events"):
        out.append("events:")
    for e in row.get("events") or []:
        d = e.get("details") or {}
        what = []
        if e["type"] in ("opened", "clicked"):
            what.append(str(d.get("category") or ("machine" if e["machine"] else "human")))
            if d.get("url"):
                what.append(str(d["url"]))
        for key in ("reply", "status", "diagnostic"):
            if d.get(key):
                what.append(_text(d[key]))
        out.append(f"  {_when(e['at'], seconds=True)}  {e['type']:<12} {e['recipient'] or '-'}  "
                   f"{' '.join(what)}".rstrip())
    return "\n".join(out)
