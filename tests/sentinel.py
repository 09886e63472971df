"""A private Redis Sentinel set on this machine: a primary, a replica and three sentinels.

Each server is a ``redis-server`` child on a free loopback port, in a temporary directory;
the sentinels watch the primary as :data:`MASTER` and fail over to the replica one second
after it stops answering. The machine's Redis on 6379 is never touched.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import redis

from orchestrator.embedded import free_port, redis_server_binary
from orchestrator.fleet import wait_for

MASTER = "orchmaster"


class SentinelSet:
    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="orchestrator-sentinel-"))
        self.binary = redis_server_binary()
        self.ports = {"primary": free_port(), "replica": free_port()}
        self.sentinel_ports = [free_port() for _ in range(3)]
        self.procs: dict[str, subprocess.Popen] = {}

    @property
    def url(self) -> str:
        """kombu's Sentinel transport URL (every sentinel); the primary's name goes in
        ``ORCHESTRATOR_SENTINEL_MASTER``."""
        return ";".join(f"sentinel://127.0.0.1:{port}" for port in self.sentinel_ports)

    def _spawn(self, name: str, args: list[str]) -> None:
        workdir = self.dir / name
        workdir.mkdir(exist_ok=True)
        log = (workdir / "log").open("a")
        self.procs[name] = subprocess.Popen([self.binary, *args], cwd=workdir, stdout=log,
                                            stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL)

    def start(self) -> SentinelSet:
        common = ["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        self._spawn("primary", ["--port", str(self.ports["primary"]), *common])
        self._spawn("replica", ["--port", str(self.ports["replica"]), *common,
                                "--replicaof", "127.0.0.1", str(self.ports["primary"])])
        for i, port in enumerate(self.sentinel_ports):
            conf = self.dir / f"sentinel{i}.conf"
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\n"
                f"sentinel monitor {MASTER} 127.0.0.1 {self.ports['primary']} 2\n"
                f"sentinel down-after-milliseconds {MASTER} 1000\n"
                f"sentinel failover-timeout {MASTER} 5000\n"
                f"sentinel parallel-syncs {MASTER} 1\n"
            )
            self._spawn(f"sentinel{i}", [str(conf), "--sentinel"])
        wait_for(lambda: self.client("replica").info("replication").get("master_link_status")
                 == "up", 30, "the replica to sync")
        wait_for(lambda: all(self._sees_replica(p) for p in self.sentinel_ports), 30,
                 "every sentinel to know the replica")
        return self

    def _sees_replica(self, port: int) -> bool:
        try:
            replicas = redis.Redis(port=port).sentinel_slaves(MASTER)
        except redis.RedisError:
            return False
        return any(int(r.get("port", 0)) == self.ports["replica"] for r in replicas)

    def client(self, name: str) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.ports[name])

    def primary_port(self) -> int:
        host, port = redis.Redis(port=self.sentinel_ports[0]).sentinel_get_master_addr_by_name(
            MASTER)
        return int(port)

    def signal(self, name: str, sig: int) -> None:
        self.procs[name].send_signal(sig)

    def kill(self, name: str) -> None:
        self.procs[name].kill()
        self.procs[name].wait(timeout=10)

    def destroy(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)  # a stopped one, too
                proc.kill()
                proc.wait(timeout=10)
        shutil.rmtree(self.dir, ignore_errors=True)


def available() -> str | None:
    return None if redis_server_binary() else "no redis-server binary"

