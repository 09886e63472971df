"""Per-host lookups: each operation's current host, and every host its plan still needs.

A worker looks only at its own host's operations (event waits every 0.2 s, stranded steps
every 2 s, a drain's check every 0.2 s): indexed queries on the host instead of a scan of
every operation in flight in the fleet.

Revision ID: orch0002
Revises: orch0001
Create Date: 2026-11-29
"""

import sqlalchemy as sa
from alembic import op

revision = "orch0002"
down_revision = "orch0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("operations", sa.Column("current_host", sa.String(255), nullable=True))
    op.create_index("ix_operations_current_host", "operations",
                    ["current_host", "status", "step_state"])
    op.create_table(
        "operation_hosts",
        sa.Column("operation_id", sa.String(36), primary_key=True),
        sa.Column("host", sa.String(255), primary_key=True),
        sa.Column("last_position", sa.Integer(), nullable=False),
    )
    op.create_index("ix_operation_hosts_host", "operation_hosts", ["host", "last_position"])
    # Operations in flight when the schema is upgraded get their rows now.
    conn = op.get_bind()
    operations = sa.table(
        "operations", sa.column("id", sa.String), sa.column("plan", sa.JSON),
        sa.column("position", sa.Integer), sa.column("status", sa.String),
        sa.column("current_host", sa.String),
    )
    hosts = sa.table(
        "operation_hosts", sa.column("operation_id", sa.String), sa.column("host", sa.String),
        sa.column("last_position", sa.Integer),
    )
    rows = conn.execute(sa.select(operations.c.id, operations.c.plan, operations.c.position)
                        .where(operations.c.status.in_(("queued", "running")))).all()
    for op_id, plan, position in rows:
        last: dict[str, int] = {}
        for index, (_, host) in enumerate(plan):
            last[host] = index
        current = plan[position][1] if position < len(plan) else None
        conn.execute(operations.update().where(operations.c.id == op_id)
                     .values(current_host=current))
        if last:
            conn.execute(hosts.insert(), [{"operation_id": op_id, "host": h, "last_position": p}
                                          for h, p in last.items()])


def downgrade() -> None:
    op.drop_table("operation_hosts")
    op.drop_index("ix_operations_current_host", "operations")
    op.drop_column("operations", "current_host")
