"""`mailgw db upgrade`: apply the CRM store's schema migrations (Alembic)."""

from __future__ import annotations

import argparse
import asyncio
import time

from gateway.cli.common import EXIT_OK, Subparsers, config
from gateway.config import Config


def register(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    db = sub.add_parser("db", parents=[common], help="the CRM store")
    dbs = db.add_subparsers(dest="db_cmd", required=True, parser_class=type(common))
    dbs.add_parser("upgrade", parents=[common],
                   help="apply schema migrations (Alembic)").set_defaults(func=_db)


def _db(args: argparse.Namespace) -> int:
    return asyncio.run(_db_upgrade(config(args)))


async def _db_upgrade(cfg: Config) -> int:
    from gateway.crm.migrate import current_revision, upgrade

    t = time.monotonic()
    await upgrade(cfg.store_url)
    rev = await current_revision(cfg.store_url)
    print(f"store at revision {rev} ({time.monotonic() - t:.1f}s)")
    return EXIT_OK
