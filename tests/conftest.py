"""Shared test fixtures: free ports, real-peer requirements (skip on a laptop, fail in CI), stores.

Store fixtures: ``url`` is an empty database, once an SQLite file in tmp_path and once
the session's PostgreSQL database (``mailgw_test_<random>`` next to the database
``test`` at 127.0.0.1:5432, dropped at the end; change the admin DSN with
``MAILGW_TEST_PG``); ``store`` is a :class:`gateway.crm.store.Store` open on it, at the
newest revision: a copy of a template migrated once per session (an SQLite file copied,
or ``CREATE DATABASE … TEMPLATE``), not every migration run again for each test.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest
import sqlalchemy as sa

from gateway.crm.migrate import upgrade
from gateway.crm.store import Store

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


def require_tool(name: str) -> str:
    path = shutil.which(name)
    require(path is not None, f"the {name} command")
    assert path is not None
    return path


def free_port() -> int:
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
    """An empty database: a new SQLite file, or the session's PostgreSQL database emptied."""
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path}/state/crm.db"
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


@pytest.fixture(scope="session")
def pg_template(pg_database: str | None) -> Iterator[str | None]:
    """A PostgreSQL database at the newest revision, made once per session: `store` makes
    the session's database a copy of it (CREATE DATABASE … TEMPLATE) instead of migrating."""
    if pg_database is None:
        yield None
        return
    name = f"{pg_database}_tmpl"

    async def make() -> None:
        admin = await _pg_admin()
        try:
            await admin.execute(f'CREATE DATABASE "{name}"')
        finally:
            await admin.close()
        await upgrade(_pg_url(name))

    async def drop() -> None:
        admin = await _pg_admin()
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()

    asyncio.run(make())
    yield name
    asyncio.run(drop())


def _copy_template(template: Path, url: str) -> None:
    path = Path(str(sa.make_url(url).database))
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(template, path)


@pytest.fixture
async def store(url: str, sqlite_template: Path, pg_template: str | None) -> AsyncIterator[Store]:
    """A store at the newest revision on `url`, copied from the session's template."""
    if url.startswith("postgresql"):
        assert pg_template is not None
        database = sa.make_url(url).database
        admin = await _pg_admin()
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
            await admin.execute(f'CREATE DATABASE "{database}" TEMPLATE "{pg_template}"')
        finally:
            await admin.close()
    else:
        await asyncio.to_thread(_copy_template, sqlite_template, url)
    s = await Store.open(url)
    try:
        yield s
    finally:
        await s.close()
