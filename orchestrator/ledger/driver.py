"""Statements straight on the database driver, for the ledger's hot path and a worker's periodic
looks (:meth:`orchestrator.ledger.engines.Database.direct`): each compiled once with its types'
conversions (:class:`Form`), run on a pooled DBAPI connection (:class:`Direct`), one at a time or in
a transaction (:class:`Transaction`); and the pool's check for a connection the server closed
(:func:`closed_by_server`), which a connection kept out of the pool needs too. Which engine and pool
a statement runs on is :mod:`orchestrator.ledger.engines`'s to say.

A connection is also dropped when its server will not take a write (:func:`not_the_primary`):
after a failover, a server that was demoted, or a standby a URL without
``target_session_attrs=read-write`` reached, answers every write with SQLSTATE 25006; the next
connection asks libpq's host list again, which finds the primary."""

from __future__ import annotations

import contextlib
import select
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError, DisconnectionError, InvalidRequestError


def closed_by_server(dbapi_conn, _record, _proxy) -> None:  # type: ignore[no-untyped-def]
    """A pooled connection that the server has closed (restarted, or ended the backend) is
    dropped at checkout, and the pool connects anew: SQLAlchemy retries a checkout whose
    listener raises DisconnectionError. An idle connection has nothing to read, so a socket
    that is readable holds the server's goodbye or end of file. This costs a poll() where
    ``pool_pre_ping`` costs a round trip per checkout (two per step). A connection across a
    partition is not readable: a statement on it fails after ``tcp_user_timeout`` (and a
    ping would have hung as long)."""
    poller = select.poll()  # not select.select: it cannot take a descriptor above 1023
    poller.register(dbapi_conn.fileno(), select.POLLIN)
    if poller.poll(0):
        raise DisconnectionError("the server closed this pooled connection")


#: SQLSTATE 25006 (read_only_sql_transaction): "cannot execute INSERT in a read-only
#: transaction", what a standby in recovery, or a primary fenced read-only before its demotion,
#: answers a write.
READ_ONLY_SQLSTATE = "25006"


def not_the_primary(orig: BaseException) -> bool:
    """Whether the driver's error says this connection's server takes no write: the
    connection is on the wrong server, and no statement is wrong. psycopg raises it as an
    InternalError, which no pool takes for a disconnect."""
    return getattr(orig, "sqlstate", None) == READ_ONLY_SQLSTATE


@dataclass(frozen=True)
class Form:
    """A statement compiled once for a dialect, with its types' conversions: what
    SQLAlchemy's execution context works out at every execution."""

    sql: str
    #: The bound parameters' order, for a positional paramstyle (SQLite's ``?``).
    order: tuple[str, ...] | None
    compiled: Any
    binds: dict[str, Callable[[Any], Any]]
    #: One conversion per result column (None: the driver's value as it is).
    results: tuple[Callable[[Any], Any] | None, ...]

    @classmethod
    def of(cls, statement: Any, dialect: Any) -> Form:
        compiled = statement.compile(dialect=dialect)
        binds = {name: proc for bind, name in compiled.bind_names.items()
                 if (proc := bind.type.dialect_impl(dialect).bind_processor(dialect))}
        columns = getattr(statement, "exported_columns", ())
        results = tuple(_result_processor(c.type, dialect) for c in columns)
        order = tuple(compiled.positiontup) if compiled.positiontup is not None else None
        return cls(compiled.string, order, compiled, binds, results)

    def arguments(self, params: dict[str, Any]) -> Any:
        values = self.compiled.construct_params(params)
        for name, proc in self.binds.items():
            values[name] = proc(values[name])
        return tuple(values[name] for name in self.order) if self.order is not None \
            else values

    def rows(self, fetched: list) -> list[tuple]:
        if not any(self.results):
            return fetched
        return [tuple(value if proc is None else proc(value)
                      for proc, value in zip(self.results, row, strict=True))
                for row in fetched]


def _result_processor(type_: Any, dialect: Any) -> Callable[[Any], Any] | None:
    """A column type's conversion of what the driver returns. SQLAlchemy asks it with the
    driver's type code of the column, which a statement compiled once does not have: psycopg's
    Float wants one and has nothing to convert (PostgreSQL's double precision comes back as a
    float)."""
    try:
        return type_.dialect_impl(dialect).result_processor(dialect, None)
    except (TypeError, InvalidRequestError):
        return None


class Direct:
    """Runs :meth:`orchestrator.ledger.engines.Database.direct`'s statements straight on a pooled
    DBAPI connection, each compiled once (:class:`Form`). In a worker whose caches have gone cold
    between two runs, SQLAlchemy's Connection, transaction, execution context and result (about 250
    Python calls) cost four to five times the statement: on SQLite 0.65 against 0.15 ms for an idle
    worker's look that finds nothing, 0.75 against 0.18 ms for a heartbeat. The pool is the reading
    engine's (SQLite without BEGIN, PostgreSQL in autocommit): each statement commits by itself. The
    process's main thread, which runs the step path in a pool process and the periodic looks in a
    worker, keeps its connection while it uses it (a checkout and its return cost 0.04 ms a
    statement on PostgreSQL, 0.1 ms a step; it goes back to the pool after 5 s unused:
    :mod:`orchestrator.ledger.idle`); other threads (a web server's come and go) take one from
    the pool for each statement."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.forms: dict[object, Form] = {}
        self.kept: Any = None  # the main thread's connection, checked out while it is used
        #: Held while the main thread uses ``kept``: an idle closer (ledger/idle.py) takes it
        #: only when free, and never closes a connection in use.
        self.keeping = threading.RLock()
        self.last_used = 0.0
        dbapi = engine.dialect.loaded_dbapi
        self.error, self.lost = dbapi.Error, (dbapi.OperationalError, dbapi.InterfaceError)

    def run(self, statement: Any, params: dict[str, Any]) -> list[tuple]:
        """One statement that commits by itself; its rows."""
        with self._checkout() as connection:
            return self.execute(connection, statement, [params])

    @contextmanager
    def transaction(self) -> Iterator[Transaction]:
        """Statements in one transaction (SQLite: ``BEGIN IMMEDIATE``, the machine's writers
        taking turns being the caller's): committed when the block ends, rolled back if it
        raises."""
        begin = "BEGIN IMMEDIATE" if self.engine.dialect.name == "sqlite" else "BEGIN"
        with self._checkout() as connection:
            self._plain(connection, begin)
            try:
                yield Transaction(self, connection)
            except BaseException:
                with contextlib.suppress(self.error, DBAPIError):
                    self._plain(connection, "ROLLBACK")
                raise
            self._plain(connection, "COMMIT")

    def execute(self, connection: Any, statement: Any, many: list[dict[str, Any]]) -> list[tuple]:
        """``statement`` once per parameter set in ``many`` (the driver's executemany for
        more than one); the rows of a single execution."""
        form = self.forms.get(statement)
        if form is None:
            form = self.forms[statement] = Form.of(statement, self.engine.dialect)
        args = [form.arguments(params) for params in many]
        cursor = connection.cursor()
        try:
            if len(args) == 1:
                cursor.execute(form.sql, args[0])
                return form.rows(cursor.fetchall()) if cursor.description else []
            cursor.executemany(form.sql, args)
            return []
        except self.error as exc:
            raise DBAPIError.instance(form.sql, args[0] if len(args) == 1 else args, exc,
                                      self.error, dialect=self.engine.dialect) from exc
        finally:
            with contextlib.suppress(self.error):  # an invalidated one is closed already
                cursor.close()

    def _plain(self, connection: Any, sql: str) -> None:
        cursor = connection.cursor()
        try:
            cursor.execute(sql)
        except self.error as exc:
            raise DBAPIError.instance(sql, None, exc, self.error,
                                      dialect=self.engine.dialect) from exc
        finally:
            with contextlib.suppress(self.error):
                cursor.close()

    @contextmanager
    def _checkout(self) -> Iterator[Any]:
        """The main thread's kept connection, or one from the pool (given back after); one
        that was lost (its server gone, the link cut) is dropped."""
        main = threading.current_thread() is threading.main_thread()
        if main:
            with self.keeping:
                self.last_used = time.monotonic()
                with self._connection(main) as connection:
                    yield connection
        else:
            with self._connection(main) as connection:
                yield connection

    def give_back_if_idle(self, idle_after: float) -> bool:
        """Give the kept connection back to the pool if the main thread has not used it for
        ``idle_after`` seconds and is not using it now; whether it did. In the pool, other
        threads use it, and it is closed with the pool's idle ones."""
        if self.kept is None or not self.keeping.acquire(blocking=False):
            return False
        try:
            if self.kept is None or time.monotonic() - self.last_used < idle_after:
                return False
            kept, self.kept = self.kept, None
            with contextlib.suppress(Exception):
                kept.close()
            return True
        finally:
            self.keeping.release()

    @contextmanager
    def _connection(self, main: bool) -> Iterator[Any]:
        connection = None
        try:  # the pool's raw_connection() raises the driver's own error
            connection = self._kept() if main else self.engine.raw_connection()
            yield connection
        except (self.error, DBAPIError) as exc:
            orig = exc.orig if isinstance(exc, DBAPIError) else exc
            wrong_server = not_the_primary(orig)
            if connection is not None and (isinstance(orig, self.lost) or wrong_server):
                connection.invalidate()  # a constraint broken leaves the connection good
                if main:
                    self.kept = None
                    connection.close()
                    connection = None
            if wrong_server:
                # Every idle connection of the pool was made to the same server: closed, so
                # that the next checkout connects and libpq finds the server taking writes
                # (what SQLAlchemy's pool does for a disconnect, which this is not to it).
                self.engine.dispose()
            if isinstance(exc, DBAPIError):
                raise
            raise DBAPIError.instance(None, None, exc, self.error,
                                      dialect=self.engine.dialect) from exc
        finally:
            if connection is not None and not main:
                connection.close()  # back to the pool

    def _kept(self) -> Any:
        kept = self.kept
        if kept is not None and self.engine.dialect.name == "postgresql":
            try:  # the pool's own check at checkout, for a connection that stays out
                closed_by_server(kept.dbapi_connection, None, None)
            except DisconnectionError:
                kept.invalidate()
                kept.close()
                kept = self.kept = None
        if kept is None:
            kept = self.kept = self.engine.raw_connection()
        return kept


class Transaction:
    """What :meth:`orchestrator.ledger.engines.Database.direct_transaction` yields:
    ``run(statement, **params)`` gives the rows, ``run.many(statement, [params, ...])``
    executes once per set."""

    def __init__(self, direct: Direct, connection: Any) -> None:
        self.direct, self.connection = direct, connection

    def __call__(self, statement: Any, /, **params: Any) -> list[tuple]:
        return self.direct.execute(self.connection, statement, [params])

    def many(self, statement: Any, many: list[dict[str, Any]]) -> None:
        self.direct.execute(self.connection, statement, many)
