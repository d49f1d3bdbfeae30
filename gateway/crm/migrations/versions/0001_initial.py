"""Initial CRM store: messages, their per-recipient events, and their From/To/Cc addresses.

Revision ID: 0001
Revises:
Create Date: 2026-11-22
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision: str | None = None
branch_labels: str | None = None
depends_on: str | None = None

# Written out here rather than imported: a migration must keep meaning what it meant.
BigID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def UTCDateTime() -> sa.DateTime:
    """The DDL of gateway.crm.models.UTCDateTime (timestamptz on PostgreSQL, DATETIME on
    SQLite); this revision binds no value through it, so its conversions are not needed."""
    return sa.DateTime(timezone=True)


EVENT_TYPES = "'queued', 'sent', 'deferred', 'bounced', 'opened', 'clicked', 'replied'"


def upgrade() -> None:
    op.create_table(
        "messages",
        sa.Column("id", BigID, nullable=False),
        sa.Column("message_id", sa.String(), nullable=False),
        sa.Column("thread_id", sa.String(), nullable=True),
        sa.Column("direction", sa.String(16), nullable=False),
        sa.Column("account", sa.String(), nullable=True),
        sa.Column("user", sa.String(), nullable=True),
        sa.Column("from_addr", sa.String(), nullable=False),
        sa.Column("to_addrs", sa.JSON(), nullable=False),
        sa.Column("cc_addrs", sa.JSON(), nullable=False),
        sa.Column("subject", sa.String(), nullable=False),
        sa.Column("date", UTCDateTime(), nullable=True),
        sa.Column("snippet", sa.String(200), nullable=False),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("sources", sa.JSON(), nullable=False),
        sa.Column("queue_id", sa.String(), nullable=True),
        sa.Column("created_at", UTCDateTime(), server_default=sa.func.now(), nullable=False),
        sa.CheckConstraint("direction IN ('inbound', 'outbound')", name=op.f("ck_messages_direction")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_messages")),
        sa.UniqueConstraint("queue_id", name=op.f("uq_messages_queue_id")),
        sqlite_autoincrement=True,
    )
    op.create_index(op.f("ix_messages_message_id"), "messages", ["message_id"])
    op.create_index(op.f("ix_messages_thread_id"), "messages", ["thread_id"])
    op.create_index(op.f("ix_messages_sort_at"), "messages",
                    [sa.text("coalesce(date, created_at)")])

    op.create_table(
        "events",
        sa.Column("id", BigID, nullable=False),
        sa.Column("message_pk", BigID, nullable=False),
        sa.Column("type", sa.String(16), nullable=False),
        sa.Column("at", UTCDateTime(), nullable=False),
        sa.Column("recipient", sa.String(), nullable=False),
        sa.Column("machine", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.Column("details", sa.JSON(), nullable=False),
        sa.CheckConstraint(f"type IN ({EVENT_TYPES})", name=op.f("ck_events_type")),
        sa.ForeignKeyConstraint(["message_pk"], ["messages.id"], ondelete="CASCADE",
                                name=op.f("fk_events_message_pk_messages")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_events")),
    )
    op.create_index(op.f("ix_events_message_pk"), "events", ["message_pk"])

    op.create_table(
        "message_addresses",
        sa.Column("message_pk", BigID, nullable=False),
        sa.Column("role", sa.String(8), nullable=False),
        sa.Column("address", sa.String(), nullable=False),
        sa.CheckConstraint("role IN ('from', 'to', 'cc')", name=op.f("ck_message_addresses_role")),
        sa.ForeignKeyConstraint(["message_pk"], ["messages.id"], ondelete="CASCADE",
                                name=op.f("fk_message_addresses_message_pk_messages")),
        sa.PrimaryKeyConstraint("message_pk", "role", "address", name=op.f("pk_message_addresses")),
    )
    op.create_index(op.f("ix_message_addresses_address"), "message_addresses",
                    ["address", "message_pk"])


def downgrade() -> None:
    op.drop_table("message_addresses")
    op.drop_table("events")
    op.drop_table("messages")
