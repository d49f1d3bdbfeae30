"""The CRM store's schema as SQLAlchemy 2 declarative models (one schema for SQLite and PostgreSQL).

Tables:

``messages``
    one row per message, however many paths saw it; ``queue_id`` (the relay's spool id)
    is unique so that recording the same accepted message twice stores it once.
``events``
    what happened to a message for one recipient: queued, sent, deferred, bounced,
    opened, clicked, replied; deleted with their message.
``message_addresses``
    the lower-cased From/To/Cc addresses of each message, one row per (message, role,
    address); an index for "all mail with this contact" that JSON columns cannot give
    portably.

Every datetime is stored in UTC and read back timezone-aware on both backends
(:class:`UTCDateTime`). Constraints and indexes carry explicit names (the naming
convention on :data:`metadata`) so later migrations can alter them in SQLite batch mode.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

NAMING_CONVENTION: dict[str, str] = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

metadata = sa.MetaData(naming_convention=NAMING_CONVENTION)

DIRECTIONS: tuple[str, ...] = ("inbound", "outbound")
EVENT_TYPES: tuple[str, ...] = ("queued", "sent", "deferred", "bounced", "opened", "clicked", "replied")
ADDRESS_ROLES: tuple[str, ...] = ("from", "to", "cc")
SNIPPET_MAX = 200

#: 64-bit ids on PostgreSQL; SQLite needs exactly INTEGER for a rowid primary key.
BigID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware datetime stored in UTC; naive values are taken to be UTC.

    PostgreSQL keeps it as ``timestamptz``; SQLite, which has no time zones, keeps the
    naive UTC wall time (its ISO text sorts in time order). Both read back aware, in UTC.
    """

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if not isinstance(value, datetime):
            raise TypeError(f"expected a datetime, got {type(value).__name__}")
        value = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
        if dialect.name == "sqlite":
            return value.replace(tzinfo=None)
        return value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


class Base(DeclarativeBase):
    metadata = metadata
    type_annotation_map: dict[Any, Any] = {datetime: UTCDateTime()}


class Message(Base):
    """A stored message (SPEC §6 "Messages")."""

    __tablename__ = "messages"
    __table_args__ = (
        sa.CheckConstraint(_in("direction", DIRECTIONS), name="direction"),
        {"sqlite_autoincrement": True},  # ids are exposed: never reuse one after a delete
    )

    id: Mapped[int] = mapped_column(BigID, primary_key=True)
    message_id: Mapped[str] = mapped_column(sa.String, index=True, default="")
    thread_id: Mapped[str | None] = mapped_column(sa.String, index=True)
    direction: Mapped[str] = mapped_column(sa.String(16))
    account: Mapped[str | None] = mapped_column(sa.String)
    user: Mapped[str | None] = mapped_column(sa.String)
    from_addr: Mapped[str] = mapped_column(sa.String, default="")
    to_addrs: Mapped[list[str]] = mapped_column(sa.JSON, default=list)
    cc_addrs: Mapped[list[str]] = mapped_column(sa.JSON, default=list)
    subject: Mapped[str] = mapped_column(sa.String, default="")
    date: Mapped[datetime | None] = mapped_column()
    snippet: Mapped[str] = mapped_column(sa.String(SNIPPET_MAX), default="")
    size: Mapped[int] = mapped_column(sa.Integer, default=0)
    sources: Mapped[list[str]] = mapped_column(sa.JSON, default=list)
    queue_id: Mapped[str | None] = mapped_column(sa.String, unique=True)
    created_at: Mapped[datetime] = mapped_column(server_default=sa.func.now())


class Event(Base):
    """One thing that happened to a message for one recipient (SPEC §6 "events")."""

    __tablename__ = "events"
    __table_args__ = (sa.CheckConstraint(_in("type", EVENT_TYPES), name="type"),)

    id: Mapped[int] = mapped_column(BigID, primary_key=True)
    message_pk: Mapped[int] = mapped_column(
        BigID, sa.ForeignKey("messages.id", ondelete="CASCADE"), index=True)
    type: Mapped[str] = mapped_column(sa.String(16))
    at: Mapped[datetime] = mapped_column()
    recipient: Mapped[str] = mapped_column(sa.String, default="")
    machine: Mapped[bool] = mapped_column(sa.Boolean, default=False, server_default=sa.false())
    details: Mapped[dict[str, Any]] = mapped_column(sa.JSON, default=dict)


class MessageAddress(Base):
    """A lower-cased From/To/Cc address of a message: the index behind the contact filter."""

    __tablename__ = "message_addresses"
    __table_args__ = (sa.CheckConstraint(_in("role", ADDRESS_ROLES), name="role"),)

    message_pk: Mapped[int] = mapped_column(
        BigID, sa.ForeignKey("messages.id", ondelete="CASCADE"), primary_key=True)
    role: Mapped[str] = mapped_column(sa.String(8), primary_key=True)
    address: Mapped[str] = mapped_column(sa.String, primary_key=True)


#: The time a message sorts and filters by: its Date header, else when it was stored.
sort_at = sa.func.coalesce(Message.date, Message.created_at)

sa.Index("ix_messages_sort_at", sort_at)
sa.Index("ix_message_addresses_address", MessageAddress.address, MessageAddress.message_pk)
