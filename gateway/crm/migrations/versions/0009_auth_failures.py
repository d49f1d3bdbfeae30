"""Failed SMTP AUTH attempts per client IP, so the lockout holds across workers and nodes.

``auth_failures`` holds one row per failed attempt (client IP, time as epoch seconds);
`listeners.submission.auth_failures` rows within `auth_failure_window` lock the IP out
on every worker process and node sharing the store (``gateway.crm.authlimit``).

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision: str | None = "0008"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.create_table(
        "auth_failures",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("ip", sa.String(), nullable=False),
        sa.Column("at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_auth_failures")),
    )
    op.create_index("ix_auth_failures_ip_at", "auth_failures", ["ip", "at"])


def downgrade() -> None:
    op.drop_index("ix_auth_failures_ip_at", table_name="auth_failures")
    op.drop_table("auth_failures")
