"""One SQLAlchemy engine per process, shared by the API, the CLI and every worker.

Prefork workers fork after import, and a connection must never cross a fork, so the engine is
keyed by PID. On SQLite every writing transaction starts with ``BEGIN IMMEDIATE``: several
processes write the same file, and a deferred transaction that reads then writes fails at once
with "database is locked" instead of waiting for ``busy_timeout``. Read-only sessions
(``read()``) use a second engine without it, so in WAL mode they never queue behind writers.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError
from sqlalchemy.orm import Session, sessionmaker

from orchestrator.config import Settings
from orchestrator.models import Base

_engines: dict[tuple[int, str, bool], Engine] = {}


def _sqlite_engine(url: str, immediate: bool) -> Engine:
    engine = create_engine(url, connect_args={"timeout": 30, "isolation_level": None})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record) -> None:  # type: ignore[no-untyped-def]
        dbapi_conn.execute("PRAGMA journal_mode=WAL")
        dbapi_conn.execute("PRAGMA busy_timeout=30000")
        dbapi_conn.execute("PRAGMA synchronous=NORMAL")

    if immediate:

        @event.listens_for(engine, "begin")
        def _on_begin(conn) -> None:  # type: ignore[no-untyped-def]
            conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def engine(url: str | None = None, *, write: bool = True) -> Engine:
    url = url or Settings.from_env().db_url
    sqlite = url.startswith("sqlite")
    key = (os.getpid(), url, write or not sqlite)
    if key not in _engines:
        if not write and sqlite:
            engine(url, write=True)  # creates the tables
            _engines[key] = _sqlite_engine(url, immediate=False)
            return _engines[key]
        eng = (
            _sqlite_engine(url, immediate=True)
            if sqlite
            else create_engine(url, pool_pre_ping=True, pool_size=2, max_overflow=4)
        )
        _create_tables(eng)
        _engines[key] = eng
    return _engines[key]


def _create_tables(eng: Engine) -> None:
    """Create missing tables; several workers starting at once may race to do it."""
    try:
        Base.metadata.create_all(eng)
    except (OperationalError, ProgrammingError, IntegrityError):
        Base.metadata.create_all(eng)  # the other process won: now everything exists


@contextmanager
def session(url: str | None = None) -> Iterator[Session]:
    """A writing transaction: committed on success, rolled back on error."""
    factory = sessionmaker(engine(url), expire_on_commit=False)
    with factory.begin() as s:
        yield s


@contextmanager
def read(url: str | None = None) -> Iterator[Session]:
    """A read-only session (never takes SQLite's write lock)."""
    factory = sessionmaker(engine(url, write=False), expire_on_commit=False)
    with factory() as s:
        yield s


def reset_schema(url: str) -> None:
    """Drop and recreate every table (tests on a shared PostgreSQL database)."""
    eng = engine(url)
    Base.metadata.drop_all(eng)
    Base.metadata.create_all(eng)
