"""`mailgw companies list` and `mailgw companies show DOMAIN`: the companies mail is linked to."""

from __future__ import annotations

import argparse
import asyncio

from gateway.cli.common import EXIT_OK, Subparsers, config, print_json, print_rows, with_store
from gateway.config import Config
from gateway.errors import NotFound, UsageError


def register(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    c = sub.add_parser("companies", parents=[common],
                       help="the companies mail is linked to (by e-mail domain)")
    c.set_defaults(func=_companies)
    cs = c.add_subparsers(dest="companies_cmd", required=True, parser_class=type(common))
    lst = cs.add_parser("list", parents=[common],
                        help="companies in domain order, with owner, contacts, messages, "
                             "last activity")
    lst.add_argument("--search", metavar="TEXT", help="part of a domain or name")
    lst.add_argument("--limit", type=int, default=100)
    lst.add_argument("--after", metavar="DOMAIN", help="start after this domain (paging)")
    lst.add_argument("--json", action="store_true")
    show = cs.add_parser("show", parents=[common], help="one company with its contacts")
    show.add_argument("domain")
    show.add_argument("--json", action="store_true")


def _companies(args: argparse.Namespace) -> int:
    from gateway.crm.companies import normalize_domain

    cfg = config(args)
    if args.companies_cmd == "show":
        domain = normalize_domain(args.domain)
        if domain is None:
            raise UsageError(f"companies show: {args.domain!r} is not a domain")
        return asyncio.run(_show(cfg, domain, args.json))
    if args.limit < 1:
        raise UsageError("--limit: must be at least 1")
    return asyncio.run(_list(cfg, args))


async def _list(cfg: Config, args: argparse.Namespace) -> int:
    from gateway.crm.companies import list_companies

    rows = await with_store(cfg, lambda store: list_companies(
        store, search=args.search, after=args.after, limit=args.limit))
    return print_rows(rows, args.json, lambda r: (
        f"{r['domain']:<32} {r['name'][:28]:<28} {(r['owner'] or '-')[:20]:<20} "
        f"{r['contact_count']:>5} contact(s) {r['message_count']:>6} message(s)  "
        f"last {_day(r['last_activity'])}"),
        f"{len(rows)} compan{'y' if len(rows) == 1 else 'ies'}")


async def _show(cfg: Config, domain: str, as_json: bool) -> int:
    from gateway.crm.companies import get_company
    from gateway.crm.store import Store

    store = await Store.from_config(cfg)
    try:
        row = await get_company(store, domain)
    finally:
        await store.close()
    if row is None:
        raise NotFound(f"no company {domain}")
    if as_json:
        print_json(row)
        return EXIT_OK
    print(f"domain: {row['domain']}\nname: {row['name'] or '-'}\nowner: {row['owner'] or '-'}\n"
          f"contacts: {row['contact_count']}\nmessages: {row['message_count']}\n"
          f"last activity: {_day(row['last_activity'])}")
    for c in row["contacts"]:
        print(f"contact: {c['email']} {c['name']}".rstrip())
    return EXIT_OK


def _day(value: str | None) -> str:
    return value[:16].replace("T", " ") + " UTC" if value else "-"
