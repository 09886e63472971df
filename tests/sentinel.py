"""A private Redis Sentinel set on this machine: a primary, a replica and three sentinels.

Each server is a ``redis-server`` child on a free loopback port, in a temporary directory;
the sentinels watch the primary as :data:`MASTER` and fail over to the replica one second
after it stops answering; :meth:`SentinelSet.fail_over` makes that happen and brings the old
primary back as the new one's replica, so that it can happen again. The machine's Redis on
6379 is never touched.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import redis
import redis.sentinel

from orchestrator.local.embedded import free_port, redis_server_binary
from orchestrator.local.fleet import wait_for

MASTER = "orchmaster"


class SentinelSet:
    #: The primary's name: ``ORCHESTRATOR_SENTINEL_MASTER`` for its clients.
    master = MASTER

    def __init__(self, address: str = "127.0.0.1") -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="orchestrator-sentinel-"))
        self.binary = redis_server_binary()
        self.address = address
        self.ports = {"primary": free_port(address), "replica": free_port(address)}
        self.sentinel_ports = [free_port(address) for _ in range(3)]
        self.procs: dict[str, subprocess.Popen] = {}
        self.args: dict[str, list[str]] = {}

    @property
    def url(self) -> str:
        """kombu's Sentinel transport URL (every sentinel); the primary's name goes in
        ``ORCHESTRATOR_SENTINEL_MASTER``."""
        return ";".join(f"sentinel://{self.address}:{port}" for port in self.sentinel_ports)

    def _spawn(self, name: str, args: list[str]) -> None:
        workdir = self.dir / name
        workdir.mkdir(exist_ok=True)
        log = (workdir / "log").open("a")
        self.args[name] = args
        self.procs[name] = subprocess.Popen([self.binary, *args], cwd=workdir, stdout=log,
                                            stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL)

    def start(self) -> SentinelSet:
        common = ["--bind", self.address, "--save", "", "--appendonly", "no"]
        self._spawn("primary", ["--port", str(self.ports["primary"]), *common])
        self._spawn("replica", ["--port", str(self.ports["replica"]), *common,
                                "--replicaof", self.address, str(self.ports["primary"])])
        for i, port in enumerate(self.sentinel_ports):
            conf = self.dir / f"sentinel{i}.conf"
            conf.write_text(
                f"port {port}\nbind {self.address}\n"
                f"sentinel monitor {MASTER} {self.address} {self.ports['primary']} 2\n"
                f"sentinel down-after-milliseconds {MASTER} 1000\n"
                f"sentinel failover-timeout {MASTER} 5000\n"
                f"sentinel parallel-syncs {MASTER} 1\n"
            )
            self._spawn(f"sentinel{i}", [str(conf), "--sentinel"])
        self._wait_replica("replica")
        return self

    def _wait_replica(self, name: str) -> None:
        wait_for(lambda: self._synced(name), 30, f"{name} to sync")
        wait_for(lambda: all(self._sees_replica(p, name) for p in self.sentinel_ports), 30,
                 f"every sentinel to know {name} as the replica")

    def _synced(self, name: str) -> bool:
        try:
            return self.client(name).info("replication").get("master_link_status") == "up"
        except redis.RedisError:
            return False

    def _sees_replica(self, port: int, name: str) -> bool:
        try:
            replicas = self._sentinel(port).sentinel_slaves(MASTER)
        except redis.RedisError:
            return False
        return any(int(r.get("port", 0)) == self.ports[name] and "s_down" not in r.get(
            "flags", "") for r in replicas)

    def _sentinel(self, port: int) -> redis.Redis:
        return redis.Redis(host=self.address, port=port, socket_timeout=2)

    def client(self, name: str) -> redis.Redis:
        return redis.Redis(host=self.address, port=self.ports[name])

    def primary_port(self) -> int | None:
        """The primary's port as a client finds it now, None while no sentinel sees one up.

        A client (redis-py's ``Sentinel.discover_master``, which kombu's transport uses) takes
        the first sentinel that sees its primary up. A sentinel that did not lead a promotion
        learns of it from the others' hello messages, seconds later, and until then names the
        old primary: one sentinel's word is not where the clients go."""
        found = redis.sentinel.Sentinel([(self.address, port) for port in self.sentinel_ports],
                                         socket_timeout=2)
        try:
            return int(found.discover_master(MASTER)[1])
        except redis.RedisError:
            return None

    def primary(self) -> redis.Redis:
        """A client of whichever server is the primary now."""
        port = wait_for(self.primary_port, 30, "a sentinel to see a primary up")
        return redis.Redis(host=self.address, port=port)

    def fail_over(self) -> float:
        """Kill the primary (SIGKILL: what it had not passed to the replica is lost), wait
        for the sentinels to promote the replica, and start the old primary again, empty,
        for the sentinels to make it the new primary's replica. Returns the seconds the
        broker had no primary."""
        import time

        old_port = wait_for(self.primary_port, 30, "a sentinel to see a primary up")
        old = next(name for name, port in self.ports.items() if port == old_port)
        began = time.monotonic()
        self.kill(old)
        wait_for(lambda: self._promoted(old_port), 60, "the sentinels to promote the replica")
        without = time.monotonic() - began
        args = self.args[old]
        if "--replicaof" in args:
            args = args[:args.index("--replicaof")]
        # Back as the new primary's replica at once (the sentinels would make it one too,
        # but only 10 to 40 s after it came back as an empty primary).
        self._spawn(old, [*args, "--replicaof", self.address, str(self.primary_port())])
        self._wait_replica(old)
        return without

    def _promoted(self, old_port: int) -> bool:
        try:
            port = self.primary_port()
            return port not in (None, old_port) and self.client(
                next(n for n, p in self.ports.items() if p == port)).info(
                "replication").get("role") == "master"
        except redis.RedisError:
            return False

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

