"""`mailgw contacts import FILE.csv`, `list` and `ambiguous`: the contacts mail is linked to."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from typing import TYPE_CHECKING

from gateway.cli.common import EXIT_OK, Subparsers, config, print_rows, with_store
from gateway.config import Config

if TYPE_CHECKING:   # the store is imported by the handlers: other commands start faster
    from gateway.crm.contacts import ContactInput


def register(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    c = sub.add_parser("contacts", parents=[common], help="the contacts mail is linked to")
    c.set_defaults(func=_contacts)
    cs = c.add_subparsers(dest="contacts_cmd", required=True, parser_class=type(common))
    imp = cs.add_parser("import", parents=[common],
                        help="create or update contacts from a CSV file (header row with email)")
    imp.add_argument("file", type=Path)
    imp.add_argument("--dry-run", action="store_true", help="validate the file, change nothing")
    lst = cs.add_parser("list", parents=[common], help="contacts in e-mail order")
    lst.add_argument("--search", metavar="TEXT", help="part of an e-mail, name or company")
    lst.add_argument("--limit", type=int, default=100)
    lst.add_argument("--after", metavar="EMAIL", help="start after this e-mail (paging)")
    lst.add_argument("--json", action="store_true")
    amb = cs.add_parser("ambiguous", parents=[common],
                        help="addresses `crm.link_by: name` left unlinked (several contacts "
                             "have their name)")
    amb.add_argument("--limit", type=int, default=100)
    amb.add_argument("--after", metavar="ADDRESS", help="start after this address (paging)")
    amb.add_argument("--json", action="store_true")


def _contacts(args: argparse.Namespace) -> int:
    from gateway.crm.contacts import read_csv_file, resolve_owners

    cfg = config(args)
    if args.contacts_cmd == "import":
        rows = read_csv_file(args.file)   # ConfigError (exit 2) lists every bad line
        resolve_owners(rows, cfg, str(args.file))   # owners must be users: exit 2 otherwise
        if args.dry_run:
            print(f"{args.file}: {len(rows)} contact(s), no errors")
            return EXIT_OK
        return asyncio.run(_import(cfg, args, rows))
    if args.contacts_cmd == "ambiguous":
        return asyncio.run(_ambiguous(cfg, args))
    return asyncio.run(_list(cfg, args))


async def _import(cfg: Config, args: argparse.Namespace, rows: list[ContactInput]) -> int:
    from gateway.crm.contacts import upsert_contacts
    from gateway.crm.store import Store

    store = await Store.from_config(cfg)
    try:
        r = await upsert_contacts(store, rows)
    finally:
        await store.close()
    print(f"{args.file}: {r.created} created, {r.updated} updated, {r.unchanged} unchanged; "
          f"{r.companies_created} new companies; {r.messages_linked} message links added")
    return EXIT_OK


async def _list(cfg: Config, args: argparse.Namespace) -> int:
    from gateway.crm.contacts import list_contacts

    rows = await with_store(cfg, lambda store: list_contacts(
        store, search=args.search, after=args.after, limit=args.limit))
    return print_rows(rows, args.json, lambda r: (
        f"{r['email']:<36} {r['name'][:28]:<28} {r['company'][:24]:<24} {r['title'][:20]}"),
        f"{len(rows)} contact(s)")


async def _ambiguous(cfg: Config, args: argparse.Namespace) -> int:
    from gateway.crm.identify import list_ambiguous

    rows = await with_store(cfg, lambda store: list_ambiguous(store, after=args.after, limit=args.limit))
    return print_rows(rows, args.json, lambda r: (
        f"{r['address']:<36} {r['name'][:28]:<28} {r['messages']:>5}  {', '.join(r['candidates'])}"),
        f"{len(rows)} ambiguous address(es)")
