"""A private PgBouncer in front of a PostgreSQL server, for a test or the scale bed.

Debian's ``pgbouncer`` (1.18 in bookworm), run as user ``postgres`` (it refuses root), on a
free port, with its configuration in a temporary directory: ``pool_mode`` (``transaction`` by
default: the way to put thousands of workers on one server) and ``default_pool_size`` (the
server connections each database and user get, whatever the number of clients).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from orchestrator.local.embedded import free_port
from orchestrator.local.fleet import wait_for


def available() -> str | None:
    """None if a private PgBouncer can be run here, else why not."""
    if shutil.which("pgbouncer") is None and not Path("/usr/sbin/pgbouncer").exists():
        return "PgBouncer is not installed (apt-get install pgbouncer)"
    return None


class PgBouncer:
    def __init__(self, server_port: int, *, pool_mode: str = "transaction",
                 pool_size: int = 5, max_clients: int = 2000) -> None:
        self.server_port = server_port
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="orchestrator-pgbouncer-"))
        self.log = self.dir / "pgbouncer.log"
        (self.dir / "pgbouncer.ini").write_text(f"""\
[databases]
* = host=127.0.0.1 port={server_port}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {self.port}
unix_socket_dir =
auth_type = trust
auth_file = {self.dir / "users.txt"}
pool_mode = {pool_mode}
default_pool_size = {pool_size}
max_client_conn = {max_clients}
logfile = {self.log}
pidfile = {self.dir / "pgbouncer.pid"}
ignore_startup_parameters = extra_float_digits,options
""")
        (self.dir / "users.txt").write_text('"postgres" ""\n')
        self.proc: subprocess.Popen | None = None

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def start(self) -> PgBouncer:
        command = [shutil.which("pgbouncer") or "/usr/sbin/pgbouncer",
                   str(self.dir / "pgbouncer.ini")]
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres")
            for path in self.dir.iterdir():
                shutil.chown(path, "postgres")
            command = ["runuser", "-u", "postgres", "--", *command]
        self.proc = subprocess.Popen(command, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        wait_for(self._answers, 15, f"PgBouncer on 127.0.0.1:{self.port}")
        return self

    def _answers(self) -> bool:
        import psycopg

        try:
            psycopg.connect(f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres "
                            "connect_timeout=2").close()
            return True
        except psycopg.OperationalError:
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)
