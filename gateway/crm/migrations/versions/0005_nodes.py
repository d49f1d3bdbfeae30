"""Nodes: every running daemon's heartbeat, so the mailboxes are spread over the live ones.

``nodes`` holds one row per node (``sync.node_id``, else host:pid:random), written every
``sync.check_interval`` and deleted on a clean stop; the IMAP tailers place the mailboxes
on the nodes heard from within ``sync.lease_ttl`` (``gateway.imap.placement``).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision: str | None = "0004"
branch_labels: str | None = None
depends_on: str | None = None


def UTCDateTime() -> sa.DateTime:
    # frozen copy of the DDL of gateway.crm.models.UTCDateTime (see 0002)
    return sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "nodes",
        sa.Column("id", sa.String(), nullable=False),
        sa.Column("hostname", sa.String(), server_default="", nullable=False),
        sa.Column("pid", sa.Integer(), server_default="0", nullable=False),
        sa.Column("started_at", UTCDateTime(), nullable=False),
        sa.Column("heartbeat_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_nodes")),
    )


def downgrade() -> None:
    op.drop_table("nodes")
