"""Shared mailboxes routed to their owners; the daily figures per account.

``contacts`` and ``companies`` gain ``owner`` (a user login). ``messages`` gains
``assigned_to`` (indexed: ``messages list --assigned-to``) and ``assigned_rule`` (which
rule chose it). ``contact_assignments`` keeps the rep a shared mailbox's round robin gave
each contact (sticky), ``assignment_cursors`` each shared mailbox's round-robin position,
so both survive restarts and are shared by every node. ``message_sources.at`` is indexed
for the daily figures (what the sync stored today).

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision: str | None = "0007"
branch_labels: str | None = None
depends_on: str | None = None


def UTCDateTime() -> sa.DateTime:
    # frozen copy of the DDL of gateway.crm.models.UTCDateTime (see 0002)
    return sa.DateTime(timezone=True)


def BigID() -> sa.types.TypeEngine[int]:
    # frozen copy of gateway.crm.models.BigID
    return sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    with op.batch_alter_table("contacts") as batch:
        batch.add_column(sa.Column("owner", sa.String(), nullable=True))
    with op.batch_alter_table("companies") as batch:
        batch.add_column(sa.Column("owner", sa.String(), nullable=True))
    # never a rebuild of messages (copy, drop, rename): it would drop the search triggers
    # of 0007; SQLite adds and drops these columns in place
    with op.batch_alter_table("messages", recreate="never") as batch:
        batch.add_column(sa.Column("assigned_to", sa.String(), nullable=True))
        batch.add_column(sa.Column("assigned_rule", sa.String(16), nullable=True))
        batch.create_index("ix_messages_assigned_to", ["assigned_to"])
    op.create_index("ix_message_sources_at", "message_sources", ["at"])
    op.create_table(
        "contact_assignments",
        sa.Column("account", sa.String(), nullable=False),
        sa.Column("contact_pk", BigID(), nullable=False),
        sa.Column("user", sa.String(), nullable=False),
        sa.Column("at", UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(["contact_pk"], ["contacts.id"], ondelete="CASCADE",
                                name=op.f("fk_contact_assignments_contact_pk_contacts")),
        sa.PrimaryKeyConstraint("account", "contact_pk", name=op.f("pk_contact_assignments")),
    )
    op.create_table(
        "assignment_cursors",
        sa.Column("account", sa.String(), nullable=False),
        sa.Column("position", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("account", name=op.f("pk_assignment_cursors")),
    )


def downgrade() -> None:
    op.drop_table("assignment_cursors")
    op.drop_table("contact_assignments")
    op.drop_index("ix_message_sources_at", table_name="message_sources")
    with op.batch_alter_table("messages", recreate="never") as batch:
        batch.drop_index("ix_messages_assigned_to")
        batch.drop_column("assigned_rule")
        batch.drop_column("assigned_to")
    with op.batch_alter_table("companies") as batch:
        batch.drop_column("owner")
    with op.batch_alter_table("contacts") as batch:
        batch.drop_column("owner")
