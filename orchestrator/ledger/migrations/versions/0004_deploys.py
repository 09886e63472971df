"""Deploys: what code each worker serves, and the rollback each operation was submitted with.

A deploy changes the code under operations in flight. ``services.steps`` and
``services.code_version`` record which step names a worker's code runs (the views say why a
step waits; the resend of a held step is left to a worker that serves it).
``operations.rollback`` keeps the flow's rollback as it was at submit time, so new code's flow
definition never changes an operation already started.

Revision ID: orch0004
Revises: orch0003
Create Date: 2026-11-30
"""

import sqlalchemy as sa
from alembic import op

revision = "orch0004"
down_revision = "orch0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("services", sa.Column("steps", sa.JSON(), nullable=True))
    op.add_column("services", sa.Column("code_version", sa.String(64), nullable=True))
    op.add_column("operations", sa.Column("rollback", sa.JSON(), nullable=True))


def downgrade() -> None:
    op.drop_column("operations", "rollback")
    op.drop_column("services", "code_version")
    op.drop_column("services", "steps")
