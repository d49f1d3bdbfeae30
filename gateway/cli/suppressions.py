"""`mailgw suppressions list|add|remove`: the addresses later mail must not reach."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Iterator

from gateway.cli.common import EXIT_OK, Subparsers, config, print_json
from gateway.config import Config
from gateway.errors import NotFound, UsageError


class _Reasons:
    """gateway.crm.models.SUPPRESSION_REASONS as argparse's `choices`, read when argparse
    first looks (a --reason value, the command's help): the models (and SQLAlchemy) are
    not imported when the parser is built, so other commands start faster."""

    @staticmethod
    def _values() -> tuple[str, ...]:
        from gateway.crm.models import SUPPRESSION_REASONS

        return SUPPRESSION_REASONS

    def __contains__(self, value: object) -> bool:
        return value in self._values()

    def __iter__(self) -> Iterator[str]:
        return iter(self._values())


def register(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    s = sub.add_parser("suppressions", parents=[common],
                       help="the suppression list (hard bounces, complaints, added by hand)")
    s.set_defaults(func=_suppressions)
    ss = s.add_subparsers(dest="suppressions_cmd", required=True, parser_class=type(common))
    lst = ss.add_parser("list", parents=[common], help="suppressed addresses in address order")
    # set after add_argument, which formats the choices once (and so would import the models)
    lst.add_argument("--reason").choices = _Reasons()
    lst.add_argument("--prefix", metavar="TEXT", help="addresses starting with TEXT")
    lst.add_argument("--limit", type=int, default=100)
    lst.add_argument("--after", metavar="ADDRESS", help="start after this address (paging)")
    lst.add_argument("--json", action="store_true")
    add = ss.add_parser("add", parents=[common], help="suppress an address by hand")
    add.add_argument("address")
    add.add_argument("--detail", default="", metavar="TEXT", help="why (shown in the list)")
    add.add_argument("--json", action="store_true")
    rm = ss.add_parser("remove", parents=[common], help="take an address off the list")
    rm.add_argument("address")


def _suppressions(args: argparse.Namespace) -> int:
    return asyncio.run(_run(config(args), args))


async def _run(cfg: Config, args: argparse.Namespace) -> int:
    from gateway.crm.store import Store
    from gateway.crm.suppression import SuppressionList

    store = await Store.from_config(cfg)
    try:
        sl = SuppressionList(store)
        if args.suppressions_cmd == "list":
            rows = await sl.list(reason=args.reason, prefix=args.prefix, after=args.after,
                                 limit=args.limit)
            if args.json:
                print_json(rows)
                return EXIT_OK
            for r in rows:
                when = (r["created_at"] or "")[:16].replace("T", " ")
                print(f"{r['address']:<40} {r['reason']:<10} {when:<16}  {r['detail'][:60]}")
            print(f"-- {len(rows)} suppressed address(es)")
            return EXIT_OK
        if args.suppressions_cmd == "add":
            try:
                row, created = await sl.add(args.address, detail=args.detail, created_by="cli")
            except ValueError as exc:
                raise UsageError(str(exc)) from None
            if args.json:
                print_json(row)
            elif created:
                print(f"{row['address']}: suppressed")
            else:
                print(f"{row['address']}: already suppressed ({row['reason']}: {row['detail']})")
            return EXIT_OK
        if not await sl.remove(args.address):
            raise NotFound(f"{args.address.strip().lower()} is not on the suppression list")
        print(f"{args.address.strip().lower()}: removed from the suppression list")
        return EXIT_OK
    finally:
        await store.close()
