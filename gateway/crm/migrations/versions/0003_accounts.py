"""Accounts created at run time: their definition and credential on ``accounts``; connect links.

``accounts`` gains ``origin`` (config | runtime), ``definition`` (JSON settings of a
runtime account), ``credential_ciphertext`` (its password or refresh token, encrypted),
``connected_email`` / ``connected_at`` (what the OAuth provider vouched for) and
``version`` (bumped on every change, so nodes notice). Existing rows are accounts
declared in gateway.yaml: ``origin = 'config'``. ``connect_links`` holds the signed,
single-use links reps open to connect their mailbox.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision: str | None = "0002"
branch_labels: str | None = None
depends_on: str | None = None


def UTCDateTime() -> sa.DateTime:
    # frozen copy of the DDL of gateway.crm.models.UTCDateTime (see 0002)
    return sa.DateTime(timezone=True)


def upgrade() -> None:
    with op.batch_alter_table("accounts") as batch:
        batch.add_column(sa.Column("origin", sa.String(8), server_default="config", nullable=False))
        batch.add_column(sa.Column("definition", sa.Text(), nullable=True))
        batch.add_column(sa.Column("credential_ciphertext", sa.LargeBinary(), nullable=True))
        batch.add_column(sa.Column("connected_email", sa.String(), nullable=True))
        batch.add_column(sa.Column("connected_at", UTCDateTime(), nullable=True))
        batch.add_column(sa.Column("version", sa.Integer(), server_default="0", nullable=False))
    op.create_table(
        "connect_links",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("provider", sa.String(), nullable=False),
        sa.Column("email", sa.String(), nullable=True),
        sa.Column("login", sa.String(), nullable=True),
        sa.Column("account_id", sa.String(), nullable=True),
        sa.Column("settings", sa.Text(), nullable=True),
        sa.Column("created_by", sa.String(), nullable=True),
        sa.Column("created_at", UTCDateTime(), server_default=sa.func.now(), nullable=False),
        sa.Column("expires_at", UTCDateTime(), nullable=False),
        sa.Column("flow_ciphertext", sa.LargeBinary(), nullable=True),
        sa.Column("opened_at", UTCDateTime(), nullable=True),
        sa.Column("used_at", UTCDateTime(), nullable=True),
        sa.Column("result", sa.String(32), nullable=True),
        sa.Column("result_detail", sa.String(), nullable=True),
        sa.Column("result_account", sa.String(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_connect_links")),
    )
    op.create_index("ix_connect_links_expires_at", "connect_links", ["expires_at"])


def downgrade() -> None:
    op.drop_index("ix_connect_links_expires_at", table_name="connect_links")
    op.drop_table("connect_links")
    # SQLite runs migrations without foreign keys: remove what hangs off the rows explicitly
    for table in ("sync_state", "sync_runs"):
        op.execute(f"DELETE FROM {table} WHERE account IN "
                   "(SELECT id FROM accounts WHERE origin = 'runtime')")
    op.execute("DELETE FROM accounts WHERE origin = 'runtime'")
    with op.batch_alter_table("accounts") as batch:
        for column in ("version", "connected_at", "connected_email", "credential_ciphertext",
                       "definition", "origin"):
            batch.drop_column(column)
