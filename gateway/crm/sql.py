"""What every CRM query shares: values both backends take, lookups in chunks, the dialect's INSERT.

The store and its siblings (accounts, contacts, counters, outbox, reports, threads) build
their statements with these, so SQLite and PostgreSQL see the same cleaned values:

- :func:`clean_json` and friends (on :func:`gateway.records.clean_text`): nothing a caller
  passes (a NUL, a lone surrogate, a float that is not finite) may make a whole batch fail
  on either backend;
- :func:`chunks`: ``IN (...)`` lookups and multi-row INSERTs of at most :data:`CHUNK` rows;
- :func:`utc` / :func:`iso`: datetimes in UTC and as the ISO text the JSON shows;
- :func:`insert`: the dialect's INSERT, which has ``ON CONFLICT DO NOTHING`` on both;
- :class:`Database`: what a query module needs of the store (the store is one), so a
  module the store itself uses can take it without importing it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Protocol

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncEngine

from gateway.errors import StoreError
from gateway.records import clean_text

#: Values per IN (...) lookup; far below SQLite's 32,766 bound parameters.
CHUNK = 500


class Database(Protocol):
    """The store as a query module uses it: its engine, its backend, its error wording."""

    @property
    def engine(self) -> AsyncEngine: ...

    @property
    def dialect(self) -> str: ...

    def error(self, what: str, exc: BaseException) -> StoreError:
        """The StoreError to raise for `exc` (a database or OS error) while doing `what`."""
        ...


def clean_opt_text(value: str | None) -> str | None:
    """:func:`clean_text`, keeping None."""
    return None if value is None else clean_text(value)


def clean_json(value: Any) -> Any:
    """A JSON-serialisable copy with clean strings; anything else becomes its str()."""
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, str):
        return clean_text(value)
    if isinstance(value, Mapping):
        return {clean_text(str(k)): clean_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [clean_json(v) for v in value]
    if isinstance(value, datetime):
        return iso(value)
    if isinstance(value, bytes):
        return clean_text(value.decode("utf-8", "replace"))
    return clean_text(str(value))


def clean_addrs(values: Iterable[str]) -> list[str]:
    """The non-empty values, each through :func:`gateway.records.clean_text`."""
    return [clean_text(v) for v in values if v]


def utc(value: datetime) -> datetime:
    """`value` in UTC; a naive datetime is taken to be UTC."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def iso(value: datetime | None) -> str | None:
    """`value` in UTC as ISO 8601 text (None stays None): how every JSON view shows a time."""
    return None if value is None else utc(value).isoformat()


def chunks(items: Sequence[Any]) -> Iterable[Sequence[Any]]:
    """`items` in slices of at most :data:`CHUNK`."""
    for i in range(0, len(items), CHUNK):
        yield items[i:i + CHUNK]


def insert(dialect: str, table: sa.Table) -> Any:
    """An INSERT into `table` in `dialect`'s flavour (``postgresql`` or ``sqlite``).

    Both flavours have ``on_conflict_do_nothing(index_elements=...)`` and
    ``returning(...)``; they are different classes, hence ``Any``.
    """
    if dialect == "postgresql":
        return postgresql.insert(table)
    return sqlite.insert(table)
