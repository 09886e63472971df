"""Leases: fleet-wide looks done by one worker for the whole fleet.

An idle host's worker used to look at the ledger every two seconds for its own stranded steps
and event waits. One worker, holding the ``fleet-looks`` lease, now looks for every host, and a
host's worker looks for itself only while it has work in flight.

Revision ID: orch0005
Revises: orch0004
Create Date: 2026-12-06
"""

import sqlalchemy as sa
from alembic import op

revision = "orch0005"
down_revision = "orch0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "leases",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("holder", sa.String(255), nullable=True),
        sa.Column("expires_at", sa.Float(), nullable=False),
        sa.Column("term", sa.Integer(), nullable=False),
        sa.Column("check_every", sa.Float(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("leases")
