"""A PostgreSQL primary and its streaming standby, private to a test: a ledger that fails over.

The primary is a :class:`~orchestrator.testing.pgserver.PrivatePostgres`; the standby is copied
from it with ``pg_basebackup -R`` (which writes the standby's ``primary_conninfo`` and
``standby.signal``) and streams from it, on a port of its own. Replication is synchronous
(``synchronous_standby_names = '*'``, ``synchronous_commit = on``: a commit is acknowledged
once the standby has flushed it) or asynchronous. :meth:`PostgresPair.fail_over` does what
Patroni or a managed service does when the primary dies: promote the standby. The clients'
URL names both servers with ``target_session_attrs=read-write`` (libpq's multi-host form), so
whichever one takes writes is the ledger. :meth:`PostgresPair.rebuild_standby` makes the old
primary the new standby (a fresh ``pg_basebackup``), as an operator or Patroni would.

A pair also stands where a single private cluster does (the soak's ledger): ``stop``,
``start``, ``wait_answering`` and ``running`` are the current primary's.
"""

from __future__ import annotations

import os
import shutil

import psycopg

from orchestrator.local.fleet import wait_for
from orchestrator.testing.pgserver import PrivatePostgres, pg_bin


def query(server: PrivatePostgres, sql: str) -> object:
    """One statement on ``server`` in autocommit; the first column of its first row."""
    with psycopg.connect(f"host={server.address} port={server.port} user=postgres "
                         "dbname=postgres connect_timeout=3", autocommit=True) as conn:
        cur = conn.execute(sql)
        row = cur.fetchone() if cur.description else None
        return row[0] if row else None


class PostgresPair:
    """A primary and a standby; ``servers[0]`` is the primary until a failover swaps them."""

    def __init__(self, synchronous: bool, address: str = "127.0.0.1") -> None:
        self.synchronous = synchronous
        self.primary = PrivatePostgres(address).init()
        # The standby's replication connection from any address the servers listen on (a
        # test bed's bridge too); base backups copy this file to every later standby.
        with (self.primary.data / "pg_hba.conf").open("a") as hba:
            hba.write("host replication all 0.0.0.0/0 trust\n")
        self.standby = PrivatePostgres(address)
        #: Both servers in the URL's order, which a failover does not change.
        self.servers = (self.primary, self.standby)

    @property
    def url(self) -> str:
        """Both servers, in the order they were made; libpq keeps the one that takes writes."""
        hosts = "&".join(f"host={s.address}:{s.port}" for s in self.servers)
        return f"postgresql+psycopg://postgres@/postgres?{hosts}&target_session_attrs=read-write"

    def create(self) -> PostgresPair:
        """Both servers started, the standby streaming (synchronous if asked)."""
        self.primary.start()
        self.primary.wait_answering()
        self._copy(self.primary, self.standby)
        if self.synchronous:
            self.make_synchronous(self.primary)
        return self

    def _copy(self, source: PrivatePostgres, target: PrivatePostgres) -> None:
        """``target`` made a streaming standby of ``source`` and started."""
        shutil.rmtree(target.data, ignore_errors=True)
        if os.geteuid() == 0:
            shutil.chown(target.dir, "postgres")
        target._run(pg_bin("pg_basebackup"), "-D", str(target.data), "-R", "-X", "stream",
                    "-c", "fast", "--no-sync", "-h", source.address, "-p", str(source.port),
                    "-U", "postgres")
        target.start()
        target.wait_answering()
        # After its primary restarts, the standby connects again within this, not 5 s: a
        # synchronous primary's commits wait for it meanwhile.
        query(target, "ALTER SYSTEM SET wal_retrieve_retry_interval = '200ms'")
        query(target, "SELECT pg_reload_conf()")
        wait_for(lambda: query(source, "SELECT count(*) FROM pg_stat_replication "
                                       "WHERE state = 'streaming'"), 30,
                 f"the standby on {target.port} to stream from {source.port}")

    def make_synchronous(self, primary: PrivatePostgres) -> None:
        """Every commit on ``primary`` waits for the standby's flush (Patroni's
        ``synchronous_mode`` sets this on whichever server is the primary, once it has a
        standby: a promoted standby that kept it would wait for a standby it no longer has)."""
        query(primary, "ALTER SYSTEM SET synchronous_standby_names = '*'")
        query(primary, "ALTER SYSTEM SET synchronous_commit = 'on'")
        query(primary, "SELECT pg_reload_conf()")
        wait_for(lambda: query(primary, "SELECT count(*) FROM pg_stat_replication "
                                        "WHERE sync_state = 'sync'"), 30,
                 "the standby to be synchronous")

    def caught_up(self) -> bool:
        """The standby has replayed everything the primary has written so far."""
        lsn = query(self.primary, "SELECT pg_current_wal_lsn()")
        return bool(query(self.standby, f"SELECT pg_last_wal_replay_lsn() >= '{lsn}'::pg_lsn"))

    def cut_replication(self) -> None:
        """The standby stops receiving WAL (its ``primary_conninfo`` emptied and reloaded: the
        walreceiver exits): what an asynchronous standby lags by, made deterministic."""
        query(self.standby, "ALTER SYSTEM SET primary_conninfo = ''")
        query(self.standby, "SELECT pg_reload_conf()")
        wait_for(lambda: not query(self.standby, "SELECT count(*) FROM pg_stat_wal_receiver"),
                 30, "the standby's walreceiver to stop")

    def fail_over(self) -> None:
        """The primary crashes (``pg_ctl stop -m immediate``: no shutdown checkpoint, clients
        cut), the standby is promoted and takes writes; the two swap roles."""
        self.primary.stop("immediate")
        self.standby._run(pg_bin("pg_ctl"), "-D", str(self.standby.data), "-w", "promote")
        wait_for(lambda: query(self.standby, "SELECT NOT pg_is_in_recovery()"), 30,
                 "the promoted standby to take writes")
        self.primary, self.standby = self.standby, self.primary

    def rebuild_standby(self) -> None:
        """The old primary (down) made again as the new primary's standby."""
        self.standby.stop("immediate")
        self._copy(self.primary, self.standby)
        if self.synchronous:
            self.make_synchronous(self.primary)

    def stop(self, mode: str = "fast") -> None:
        self.primary.stop(mode)

    def start(self) -> None:
        self.primary.start()

    def wait_answering(self, timeout: float = 30) -> None:
        self.primary.wait_answering(timeout)

    def running(self) -> bool:
        return self.primary.running()

    def destroy(self) -> None:
        for server in (self.primary, self.standby):
            server.destroy()
