"""Nova's own tables: instances and migrations (Alembic branch ``nova``, nova_app/migrations).

An operation (the engine's ``operations`` table) refers to them through its params:
``instance_id`` and, for moves, ``migration_id``; the subject of an exclusive operation is the
instance's id.
"""

from __future__ import annotations

import time
import uuid

from sqlalchemy import Boolean, Float, ForeignKey, Integer, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def new_id() -> str:
    return str(uuid.uuid4())


class Base(DeclarativeBase):
    pass


class Instance(Base):
    __tablename__ = "instances"
    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(255), unique=True)
    host: Mapped[str] = mapped_column(String(255))
    flavor: Mapped[str] = mapped_column(String(64))
    #: Nova's vm_state: building, active, resized, error.
    vm_state: Mapped[str] = mapped_column(String(32))
    #: Nova's task_state (None when idle): resize_prep, resize_migrating, resize_finish, ...
    task_state: Mapped[str | None] = mapped_column(String(32), nullable=True)
    created_at: Mapped[float] = mapped_column(Float, default=time.time)
    updated_at: Mapped[float] = mapped_column(Float, default=time.time, onupdate=time.time)


class Migration(Base):
    __tablename__ = "migrations"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    instance_id: Mapped[str] = mapped_column(ForeignKey("instances.id"))
    source: Mapped[str] = mapped_column(String(255))
    dest: Mapped[str] = mapped_column(String(255))
    old_flavor: Mapped[str] = mapped_column(String(64))
    new_flavor: Mapped[str] = mapped_column(String(64))
    #: resize, migration (cold), live-migration; cross-cell resizes have ``cross_cell``.
    migration_type: Mapped[str] = mapped_column(String(32), default="resize")
    cross_cell: Mapped[bool] = mapped_column(Boolean, default=False)
    #: Resize: pre-migrating, migrating, post-migrating, finished, confirmed, reverting,
    #: reverted, error. Live migration: queued, preparing, running, completed, error, cancelled.
    status: Mapped[str] = mapped_column(String(32))
    #: Set by live_migration_force_complete / live_migration_abort; polled by live_migration.
    force_complete: Mapped[bool] = mapped_column(Boolean, default=False)
    abort_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[float] = mapped_column(Float, default=time.time)
    updated_at: Mapped[float] = mapped_column(Float, default=time.time, onupdate=time.time)
