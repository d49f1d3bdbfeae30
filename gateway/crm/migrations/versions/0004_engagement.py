"""Engagement truth: control headers, later delivery reports, the suppression list.

``messages`` gains ``campaign`` (the ``X-Mailgw-Campaign`` control header, indexed for
``report --by campaign``) and ``scheduled_at`` (``X-Mailgw-Send-At``: when the copy is
due). ``events.type`` admits ``delayed`` (a delay report), ``auto_replied`` (an
out-of-office or other auto-responder), ``read_receipt`` (RFC 8098) and ``complained``
(an RFC 5965 feedback report). ``suppressions`` holds addresses mail must not reach
again (hard bounces, complaints, added by hand).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision: str | None = "0003"
branch_labels: str | None = None
depends_on: str | None = None

# frozen copies: the event types before and after this revision
OLD_TYPES = ("queued", "sent", "deferred", "bounced", "opened", "clicked", "replied")
NEW_TYPES = ("queued", "sent", "deferred", "delayed", "bounced", "opened", "clicked",
             "replied", "auto_replied", "read_receipt", "complained")
REASONS = ("bounced", "complained", "manual")


def UTCDateTime() -> sa.DateTime:
    # frozen copy of the DDL of gateway.crm.models.UTCDateTime (see 0002)
    return sa.DateTime(timezone=True)


def BigID() -> sa.types.TypeEngine[int]:
    # frozen copy of gateway.crm.models.BigID
    return sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


def upgrade() -> None:
    with op.batch_alter_table("messages") as batch:
        batch.add_column(sa.Column("campaign", sa.String(), nullable=True))
        batch.add_column(sa.Column("scheduled_at", UTCDateTime(), nullable=True))
        batch.create_index("ix_messages_campaign", ["campaign"])
    with op.batch_alter_table("events") as batch:
        batch.drop_constraint(op.f("ck_events_type"), type_="check")
        batch.create_check_constraint(op.f("ck_events_type"), _in("type", NEW_TYPES))
    op.create_table(
        "suppressions",
        sa.Column("address", sa.String(), nullable=False),
        sa.Column("reason", sa.String(16), nullable=False),
        sa.Column("detail", sa.String(), server_default="", nullable=False),
        sa.Column("message_pk", BigID(), nullable=True),
        sa.Column("created_by", sa.String(), nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.CheckConstraint(_in("reason", REASONS), name=op.f("ck_suppressions_reason")),
        sa.ForeignKeyConstraint(["message_pk"], ["messages.id"], ondelete="SET NULL",
                                name=op.f("fk_suppressions_message_pk_messages")),
        sa.PrimaryKeyConstraint("address", name=op.f("pk_suppressions")),
    )


def downgrade() -> None:
    op.drop_table("suppressions")
    op.execute(f"DELETE FROM events WHERE NOT ({_in('type', OLD_TYPES)})")
    with op.batch_alter_table("events") as batch:
        batch.drop_constraint(op.f("ck_events_type"), type_="check")
        batch.create_check_constraint(op.f("ck_events_type"), _in("type", OLD_TYPES))
    with op.batch_alter_table("messages") as batch:
        batch.drop_index("ix_messages_campaign")
        batch.drop_column("scheduled_at")
        batch.drop_column("campaign")
