"""Messages and their per-recipient events.

Revision ID: 0001
Revises:
Create Date: 2026-11-22
"""

import sqlalchemy as sa
from alembic import op

from gateway.crm.models import UTCDateTime

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "messages",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("message_id", sa.String(998), nullable=False),
        sa.Column("thread_id", sa.String(998), nullable=True),
        sa.Column("direction", sa.String(16), nullable=False),
        sa.Column("account", sa.String(200), nullable=True),
        sa.Column("user", sa.String(320), nullable=True),
        sa.Column("from_addr", sa.String(320), nullable=False),
        sa.Column("to_addrs", sa.JSON(), nullable=False),
        sa.Column("cc_addrs", sa.JSON(), nullable=False),
        sa.Column("subject", sa.Text(), nullable=False),
        sa.Column("date", UTCDateTime(), nullable=True),
        sa.Column("snippet", sa.String(200), nullable=False),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("sources", sa.JSON(), nullable=False),
        sa.Column("queue_id", sa.String(64), nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_messages"),
        sa.UniqueConstraint("queue_id", name="uq_messages_queue_id"),
    )
    op.create_index("ix_messages_message_id", "messages", ["message_id"])
    op.create_index("ix_messages_account", "messages", ["account"])
    op.create_index("ix_messages_from_addr", "messages", ["from_addr"])
    op.create_index("ix_messages_created_at", "messages", ["created_at"])
    op.create_table(
        "events",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("message_pk", sa.Integer(), nullable=False),
        sa.Column("type", sa.String(16), nullable=False),
        sa.Column("at", UTCDateTime(), nullable=False),
        sa.Column("recipient", sa.String(320), nullable=False),
        sa.Column("machine", sa.Boolean(), nullable=False),
        sa.Column("details", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_events"),
        sa.ForeignKeyConstraint(["message_pk"], ["messages.id"],
                                name="fk_events_message_pk_messages", ondelete="CASCADE"),
    )
    op.create_index("ix_events_message_pk", "events", ["message_pk"])


def downgrade() -> None:
    op.drop_table("events")
    op.drop_table("messages")
