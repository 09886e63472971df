"""Each host its own machine: Linux network namespaces on a bridge, for partition tests.

One bed is a bridge in the root namespace holding two addresses, the broker's (``.1``) and the
ledger's (``.2``), and one namespace per machine, joined to the bridge by a veth pair, with an
address of its own (``.11``, ``.12``...) and ``tc netem`` delay on its link (2 ms +- 1 ms by
default) where the kernel has netem (:attr:`NetBed.delay_note` says when it has not: this
machine's kernel ships no ``sch_netem`` and cannot load it, so its beds run without delay).
A worker runs inside its machine (``ip netns exec``); the broker and the ledger listen on the
bridge's addresses.

Faults, all real:

- :meth:`Machine.cut` takes the machine's link down: silence both ways, as a pulled cable (a
  TCP connection across it is not reset; each side notices only by its own timeouts);
- :meth:`Machine.cut_from` makes one address (the broker's or the ledger's) a blackhole route
  in the machine: a partition from that service alone. Packets of a connection already open
  vanish (silence, as above); a new connection fails at once with EINVAL (the kernel's answer
  for a blackhole route), where a cut link would let it time out;
- :meth:`Machine.heal` undoes either.

Names carry a tag of this process, so that beds of two runs never meet; :meth:`NetBed.destroy`
removes every namespace, link and filter the bed made. Needs root and ``ip netns``; tests skip
with :func:`available`'s reason where either is missing.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

#: A /24 in a range no machine here routes: the bed's own, on its own bridge.
SUBNET_BASE = "10.213"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True, timeout=30)


def _tc(*args: str, namespace: str | None = None) -> None:
    prefix = ["ip", "netns", "exec", namespace] if namespace else []
    subprocess.run([*prefix, "tc", *args], check=True, capture_output=True, text=True,
                   timeout=30)


def _free_octet(first: int) -> int:
    """The third octet of a /24 of SUBNET_BASE no address here is in, from ``first`` on: the
    beds of two test processes running side by side (pytest -n) never share a subnet."""
    used = _ip("-o", "addr", "show").stdout
    for step in range(150):
        octet = 100 + (first - 100 + step) % 150
        if f" {SUBNET_BASE}.{octet}." not in used:
            return octet
    raise RuntimeError(f"every /24 of {SUBNET_BASE}.100-249 is in use here")


def available() -> str | None:
    """None if network namespaces can be made here, else why not."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None or shutil.which("tc") is None:
        return "iproute2 (ip, tc) is not installed"
    probe = f"orchprobe{os.getpid()}"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"ip netns add fails here: {made.stderr.strip()}"
    _ip("netns", "delete", probe, check=False)
    return None


@dataclass
class Machine:
    bed: NetBed
    name: str
    index: int
    namespace: str
    inside: str
    outside: str
    address: str
    cut_from_addresses: list[str] = field(default_factory=list)

    def command(self, argv: list[str]) -> list[str]:
        """``argv`` run inside this machine (``ip netns exec`` execs it: the PID is its)."""
        return ["ip", "netns", "exec", self.namespace, *argv]

    def cut(self) -> None:
        _ip("-n", self.namespace, "link", "set", self.inside, "down")

    def cut_from(self, address: str) -> None:
        """Packets from this machine to ``address`` are dropped (a blackhole route)."""
        _ip("-n", self.namespace, "route", "add", "blackhole", f"{address}/32")
        self.cut_from_addresses.append(address)

    def heal(self) -> None:
        _ip("-n", self.namespace, "link", "set", self.inside, "up")
        for address in self.cut_from_addresses:
            _ip("-n", self.namespace, "route", "del", "blackhole", f"{address}/32", check=False)
        self.cut_from_addresses.clear()


class NetBed:
    def __init__(self, delay: str = "2ms 1ms") -> None:
        self.tag = f"ob{os.getpid() % 100000}"
        self.octet = _free_octet(100 + os.getpid() % 150)
        self.prefix = f"{SUBNET_BASE}.{self.octet}"
        self.bridge = f"{self.tag}br"
        self.broker_address = f"{self.prefix}.1"
        self.ledger_address = f"{self.prefix}.2"
        self.delay = delay
        #: Why the machines have no delay between them, if they have none.
        self.delay_note: str | None = None
        self.machines: dict[str, Machine] = {}

    def create(self) -> NetBed:
        _ip("link", "add", self.bridge, "type", "bridge")
        for address in (self.broker_address, self.ledger_address):
            _ip("addr", "add", f"{address}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        return self

    def machine(self, name: str) -> Machine:
        index = len(self.machines) + 1
        namespace = f"{self.tag}-{name}"
        inside, outside = f"{self.tag}m{index}i", f"{self.tag}m{index}o"
        address = f"{self.prefix}.{10 + index}"
        _ip("netns", "add", namespace)
        _ip("link", "add", inside, "type", "veth", "peer", "name", outside)
        _ip("link", "set", inside, "netns", namespace)
        _ip("link", "set", outside, "master", self.bridge)
        _ip("link", "set", outside, "up")
        _ip("-n", namespace, "addr", "add", f"{address}/24", "dev", inside)
        _ip("-n", namespace, "link", "set", inside, "up")
        _ip("-n", namespace, "link", "set", "lo", "up")
        # Delay between machines, both ways: on the machine's side and on the bridge's.
        if self.delay and self.delay_note is None:
            try:
                _tc("qdisc", "add", "dev", outside, "root", "netem", "delay",
                    *self.delay.split())
                _tc("qdisc", "add", "dev", inside, "root", "netem", "delay",
                    *self.delay.split(), namespace=namespace)
            except subprocess.CalledProcessError as exc:
                self.delay_note = (f"no delay between machines: tc netem fails here "
                                   f"({(exc.stderr or '').strip() or exc})")
        machine = Machine(self, name, index, namespace, inside, outside, address)
        self.machines[name] = machine
        return machine

    def destroy(self) -> None:
        for machine in self.machines.values():
            _ip("netns", "delete", machine.namespace, check=False)  # takes its veth pair
            _ip("link", "delete", machine.outside, check=False)
        _ip("link", "delete", self.bridge, check=False)
        self.machines.clear()


class TcpForwarder:
    """Relays ``listen`` to ``target`` (a broker that listens on loopback only, reached from
    the machines at the bed's broker address). A partition of a machine is on its own link,
    so the relay changes nothing of what it does: silence stays silence."""

    def __init__(self, listen: tuple[str, int], target: tuple[str, int]) -> None:
        self.listen, self.target = listen, target
        self.loop = asyncio.new_event_loop()
        self._server: asyncio.base_events.Server | None = None
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True,
                                        name="tcp-forwarder")

    def start(self) -> TcpForwarder:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._serve(), self.loop).result(timeout=10)
        return self

    async def _serve(self) -> None:
        self._server = await asyncio.start_server(self._handle, *self.listen)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (OSError, asyncio.CancelledError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    def stop(self) -> None:
        async def close() -> None:
            if self._server is not None:
                self._server.close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(close(), self.loop).result(timeout=10)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=10)


@dataclass
class Backends:
    """The ledger and the broker of a bed, on its bridge: what a partition cuts a machine
    from. ``broker_url`` is what the machines' workers (and this process) connect to."""

    #: orchestrator.testing.pgserver.PrivatePostgres or tests.pgfailover.PostgresPair, started.
    ledger: Any
    broker_url: str
    #: The Sentinel set, when the broker is one (tests/sentinel.py): what fails over.
    sentinels: Any = None
    #: The RabbitMQ cluster, when the broker is one (tests/rabbitcluster.py): what loses nodes.
    rabbit: Any = None
    servers: list = field(default_factory=list)

    def close(self) -> None:
        for server in reversed(self.servers):
            (server.destroy if hasattr(server, "destroy") else server.stop)()
        self.servers.clear()


def backends(broker_url: str, workdir: Path, net: NetBed | None = None,
             sentinel: bool = False, ledger: bool = True,
             ledger_pair: bool = False, rabbit_cluster: bool = False) -> Backends:
    """The services a fault test cuts or fails: with ``ledger``, a private PostgreSQL (with
    ``ledger_pair``, a primary and a synchronous standby that fail over); a broker of the
    kind ``broker_url`` names, a Sentinel set of its own with ``sentinel``, a three-node
    RabbitMQ cluster of its own with ``rabbit_cluster`` (loopback only: not on a bed).

    With a bed, both listen on its bridge (the ledger's and the broker's addresses): Redis a
    private redis-server, RabbitMQ (which listens on loopback only here) a relay of the
    broker address to ``broker_url``'s server. Without one they listen on loopback and a
    plain broker is ``broker_url`` itself."""
    from orchestrator.local.embedded import RedisServer, free_port
    from orchestrator.testing import pgserver
    from tests import sentinel as sentinels

    made = Backends(ledger=None, broker_url=broker_url)
    try:
        where = {"address": net.ledger_address} if net else {}
        if ledger_pair:
            from tests.pgfailover import PostgresPair

            made.ledger = PostgresPair(synchronous=True, **where)
            made.servers.append(made.ledger)
            made.ledger.create()
        elif ledger:
            made.ledger = pgserver.PrivatePostgres(**where).init()
            made.servers.append(made.ledger)
            made.ledger.start()
            made.ledger.wait_answering()
        parsed = urlparse(broker_url)
        if rabbit_cluster:
            from tests.rabbitcluster import RabbitCluster

            if net is not None:
                raise ValueError("a RabbitMQ cluster of the bed's own listens on loopback only: "
                                 "no partitions with it")
            made.rabbit = RabbitCluster()
            made.servers.append(made.rabbit)
            made.rabbit.start()
            made.broker_url = made.rabbit.url
        elif sentinel:
            made.sentinels = sentinels.SentinelSet(
                **({"address": net.broker_address} if net else {})).start()
            made.servers.append(made.sentinels)
            made.broker_url = made.sentinels.url
        elif net is None:
            pass
        elif parsed.scheme.startswith("redis"):
            workdir.mkdir(parents=True, exist_ok=True)
            redis = RedisServer(workdir, address=net.broker_address)
            made.servers.append(redis)
            redis.start()
            made.broker_url = redis.url
        else:
            port = free_port(net.broker_address)
            relay = TcpForwarder((net.broker_address, port),
                                 (parsed.hostname or "127.0.0.1", parsed.port or 5672))
            made.servers.append(relay.start())
            made.broker_url = parsed._replace(
                netloc=f"{parsed.netloc.rsplit('@', 1)[0]}@{net.broker_address}:{port}"
            ).geturl()
        return made
    except BaseException:
        made.close()
        raise
