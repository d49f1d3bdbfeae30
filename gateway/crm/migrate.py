"""Apply and inspect the store's schema migrations (Alembic, shipped in `gateway/crm/migrations`).

No alembic.ini is needed: the Alembic config is built here, with `script_location`
pointing into the package. Migrations run on a connection this module opens and
passes to `env.py`, inside the caller's event loop (``connection.run_sync``), so
:func:`upgrade` is safe to await from a running daemon or from the CLI.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import text
from sqlalchemy.engine import Connection
from sqlalchemy.exc import SQLAlchemyError

from gateway.crm.engine import describe_error, make_engine, safe_url
from gateway.errors import StoreError

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
#: pg_advisory_xact_lock key: nodes upgrading one PostgreSQL at once take turns.
_PG_LOCK_KEY = 0x6D61696C67770001


def alembic_config() -> AlembicConfig:
    """The Alembic configuration of the store, built in code."""
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    return cfg


def _head() -> str:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    if head is None:  # pragma: no cover - the package always ships revisions
        raise StoreError(f"no migrations found in {MIGRATIONS_DIR}")
    return head


async def head_revision() -> str:
    """The newest revision this version of mailgw knows."""
    return await asyncio.to_thread(_head)


async def is_known_revision(revision: str) -> bool:
    """Whether `revision` is one of the migrations this version of mailgw ships."""
    def known() -> bool:
        try:
            return ScriptDirectory.from_config(alembic_config()).get_revision(revision) is not None
        except Exception:  # alembic raises several kinds for an unknown or malformed id
            return False

    return await asyncio.to_thread(known)


def current_revision_sync(conn: Connection) -> str | None:
    """The revision a database is at (None: never migrated), on a sync connection."""
    return MigrationContext.configure(conn).get_current_revision()


def _upgrade_sync(conn: Connection, target: str) -> None:
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_LOCK_KEY})
    cfg = alembic_config()
    cfg.attributes["connection"] = conn
    command.upgrade(cfg, target)


async def upgrade(url: str, target: str = "head") -> None:
    """Apply every migration up to `target` in one transaction (what `mailgw db upgrade` runs)."""
    engine = make_engine(url, migrations=True)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(_upgrade_sync, target)
    except (SQLAlchemyError, OSError) as exc:
        raise StoreError(f"cannot upgrade the store {safe_url(url)}: "
                         f"{describe_error(exc, url)}") from exc
    finally:
        await engine.dispose()


async def current_revision(url: str) -> str | None:
    """The revision the database at `url` is at; None when it was never migrated."""
    engine = make_engine(url, migrations=True)
    try:
        async with engine.connect() as conn:
            return await conn.run_sync(current_revision_sync)
    except (SQLAlchemyError, OSError) as exc:
        raise StoreError(f"cannot read the store {safe_url(url)}: "
                         f"{describe_error(exc, url)}") from exc
    finally:
        await engine.dispose()
