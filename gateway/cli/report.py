"""`mailgw report engagement`: sent, delivered, opened, clicked, replied and bounced, with rates."""

from __future__ import annotations

import argparse
import asyncio

from gateway.cli.common import EXIT_OK, Subparsers, config, print_json
from gateway.config import Config
from gateway.errors import UsageError


def register(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    r = sub.add_parser("report", parents=[common], help="reports from the CRM store")
    r.set_defaults(func=_report)
    rs = r.add_subparsers(dest="report_cmd", required=True, parser_class=type(common))
    e = rs.add_parser("engagement", parents=[common],
                      help="per-recipient delivery and engagement counts and rates "
                           "(human opens and clicks only)")
    e.add_argument("--days", type=int, default=30, help="window: messages first relayed in the "
                                                         "last N days (default 30)")
    e.add_argument("--by", choices=("template", "campaign", "user", "domain"),
                   help="one row per template, campaign, sending user or recipient domain")
    e.add_argument("--json", action="store_true", help="print JSON only")


def _report(args: argparse.Namespace) -> int:
    from gateway.crm.reports import MAX_DAYS

    if not 1 <= args.days <= MAX_DAYS:
        raise UsageError(f"--days {args.days}: expected 1 to {MAX_DAYS}")
    return asyncio.run(_areport(config(args), args))


async def _areport(cfg: Config, args: argparse.Namespace) -> int:
    from gateway.crm.reports import engagement, format_table
    from gateway.crm.store import Store

    store = await Store.open(cfg.store_url, auto_upgrade=True)
    try:
        report = await engagement(store, days=args.days, by=args.by)
    finally:
        await store.close()
    if args.json:
        print_json(report)
    else:
        print(format_table(report))
    return EXIT_OK
