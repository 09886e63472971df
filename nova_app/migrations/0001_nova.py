"""Nova's tables: instances and migrations.

Revision ID: nova0001
Revises:
Create Date: 2026-11-29
"""

import sqlalchemy as sa
from alembic import op

revision = "nova0001"
down_revision = None
branch_labels = ("nova",)
depends_on = None


def upgrade() -> None:
    op.create_table(
        "instances",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("name", sa.String(255), nullable=False, unique=True),
        sa.Column("host", sa.String(255), nullable=False),
        sa.Column("flavor", sa.String(64), nullable=False),
        sa.Column("vm_state", sa.String(32), nullable=False),
        sa.Column("task_state", sa.String(32), nullable=True),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("updated_at", sa.Float(), nullable=False),
    )
    op.create_table(
        "migrations",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("instance_id", sa.String(36), sa.ForeignKey("instances.id"), nullable=False),
        sa.Column("source", sa.String(255), nullable=False),
        sa.Column("dest", sa.String(255), nullable=False),
        sa.Column("old_flavor", sa.String(64), nullable=False),
        sa.Column("new_flavor", sa.String(64), nullable=False),
        sa.Column("migration_type", sa.String(32), nullable=False),
        sa.Column("cross_cell", sa.Boolean(), nullable=False),
        sa.Column("status", sa.String(32), nullable=False),
        sa.Column("force_complete", sa.Boolean(), nullable=False),
        sa.Column("abort_requested", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("updated_at", sa.Float(), nullable=False),
    )
    op.create_index("ix_migrations_instance_id", "migrations", ["instance_id"])


def downgrade() -> None:
    op.drop_table("migrations")
    op.drop_table("instances")
