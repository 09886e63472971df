"""Database access: one SQLAlchemy engine per process and URL, and a :class:`Database` per
application (its URL and the schema migrations it needs).

Prefork workers fork after import, and a connection must never cross a fork, so engines are
keyed by PID. On SQLite every writing transaction starts with ``BEGIN IMMEDIATE``: several
processes write the same file, and a deferred transaction that reads then writes fails at once
with "database is locked" instead of waiting for ``busy_timeout``. Read-only sessions
(``read()``) use a second engine without it, so in WAL mode they never queue behind writers.

Nothing connects at import or construction: the first session opens the engine and checks the
schema (:func:`orchestrator.schema.ensure`), once per process, URL and set of migrations.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

from orchestrator import config, schema

_engines: dict[tuple[int, str, bool], Engine] = {}
_makers: dict[tuple[int, str, bool], sessionmaker] = {}
_ready: set[tuple[int, str, tuple[str, ...]]] = set()


def _sqlite_engine(url: str, immediate: bool) -> Engine:
    engine = create_engine(url, connect_args={"timeout": 30, "isolation_level": None})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record) -> None:  # type: ignore[no-untyped-def]
        dbapi_conn.execute("PRAGMA busy_timeout=30000")
        _wal(dbapi_conn)
        dbapi_conn.execute("PRAGMA synchronous=NORMAL")

    if immediate:

        @event.listens_for(engine, "begin")
        def _on_begin(conn) -> None:  # type: ignore[no-untyped-def]
            conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def _wal(dbapi_conn) -> None:  # type: ignore[no-untyped-def]
    """Switch a new file to WAL. SQLite answers "locked" at once, without waiting for
    busy_timeout, when another process holds the file (workers of a fleet starting together,
    one of them creating the schema): retry for as long as busy_timeout would wait."""
    deadline = time.monotonic() + 30
    while True:
        try:
            if dbapi_conn.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                dbapi_conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _engine(url: str, write: bool) -> Engine:
    sqlite = url.startswith("sqlite")
    key = (os.getpid(), url, write or not sqlite)
    eng = _engines.get(key)
    if eng is None:
        if sqlite:
            eng = _sqlite_engine(url, immediate=write)
        else:
            eng = create_engine(url, pool_pre_ping=True, pool_size=2, max_overflow=4)
        _engines[key] = eng
        _makers[key] = sessionmaker(eng, expire_on_commit=False)
    return eng


def _maker(url: str, write: bool) -> sessionmaker:
    _engine(url, write)
    return _makers[(os.getpid(), url, write or not url.startswith("sqlite"))]


class Database:
    """The ledger's database: ``url`` (None: ``ORCHESTRATOR_DB_URL``, read at each use) and
    the migration folders of the application's own tables."""

    def __init__(self, url: str | None = None, migrations: Sequence[Path] = ()) -> None:
        self._url = url
        self.migrations = tuple(Path(p) for p in migrations)

    @property
    def url(self) -> str:
        return self._url or config.db_url()

    def engine(self, *, write: bool = True) -> Engine:
        url = self.url
        key = (os.getpid(), url, tuple(str(p) for p in self.migrations))
        if key not in _ready:
            schema.ensure(_engine(url, True), self.migrations)
            _ready.add(key)
        return _engine(url, write)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A writing transaction: committed on success, rolled back on error."""
        self.engine()
        with _maker(self.url, True).begin() as s:
            yield s

    @contextmanager
    def read(self) -> Iterator[Session]:
        """A read-only session (never takes SQLite's write lock)."""
        self.engine()
        with _maker(self.url, False)() as s:
            yield s

    def upgrade(self) -> dict[str, object]:
        """Every branch of the schema to its head (``orchestrator db upgrade``)."""
        result = schema.upgrade(_engine(self.url, True), self.migrations)
        _ready.add((os.getpid(), self.url, tuple(str(p) for p in self.migrations)))
        return result

    def status(self) -> dict[str, object]:
        with _engine(self.url, True).connect() as conn:
            return schema.status(conn, self.migrations)


#: The engine's tables only, at ``ORCHESTRATOR_DB_URL``: for scripts and tests that look at
#: the ledger without an application.
default = Database()


def session() -> Iterator[Session]:
    return default.session()  # type: ignore[return-value]


def read() -> Iterator[Session]:
    return default.read()  # type: ignore[return-value]


def reset(url: str, migrations: Sequence[Path] = ()) -> None:
    """Drop every table and build the schema again through the migrations (tests)."""
    eng = _engine(url, True)
    schema.drop_everything(eng)
    for key in [k for k in _ready if k[1] == url]:
        _ready.discard(key)
    Database(url, migrations).engine()
