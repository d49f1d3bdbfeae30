"""Shared test fixtures: free ports, real-peer requirements (skip on a laptop, fail in CI), stores.

Store fixtures: ``url`` is an empty database, once an SQLite file in tmp_path and once
the session's PostgreSQL database (``mailgw_test_<random>`` next to the database
``test`` at 127.0.0.1:5432, dropped at the end; change the admin DSN with
``MAILGW_TEST_PG``); ``store`` is a :class:`gateway.crm.store.Store` open on it, at the
newest revision, not every migration run again for each test: SQLite copies a file
migrated once per session; PostgreSQL empties the session's database when it is still at
the newest revision with the template's schema (every row but ``alembic_version``'s
deleted, sequences restarted, rows the migrations seeded put back), and
otherwise (a test emptied or changed it) makes it a copy of the session's migrated
template again (``CREATE DATABASE … TEMPLATE``). Under pytest-xdist every worker is a
session of its own, with its own databases.
"""

from __future__ import annotations

import asyncio
import importlib
import io
import os
import random
import secrets
import shutil
import socket
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import asyncpg
import pytest
import sqlalchemy as sa

from gateway.crm.migrate import upgrade
from gateway.crm.store import Store

if TYPE_CHECKING:
    from tests.support.dovecot import Dovecot

PG_ADMIN = os.environ.get("MAILGW_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def require(condition: bool, what: str) -> None:
    """Skip when a real peer is missing on a developer machine; fail when CI=true."""
    if condition:
        return
    if in_ci():
        pytest.fail(f"{what} is required in CI (CI=true) but is missing")
    pytest.skip(f"{what} not available")


def require_module(name: str, what: str | None = None) -> Any:
    """`import name`, usable at module level: a missing package (a test extra) skips the
    module on a developer machine and fails it when CI=true (pytest.importorskip would
    skip it there too, and a fuzz target that never runs guards nothing)."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        why = f"the {name} package ({what or 'pip install -e .[test]'}): {exc}"
        if in_ci():
            pytest.fail(f"{why} is required in CI (CI=true) but is missing", pytrace=False)
        pytest.skip(f"{why} not available", allow_module_level=True)


def require_tool(name: str) -> str:
    path = shutil.which(name)
    require(path is not None, f"the {name} command")
    assert path is not None
    return path


@pytest.fixture(scope="module")
def dovecot() -> Iterator[Dovecot]:
    """A private Dovecot per test module (a module that needs another kind, e.g. with an
    OAuth token endpoint, defines its own `dovecot`)."""
    from tests.support.dovecot import Dovecot  # it imports this module

    require_tool("dovecot")
    with Dovecot() as dc:
        yield dc


def _ephemeral_ports() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


_RANDOM = random.Random()   # seeded from os.urandom: each worker and session its own order


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now, for a server a test starts.

    Picked at random below the kernel's ephemeral range: a port bind(0) hands out is one
    that any outgoing connection on the machine (other workers, other test runs, their
    PostgreSQL clients) may take between this check and the server's bind.
    """
    low, _high = _ephemeral_ports()
    if low > 12000:
        for _ in range(200):
            port = _RANDOM.randrange(10000, low)
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _pg_admin() -> asyncpg.Connection:
    return await asyncio.wait_for(asyncpg.connect(PG_ADMIN), 5)


@pytest.fixture(scope="session")
def pg_database() -> Iterator[str | None]:
    """A PostgreSQL database for this session (None when PostgreSQL is unreachable)."""
    name = f"mailgw_test_{secrets.token_hex(6)}"

    async def create() -> str | None:
        try:
            admin = await _pg_admin()
        except (OSError, asyncpg.PostgresError, TimeoutError):
            return None
        try:
            await admin.execute(f'CREATE DATABASE "{name}"')
        finally:
            await admin.close()
        return name

    async def drop() -> None:
        admin = await _pg_admin()
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()

    created = asyncio.run(create())
    yield created
    if created:
        asyncio.run(drop())


def _pg_url(database: str) -> str:
    admin = sa.make_url(PG_ADMIN)
    return admin.set(drivername="postgresql+asyncpg", database=database).render_as_string(
        hide_password=False)


@pytest.fixture
async def pg_url(pg_database: str | None) -> str:
    """The session's PostgreSQL database, emptied."""
    require(pg_database is not None, f"PostgreSQL at {sa.make_url(PG_ADMIN).host}")
    assert pg_database is not None
    conn = await asyncpg.connect(_pg_url(pg_database).replace("+asyncpg", ""))
    try:
        await conn.execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
    finally:
        await conn.close()
    return _pg_url(pg_database)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.integration)])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty database: a new SQLite file, or the session's PostgreSQL database emptied
    (left as it is when the test has a `store`, which resets it to the template)."""
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path}/state/crm.db"
    if "store" in request.fixturenames:
        pg_database = request.getfixturevalue("pg_database")
        require(pg_database is not None, f"PostgreSQL at {sa.make_url(PG_ADMIN).host}")
        return _pg_url(pg_database)
    return str(request.getfixturevalue("pg_url"))


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An SQLite store at the newest revision, made once per session: `store` copies it
    (running every migration for each test's new file was most of a store test's setup)."""
    path = tmp_path_factory.mktemp("store-template") / "crm.db"

    async def make() -> None:
        s = await Store.open(f"sqlite+aiosqlite:///{path}")
        await s.close()

    asyncio.run(make())
    return path


@dataclass(frozen=True)
class PgTemplate:
    """The session's migrated PostgreSQL template: its name, its schema's fingerprint, its
    tables, the rows its migrations seeded (binary COPY data by table) and its sequences
    (the last value each gave, None for one never used)."""

    name: str
    fingerprint: str
    tables: tuple[str, ...]
    seeded: dict[str, bytes]
    sequences: dict[str, int | None]


#: One text for a schema: the revision, every column and every index of `public`.
_FINGERPRINT = """
SELECT coalesce((SELECT string_agg(version_num, ',') FROM alembic_version), '') || '|' ||
  coalesce((SELECT string_agg(c.relname || '.' || a.attname || ':' || format_type(a.atttypid, a.atttypmod)
                                || ':' || a.attnotnull, ',' ORDER BY c.relname, a.attnum)
            FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
            JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p') AND a.attnum > 0
              AND NOT a.attisdropped), '') || '|' ||
  coalesce((SELECT string_agg(indexdef, ',' ORDER BY indexname) FROM pg_indexes
            WHERE schemaname = 'public'), '') || '|' ||
  coalesce((SELECT string_agg(tgname, ',' ORDER BY tgname) FROM pg_trigger t
            JOIN pg_class c ON c.oid = t.tgrelid JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE n.nspname = 'public' AND NOT t.tgisinternal), '')
"""


async def _fingerprint(conn: asyncpg.Connection) -> str:
    try:
        return str(await conn.fetchval(_FINGERPRINT))
    except asyncpg.UndefinedTableError:  # no alembic_version: never migrated (or emptied)
        return ""


@pytest.fixture(scope="session")
def pg_template(pg_database: str | None) -> Iterator[PgTemplate | None]:
    """A PostgreSQL database at the newest revision, made once per session, with what
    `store` needs to tell whether the session's database still has its schema."""
    if pg_database is None:
        yield None
        return
    name = f"{pg_database}_tmpl"

    async def make() -> PgTemplate:
        admin = await _pg_admin()
        try:
            await admin.execute(f'CREATE DATABASE "{name}"')
        finally:
            await admin.close()
        await upgrade(_pg_url(name))
        conn = await asyncpg.connect(_pg_url(name).replace("+asyncpg", ""))
        try:
            tables = tuple(r["tablename"] for r in await conn.fetch(
                "SELECT tablename FROM pg_tables WHERE schemaname = 'public' "
                "AND tablename <> 'alembic_version' ORDER BY tablename"))
            seeded: dict[str, bytes] = {}
            for table in tables:
                if await conn.fetchval(f'SELECT EXISTS (SELECT 1 FROM "{table}")'):
                    out = io.BytesIO()
                    await conn.copy_from_table(table, output=out, format="binary")
                    seeded[table] = out.getvalue()
            sequences = {r["sequencename"]: r["last_value"] for r in await conn.fetch(
                "SELECT sequencename, last_value FROM pg_sequences WHERE schemaname = 'public'")}
            return PgTemplate(name, await _fingerprint(conn), tables, seeded, sequences)
        finally:
            await conn.close()

    async def drop() -> None:
        admin = await _pg_admin()
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()

    template = asyncio.run(make())
    yield template
    asyncio.run(drop())


async def _empty_pg(conn: asyncpg.Connection, template: PgTemplate) -> None:
    """Delete every row but alembic_version's, put the seeded rows back, set every sequence
    where the template has it. DELETE with foreign keys and triggers off
    (session_replication_role, a superuser's) takes a hundredth of a second where
    TRUNCATE's new files take a tenth; without the privilege, TRUNCATE … CASCADE."""
    sequences = "; ".join(
        f'ALTER SEQUENCE "{q}" RESTART' if last is None else f"SELECT setval('\"{q}\"', {last})"
        for q, last in template.sequences.items())

    async def empty(how: str) -> None:
        async with conn.transaction():
            await conn.execute("SET LOCAL lock_timeout = '20s'")
            await conn.execute(how)
            for table, rows in template.seeded.items():
                await conn.copy_to_table(table, source=io.BytesIO(rows), format="binary")
            if sequences:
                await conn.execute(sequences)

    try:
        await empty("SET LOCAL session_replication_role = replica; "
                    + "; ".join(f'DELETE FROM "{t}"' for t in template.tables))
    except asyncpg.InsufficientPrivilegeError:
        await empty("TRUNCATE " + ", ".join(f'"{t}"' for t in template.tables) + " CASCADE")


async def _reset_pg(url: str, template: PgTemplate) -> None:
    """Make the database at `url` as the template is: emptied in place when its schema is
    the template's, else dropped and copied from the template."""
    database = sa.make_url(url).database
    conn = await asyncio.wait_for(asyncpg.connect(url.replace("+asyncpg", "")), 10)
    try:
        # what DROP DATABASE … WITH (FORCE) did: no connection a test left open holds a lock
        await conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                           "WHERE datname = current_database() AND pid <> pg_backend_pid()")
        if await _fingerprint(conn) == template.fingerprint:
            await _empty_pg(conn, template)
            return
    finally:
        await conn.close()
    admin = await _pg_admin()
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        await admin.execute(f'CREATE DATABASE "{database}" TEMPLATE "{template.name}"')
    finally:
        await admin.close()


def _copy_template(template: Path, url: str) -> None:
    path = Path(str(sa.make_url(url).database))
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(template, path)


@pytest.fixture
async def store(url: str, sqlite_template: Path, pg_template: PgTemplate | None
                ) -> AsyncIterator[Store]:
    """A store at the newest revision on `url`: the session's PostgreSQL database reset to
    the template, or the SQLite template copied."""
    if url.startswith("postgresql"):
        assert pg_template is not None
        await _reset_pg(url, pg_template)
    else:
        await asyncio.to_thread(_copy_template, sqlite_template, url)
    s = await Store.open(url)
    try:
        yield s
    finally:
        await s.close()
