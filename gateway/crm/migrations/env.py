"""Alembic environment of the CRM store: run the migrations on one connection, async drivers only.

`gateway.crm.migrate` passes a connection in (``config.attributes["connection"]``), so
migrations run inside the caller's event loop. Run from the alembic command line instead
(``alembic -x url=sqlite+aiosqlite:///var/crm.db upgrade head`` with a config whose
script_location points here), it makes its own async engine and event loop.
"""

from __future__ import annotations

import asyncio
import warnings

from alembic import context
from sqlalchemy.engine import Connection
from sqlalchemy.exc import SAWarning

from gateway.crm.engine import make_engine
from gateway.crm.models import in_models, metadata


def do_run_migrations(connection: Connection) -> None:
    context.configure(connection=connection, target_metadata=metadata, include_name=in_models,
                      render_as_batch=connection.dialect.name == "sqlite", compare_type=True)
    with warnings.catch_warnings():
        # SQLite batch mode cannot reflect the expression index ix_messages_sort_at; the
        # migrations that rebuild `messages` create it again themselves
        warnings.filterwarnings("ignore", "Skipped unsupported reflection of expression-based index",
                                SAWarning)
        with context.begin_transaction():
            context.run_migrations()


def _url() -> str:
    url = context.get_x_argument(as_dictionary=True).get("url") or \
        context.config.attributes.get("url") or context.config.get_main_option("sqlalchemy.url")
    if not url:
        raise SystemExit("no store URL: pass -x url=... (sqlite+aiosqlite:///... or postgresql+asyncpg://...)")
    return str(url)


async def run_async_migrations() -> None:
    engine = make_engine(_url(), migrations=True)
    try:
        async with engine.connect() as connection:
            await connection.run_sync(do_run_migrations)
            await connection.commit()
    finally:
        await engine.dispose()


def run_migrations_offline() -> None:
    url = _url()
    context.configure(url=url, target_metadata=metadata, literal_binds=True,
                      render_as_batch=url.startswith("sqlite"))
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
elif (conn := context.config.attributes.get("connection")) is not None:
    do_run_migrations(conn)
else:
    asyncio.run(run_async_migrations())
