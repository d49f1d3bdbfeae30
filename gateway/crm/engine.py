"""Turn a store URL into a configured AsyncEngine (SQLite pragmas, async drivers) and say it safely.

Shared by the store and by the migrations so that both talk to the database the same
way. Nothing here touches the database until the engine's first connection.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from sqlalchemy import event, pool
from sqlalchemy.engine import URL, Connection, make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from gateway.errors import StoreError

#: Per-connection SQLite settings of the store: WAL lets readers run beside the writer.
SQLITE_PRAGMAS: tuple[str, ...] = ("journal_mode=WAL", "synchronous=NORMAL", "foreign_keys=ON",
                                   "busy_timeout=5000")
#: The same for migrations, but with foreign keys off: SQLite batch mode rebuilds a table
#: (copy, DROP, rename), and a DROP with foreign keys on would cascade-delete child rows.
MIGRATION_PRAGMAS: tuple[str, ...] = ("journal_mode=WAL", "synchronous=NORMAL", "foreign_keys=OFF",
                                      "busy_timeout=5000")
PG_CONNECT_TIMEOUT = 10.0

_ASYNC_DRIVERS = {"sqlite": "sqlite+aiosqlite", "postgresql": "postgresql+asyncpg",
                  "postgres": "postgresql+asyncpg"}


def safe_url(url: str | URL) -> str:
    """The URL with any password masked, for messages and logs."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return re.sub(r"(//[^:/@]*:)[^@]*@", r"\1***@", str(url))


def parse_url(url: str) -> URL:
    """Parse a store URL and pick the async driver (`sqlite://` -> aiosqlite, `postgresql://` -> asyncpg).

    Raises StoreError for a URL that cannot be parsed or names another database.
    """
    try:
        u = make_url(url)
    except (ArgumentError, ValueError) as exc:
        raise StoreError(f"invalid store URL {safe_url(url)}: {exc}") from None
    driver = u.drivername
    if driver in _ASYNC_DRIVERS:
        u = u.set(drivername=_ASYNC_DRIVERS[driver])
    if u.drivername not in ("sqlite+aiosqlite", "postgresql+asyncpg"):
        raise StoreError(f"unsupported store URL {safe_url(u)}: use sqlite+aiosqlite:///PATH "
                         "or postgresql+asyncpg://USER@HOST/DB")
    return u


def _sqlite_file(u: URL) -> Path | None:
    db = u.database
    if not db or db == ":memory:" or db.startswith("file:"):
        return None
    return Path(db)


def make_engine(url: str, *, migrations: bool = False) -> AsyncEngine:
    """An AsyncEngine for the store (or, with `migrations`, for running Alembic).

    SQLite: the parent directory is created and every new connection gets
    :data:`SQLITE_PRAGMAS`. The migration engine also makes SQLite transactions real
    (the driver otherwise runs DDL outside any transaction), so a failed migration
    leaves the file as it was. PostgreSQL: a connect timeout and pre-ping, so a
    restarted server costs one failed attempt, not a stuck pool.
    """
    u = parse_url(url)
    if u.get_backend_name() == "sqlite":
        path = _sqlite_file(u)
        if path is not None:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StoreError(f"cannot create the directory of the store {path}: "
                                 f"{exc.strerror or exc}") from None
        kwargs: dict[str, Any] = {"poolclass": pool.NullPool} if migrations else {}
        engine = create_async_engine(u, **kwargs)
        pragmas = MIGRATION_PRAGMAS if migrations else SQLITE_PRAGMAS

        @event.listens_for(engine.sync_engine, "connect")
        def _on_connect(dbapi_conn: Any, _record: Any) -> None:
            if migrations:
                dbapi_conn.isolation_level = None  # BEGIN is emitted below, DDL included
            cur = dbapi_conn.cursor()
            for pragma in pragmas:
                cur.execute(f"PRAGMA {pragma}")
            cur.close()

        if migrations:
            @event.listens_for(engine.sync_engine, "begin")
            def _on_begin(conn: Connection) -> None:
                conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    kwargs = {"poolclass": pool.NullPool} if migrations else {"pool_pre_ping": True}
    return create_async_engine(u, connect_args={"timeout": PG_CONNECT_TIMEOUT}, **kwargs)


def describe_error(exc: BaseException, url: str | URL) -> str:
    """A one-line reason for a database failure, without the URL's password."""
    orig = getattr(exc, "orig", None)
    inner = orig if isinstance(orig, BaseException) else exc
    text = str(inner).strip().splitlines()[0] if str(inner).strip() else ""
    reason = f"{type(inner).__name__}: {text}" if text else type(inner).__name__
    try:
        password = make_url(url).password
    except Exception:
        password = None
    if password:
        reason = reason.replace(str(password), "***")
    return reason[:300]
