"""Drains: one row per drain of a worker, for operators (metrics, the CLI).

Revision ID: orch0003
Revises: orch0002
Create Date: 2026-11-29
"""

import sqlalchemy as sa
from alembic import op

revision = "orch0003"
down_revision = "orch0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "drains",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("nodename", sa.String(255), nullable=False),
        sa.Column("host", sa.String(255), nullable=False),
        sa.Column("reason", sa.String(64), nullable=False),
        sa.Column("started_at", sa.Float(), nullable=False),
        sa.Column("deadline_at", sa.Float(), nullable=False),
        sa.Column("ended_at", sa.Float(), nullable=True),
        sa.Column("outcome", sa.String(32), nullable=True),
        sa.Column("handed_back", sa.Integer(), nullable=False),
        sa.Column("waiting", sa.JSON(), nullable=True),
    )
    op.create_index("ix_drains_host", "drains", ["host", "started_at"])


def downgrade() -> None:
    op.drop_table("drains")
