"""Database access: one SQLAlchemy engine per process and URL, and a :class:`Database` per
application (its URL and the schema migrations it needs).

Prefork workers fork after import, and a connection must never cross a fork, so engines are
keyed by PID. On SQLite every writing transaction starts with ``BEGIN IMMEDIATE``: several
processes write the same file, and a deferred transaction that reads then writes fails at once
with "database is locked" instead of waiting for ``busy_timeout``. Read-only sessions
(``read()``) use a second engine without it, so in WAL mode they never queue behind writers.

Nothing connects at import or construction: the first session opens the engine and checks the
schema (:func:`orchestrator.ledger.schema.ensure`), once per process, URL and set of migrations.

A database that does not answer is raised as :class:`~orchestrator.errors.LedgerUnavailable`,
one line naming it (password redacted), from every session: callers wait and try again
(workers) or say so and stop (the command line), and never take it for an answer. On
PostgreSQL, libpq's connect timeout, TCP keepalives and ``tcp_user_timeout`` bound how long a
connection across a partition stays silent before it fails (a TCP connection over a downed
link is not reset: without them a query would hang for the kernel's 15 minutes of
retransmissions).

A ledger that fails over (a primary and standbys: Patroni, RDS Multi-AZ, CloudNativePG) is
one URL naming every server, libpq's multi-host form, with ``target_session_attrs=read-write``
(``postgresql+psycopg://user@/ledger?host=a:5432&host=b:5432&target_session_attrs=read-write``,
docs/FAILOVER.md): each new connection tries the hosts in turn and keeps the one that takes
writes. Every path reconnects after a failover: a pooled connection to the crashed primary
is dropped at checkout (:func:`~orchestrator.ledger.driver.closed_by_server`) or fails as
unreachable, and one whose server takes no write (SQLSTATE 25006: a standby, a demoted
primary) is dropped and the ledger called unreachable meanwhile, never the operation failed.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, make_url
from sqlalchemy.exc import (
    ArgumentError,
    DBAPIError,
    DisconnectionError,
    InterfaceError,
    NoSuchModuleError,
    OperationalError,
)
from sqlalchemy.orm import Session, sessionmaker

from orchestrator import config
from orchestrator.errors import ConfigError, LedgerUnavailable, SchemaError, first_line
from orchestrator.ledger import schema
from orchestrator.ledger.driver import Direct, Transaction, closed_by_server, not_the_primary
from orchestrator.ledger.health import LedgerHealth
from orchestrator.ledger.idle import IdleConnections
from orchestrator.redact import printable, redact_text, redact_url

#: libpq connection settings (seconds): a connect, and a query on a connection whose peer went
#: silent, fail within about this long.
PG_CONNECT_TIMEOUT = 5
PG_KEEPALIVE = {"keepalives": 1, "keepalives_idle": 5, "keepalives_interval": 2,
                "keepalives_count": 3, "tcp_user_timeout": 5_000}
#: SQLite errors that say "not now" rather than "wrong": another writer holds the file.
_SQLITE_TRANSIENT = ("locked", "busy", "unable to open", "disk i/o")
#: PostgreSQL SQLSTATE classes that say "not now, not this server" whatever the driver's
#: exception class: 08 connection exception, 53 insufficient resources (too many
#: connections), 57 operator intervention (shutting down, starting up, in recovery).
_PG_UNREACHABLE_CLASSES = ("08", "53", "57")

_engines: dict[tuple[int, str, bool], Engine] = {}
_autocommit: dict[tuple[int, str], Engine] = {}
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
        check_url(url)
        if sqlite:
            eng = _sqlite_engine(url, immediate=write)
        else:
            eng = create_engine(url, pool_size=2, max_overflow=4,
                                connect_args=_connect_args(url))
            event.listen(eng, "checkout", closed_by_server)
            event.listen(eng, "handle_error", _read_only_is_a_disconnect)
            _idle().watch(eng)
        _engines[key] = eng
        _makers[key] = sessionmaker(eng, expire_on_commit=False)
    return eng


def _read_only_is_a_disconnect(context) -> None:  # type: ignore[no-untyped-def]
    """A write refused because the server is read-only (a standby, a demoted primary) is
    the connection on the wrong server: SQLAlchemy's ``handle_error`` lets a listener call
    it a disconnect, and the pool then drops the connection and every one it made before
    (``invalidate_pool_on_disconnect``), so the next checkout connects anew and libpq's
    ``target_session_attrs`` picks the server that takes writes."""
    if not_the_primary(context.original_exception):
        context.is_disconnect = True


def _autocommit_engine(url: str) -> Engine:
    """The connections of :meth:`Database.direct` on PostgreSQL, in autocommit for good: a
    single statement is atomic by itself, and a transaction around it costs a BEGIN and a
    COMMIT (or the pool's reset ROLLBACK), two round trips more than the statement. A pool
    of its own: switching a pooled connection in and out of autocommit cost as much Python
    as the statement (psycopg's autocommit and isolation setters, the reset)."""
    key = (os.getpid(), url)
    eng = _autocommit.get(key)
    if eng is None:
        eng = _autocommit[key] = create_engine(
            url, isolation_level="AUTOCOMMIT", pool_reset_on_return=None, pool_size=2,
            max_overflow=4, connect_args=_connect_args(url))
        event.listen(eng, "checkout", closed_by_server)
        _idle().watch(eng)
    return eng


_direct: dict[tuple[int, str], Direct] = {}
_idle_closers: dict[int, IdleConnections] = {}


def _idle() -> IdleConnections:
    """This process's closer of idle connections (its thread started with the first
    PostgreSQL engine; a forked child makes its own)."""
    closer = _idle_closers.get(os.getpid())
    if closer is None:
        closer = _idle_closers[os.getpid()] = IdleConnections()
    return closer


def _direct_for(url: str) -> Direct:
    key = (os.getpid(), url)
    runner = _direct.get(key)
    if runner is None:
        eng = _engine(url, False) if url.startswith("sqlite") else _autocommit_engine(url)
        runner = _direct[key] = Direct(eng)
        if not url.startswith("sqlite"):
            _idle().watch_direct(runner)
    return runner


class _WriterLock:
    """One SQLite writer at a time on this machine, woken at once when the previous one ends.

    SQLite lets one writer in and makes the others poll: its busy handler sleeps 1, 2, 5, 10,
    up to 100 ms between tries, so a write that waits for one of a few milliseconds can sleep
    ten times longer (seen as submits of 11-18 ms while workers write). Writers that queue on
    an ``flock`` of ``<database>.writer`` beside the file instead are woken by the kernel the
    moment the previous writer unlocks. A thread lock orders this process's own threads (an
    ``flock`` is held by an open file, shared by its threads); after a fork the child opens
    its own file. SQLite's locking still guards the file: this only spares the sleeps.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        #: Re-entrant: a session opened inside another of the same thread waits on SQLite's
        #: own lock (and says so after busy_timeout) rather than hang here.
        self.thread_lock = threading.RLock()
        self.depth = 0
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)

    @contextmanager
    def held(self) -> Iterator[None]:
        with self.thread_lock:
            if self.depth == 0:
                fcntl.flock(self.fd, fcntl.LOCK_EX)
            self.depth += 1
            try:
                yield
            finally:
                self.depth -= 1
                if self.depth == 0:
                    fcntl.flock(self.fd, fcntl.LOCK_UN)


_writer_locks: dict[tuple[int, str], _WriterLock] = {}


def _writer_lock_path(url: str) -> str | None:
    """``<file>.writer`` for a SQLite file URL; None for another database or memory."""
    if not url.startswith("sqlite"):
        return None
    database = make_url(url).database
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return database + ".writer"


@contextmanager
def _writer_turn(url: str) -> Iterator[None]:
    path = _writer_lock_path(url)
    if path is None:
        yield
        return
    key = (os.getpid(), path)
    lock = _writer_locks.get(key)
    if lock is None:
        lock = _writer_locks[key] = _WriterLock(path)
    with lock.held():
        yield


#: Where a ledger URL comes from, as an error's hint names it: the environment's setting, or
#: the application's own ``Orchestrator(db_url=...)``, which wins over it.
ENV_SETTING = "ORCHESTRATOR_DB_URL"
APP_SETTING = "the application's Orchestrator(db_url=...)"


def check_url(url: str, setting: str = ENV_SETTING) -> None:
    """A ledger URL SQLAlchemy can use, or a :class:`ConfigError` in one line naming it and
    ``setting``, where it came from."""
    try:
        parsed = make_url(url)
        parsed.get_dialect()
    except (ArgumentError, NoSuchModuleError, ValueError) as exc:
        raise ConfigError(f"ledger URL {redact_url(url)!r} ({setting}): "
                          f"{printable(redact_text(first_line(exc), url))}") from None


def _refuse_missing_file(url: str, setting: str = ENV_SETTING) -> None:
    """SQLite creates the file a connection names: a read of a file that is not there is
    told so, and leaves no empty file behind."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:") \
            and not Path(parsed.database).exists():
        raise SchemaError(f"database {redact_url(url)} holds no ledger: {parsed.database} does "
                          f"not exist (check {setting}, or start a worker first)")


def _connect_args(url: str) -> dict[str, object]:
    if url.startswith(("postgresql", "postgres")):
        args: dict[str, object] = {"connect_timeout": PG_CONNECT_TIMEOUT, **PG_KEEPALIVE}
        if config.db_pool_mode() == "transaction":
            # A statement psycopg prepared on one server connection is unknown on the next
            # the pooler hands out ("prepared statement _pg3_0 does not exist").
            args["prepare_threshold"] = None
        return args
    return {}


def unreachable(exc: BaseException) -> bool:
    """True for an error that says the database cannot be reached now (refused, cut, timed
    out, locked, shutting down or starting up, out of connections, a server that takes no
    write: a standby or a demoted primary during a failover), as opposed to one that says a
    statement is wrong."""
    if isinstance(exc, LedgerUnavailable | DisconnectionError):
        return True
    if not isinstance(exc, DBAPIError):
        return False
    if exc.connection_invalidated:
        return True
    if not_the_primary(exc.orig) or str(getattr(exc.orig, "sqlstate", None) or "").startswith(
            _PG_UNREACHABLE_CLASSES):
        return True
    if not isinstance(exc, OperationalError | InterfaceError):
        return False
    if isinstance(exc.orig, sqlite3.Error):
        return any(word in str(exc.orig).lower() for word in _SQLITE_TRANSIENT)
    return True


def unavailable_error(url: str, exc: BaseException) -> LedgerUnavailable:
    """One line: which database, and the driver's first line of why (no password)."""
    orig = getattr(exc, "orig", None) or exc
    return LedgerUnavailable(f"cannot reach the ledger at {redact_url(url)}: "
                             f"{printable(redact_text(first_line(orig), url))}")


def _maker(url: str, write: bool) -> sessionmaker:
    _engine(url, write)
    return _makers[(os.getpid(), url, write or not url.startswith("sqlite"))]


class Database:
    """The ledger's database: ``url`` (None: ``ORCHESTRATOR_DB_URL``, read at each use) and
    the migration folders of the application's own tables."""

    def __init__(self, url: str | None = None, migrations: Sequence[Path] = ()) -> None:
        self._url = url
        #: What an error about the URL tells to check (:data:`ENV_SETTING`, :data:`APP_SETTING`).
        self.url_setting = ENV_SETTING if url is None else APP_SETTING
        self.migrations = tuple(Path(p) for p in migrations)
        #: Whether the database answered this process's last attempts (orchestrator.ledger.health).
        self.health = LedgerHealth()
        #: Whether a read may bring an empty database to the schema, as any first use does
        #: in a program of the application's. The command line and Flower set False: what
        #: only looks never creates or changes a table (nor an SQLite file) in a database it
        #: was pointed at, maybe by mistake.
        self.reads_create = True

    @contextmanager
    def _reachable(self, url: str) -> Iterator[None]:
        """Turn "the database does not answer" into LedgerUnavailable, and tell the health."""
        try:
            yield
        except LedgerUnavailable:  # said by the session it came from
            raise
        except (DBAPIError, DisconnectionError) as exc:
            if not unreachable(exc):
                raise
            error = unavailable_error(url, exc)
            self.health.note_failure(error)
            raise error from exc
        self.health.note_success()

    @property
    def url(self) -> str:
        return self._url or config.db_url()

    def engine(self, *, write: bool = True, create: bool = True) -> Engine:
        """The engine, the schema checked first (once per process): brought to this code's
        unless ``create`` is False (what only reads never creates or changes a table)."""
        url = self.url
        key = (os.getpid(), url, tuple(str(p) for p in self.migrations))
        if key not in _ready:
            check_url(url, self.url_setting)
            if not create:
                _refuse_missing_file(url, self.url_setting)
            with self._reachable(url):
                try:
                    schema.ensure(_engine(url, True), self.migrations, create=create,
                                  setting=self.url_setting)
                except DBAPIError as exc:
                    if unreachable(exc):
                        raise
                    orig = getattr(exc, "orig", None) or exc
                    raise SchemaError(
                        f"database {redact_url(url)} cannot be the ledger: "
                        f"{printable(redact_text(first_line(orig), url))}") from None
            _ready.add(key)
        return _engine(url, write)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A writing transaction: committed on success, rolled back on error."""
        url = self.url
        with self._reachable(url):
            self.engine()
            with _writer_turn(url), _maker(url, True).begin() as s:
                yield s

    def direct(self, statement: Any, /, **params: Any) -> list[tuple]:
        """Run one statement that commits by itself, straight on the driver, and return its
        rows (converted by their types): what the step path runs at every step (its read, and
        on PostgreSQL its one-statement completion and submit) and what a worker runs on a
        clock (its heartbeat, the looks that nearly always find nothing).
        A fifth of a Core connection's cost (:class:`~orchestrator.ledger.driver.Direct`). On
        SQLite a write takes its turn among the machine's writers. The statement must not
        hold an expanding ``IN``. Unreachable as from every session."""
        url = self.url
        writes = getattr(statement, "is_dml", False)
        with self._reachable(url):
            self.engine(create=writes or self.reads_create)
            if writes:
                with _writer_turn(url):
                    return _direct_for(url).run(statement, params)
            return _direct_for(url).run(statement, params)

    @contextmanager
    def direct_transaction(self) -> Iterator[Transaction]:
        """:meth:`direct`'s statements in one writing transaction, committed when the block
        ends (SQLite, which has no data-modifying CTE: a completion, a submit)."""
        url = self.url
        with self._reachable(url):
            self.engine()
            with _writer_turn(url), _direct_for(url).transaction() as run:
                yield run

    def on_session(self, s: Session) -> Transaction:
        """:meth:`direct`'s statements in ``s``'s transaction, on its connection (the
        caller's session commits them, with its own rows)."""
        return Transaction(_direct_for(self.url), s.connection().connection)

    @contextmanager
    def effect_transaction(self) -> Iterator[tuple[Session, Transaction]]:
        """A writing ORM session for an application's effect, and :meth:`direct`'s
        statements on the same connection, in one transaction committed when the block ends:
        a step's effect (the application's own rows) and the ledger's completion commit
        together or not at all, the ledger's part with no ORM."""
        url = self.url
        with self._reachable(url):
            self.engine()
            with _writer_turn(url), _maker(url, True).begin() as s:
                connection = s.connection()
                try:
                    yield s, Transaction(_direct_for(url), connection.connection)
                except DBAPIError as exc:
                    # The direct statements bypass the Connection that would have noticed
                    # a lost connection: told here, so that the pool drops it.
                    if unreachable(exc) and not connection.invalidated:
                        connection.invalidate()
                    raise

    @contextmanager
    def read(self) -> Iterator[Session]:
        """A read-only session (never takes SQLite's write lock; with ``reads_create`` False,
        a database with no ledger is a :class:`SchemaError`, nothing created)."""
        url = self.url
        with self._reachable(url):
            self.engine(create=self.reads_create)
            with _maker(url, False)() as s:
                yield s

    def ping(self) -> None:
        """One round trip to the database; LedgerUnavailable if it does not answer."""
        from sqlalchemy import text

        with self.read() as s:
            s.execute(text("SELECT 1"))

    def upgrade(self) -> dict[str, object]:
        """Every branch of the schema to its head (``orchestrator db upgrade``)."""
        check_url(self.url, self.url_setting)
        with self._reachable(self.url):
            result = schema.upgrade(_engine(self.url, True), self.migrations)
        _ready.add((os.getpid(), self.url, tuple(str(p) for p in self.migrations)))
        return result

    def status(self) -> dict[str, object]:
        check_url(self.url, self.url_setting)
        with self._reachable(self.url), _engine(self.url, True).connect() as conn:
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
