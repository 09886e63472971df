"""An operation's history: what happened to it off its normal path, and each step's queue.

The step log says where and when each step ran; these say what happened on the way (a step
handed back by a drain, held, resent, retried, waiting for an event, a rollback started) and
from which queue (``<host>`` or ``<host>-alt``) a step's delivery came. An operation keeps the
traceparent of its submit's span (``operations.trace``), for what happens to it off its normal
path to join its trace.

Revision ID: orch0006
Revises: orch0005
Create Date: 2026-12-06
"""

import sqlalchemy as sa
from alembic import op

revision = "orch0006"
down_revision = "orch0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "history",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("operation_id", sa.String(36), nullable=False),
        sa.Column("at", sa.Float(), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("position", sa.Integer(), nullable=True),
        sa.Column("step", sa.String(64), nullable=True),
        sa.Column("host", sa.String(255), nullable=True),
        sa.Column("worker", sa.String(255), nullable=True),
        sa.Column("queue", sa.String(255), nullable=True),
        sa.Column("detail", sa.Text(), nullable=True),
    )
    op.create_index("ix_history_operation", "history", ["operation_id", "at"])
    with op.batch_alter_table("step_log") as batch:
        batch.add_column(sa.Column("queue", sa.String(255), nullable=True))
    with op.batch_alter_table("operations") as batch:
        batch.add_column(sa.Column("trace", sa.String(64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("operations") as batch:
        batch.drop_column("trace")
    with op.batch_alter_table("step_log") as batch:
        batch.drop_column("queue")
    op.drop_index("ix_history_operation", table_name="history")
    op.drop_table("history")
