"""A private PostgreSQL cluster for a test: a database that can be stopped and started.

Fault tests stop the ledger's database under running workers; the machine's shared PostgreSQL
on 5432 is never touched. ``initdb`` and ``pg_ctl`` run as user ``postgres`` (PostgreSQL
refuses to run as root), in a temporary directory, on a free port; :meth:`destroy` stops the
server and removes everything.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from orchestrator.local.embedded import free_port
from orchestrator.local.fleet import wait_for


def pg_bin(name: str) -> str | None:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found[-1] if found else shutil.which(name)


def available() -> str | None:
    """None if a private cluster can be made here, else why not."""
    if pg_bin("initdb") is None or pg_bin("pg_ctl") is None:
        return "PostgreSQL's initdb/pg_ctl are not installed"
    if os.geteuid() == 0:
        try:
            import pwd

            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and there is no postgres user to run PostgreSQL as"
    return None


class PrivatePostgres:
    def __init__(self, address: str = "127.0.0.1") -> None:
        self.address = address
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="orchestrator-pg-"))
        self.data = self.dir / "data"
        self.log = self.dir / "server.log"

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@{self.address}:{self.port}/postgres"

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        command = list(args)
        if os.geteuid() == 0:
            command = ["runuser", "-u", "postgres", "--", *command]
        return subprocess.run(command, check=check, capture_output=True, text=True, timeout=60)

    def init(self) -> PrivatePostgres:
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres")
        self._run(pg_bin("initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres",
                  "--no-sync")
        # Clients of the test's own machines (network namespaces) too: it listens only on
        # the address it is given.
        with (self.data / "pg_hba.conf").open("a") as hba:
            hba.write("host all all 0.0.0.0/0 trust\n")
        return self

    def start(self) -> None:
        self._run(pg_bin("pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-w", "-o",
                  f"-p {self.port} -k {self.dir} -c listen_addresses={self.address} "
                  "-c fsync=off -c max_connections=200", "start")

    def stop(self, mode: str = "fast") -> None:
        """``fast``: clients cut, clean shutdown; ``immediate``: a crash (WAL recovery)."""
        self._run(pg_bin("pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop",
                  check=False)

    def running(self) -> bool:
        return self._run(pg_bin("pg_ctl"), "-D", str(self.data), "status",
                         check=False).returncode == 0

    def wait_answering(self, timeout: float = 30) -> None:
        import psycopg

        def answers() -> bool:
            try:
                psycopg.connect(f"host={self.address} port={self.port} user=postgres "
                                "dbname=postgres connect_timeout=2").close()
                return True
            except psycopg.OperationalError:
                return False

        wait_for(answers, timeout, f"PostgreSQL on {self.address}:{self.port}")

    @contextmanager
    def serving(self) -> Iterator[PrivatePostgres]:
        """Started and answering for the block, destroyed after it, whatever happens."""
        try:
            self.start()
            self.wait_answering()
            yield self
        finally:
            self.destroy()

    def create_database(self, name: str) -> str:
        """A new database on this server; its URL (the sample counters of one database are
        then apart from those of ``postgres``, where an admin connection reads them)."""
        import psycopg

        with psycopg.connect(f"host={self.address} port={self.port} user=postgres "
                             "dbname=postgres", autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url.rsplit("/", 1)[0] + f"/{name}"

    def destroy(self) -> None:
        if self.data.exists():
            self.stop("immediate")
        shutil.rmtree(self.dir, ignore_errors=True)
