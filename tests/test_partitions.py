"""Each host its own machine: partitions of the source or the destination of a move.

node1 and node2 run in network namespaces of their own (tests/netbed.py); the broker and the
ledger (a private PostgreSQL) listen on the bridge, the broker at one address and the ledger
at another, so a machine can be cut from either or both. On RabbitMQ the bed relays its broker
address to the suite's RabbitMQ (which listens on loopback only); on Redis it runs a private
redis-server on the bridge. Each partition lasts PARTITION_SECONDS, then heals.

What each partition does, for the README's "Partitions" section, is logged by the test
(``-s``) and asserted: the move completes, each step's work is done once, no worker dies.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from examples.volume_move.app import app, orch
from orchestrator.broker import delete_queues
from orchestrator.local.fleet import Fleet, WorkerProcess, wait_for
from orchestrator.seams.celery_internals import point_app_at
from orchestrator.testing import pgserver
from tests import netbed
from tests.conftest import BROKER_URL
from tests.volumes import make_volume, runs, volume_fleet, wait_step

pytestmark = [
    pytest.mark.shutdown,
    pytest.mark.skipif(netbed.available() is not None, reason=str(netbed.available())),
    pytest.mark.skipif(pgserver.available() is not None, reason=str(pgserver.available())),
]
#: How long a partition lasts before it heals (the scenario's length, not a wait): more than
#: twice what a connection across it takes to fail (db.PG_KEEPALIVE's tcp_user_timeout, the
#: broker's heartbeat), so each side finds the other gone and waits, and longer than copy_out.
PARTITION_SECONDS = 12.0
#: Cut from both, node1 is silent: node2 must find it stale (STALE_AFTER heartbeats), ask it
#: over the broker and give up waiting for it, all before the heal, about this long (the
#: partition lasts until it has, three times this at most).
SILENT_SECONDS = 20.0
QUEUES = ["node1", "node1-alt", "node2", "node2-alt"]


@dataclass
class Bed:
    net: netbed.NetBed
    fleet: Fleet
    broker_url: str
    tmp: Path

    def start(self, host: str, **kwargs) -> WorkerProcess:
        machine = self.net.machines[host]
        return self.fleet.start(host, prefix=tuple(machine.command([])), **kwargs)

    def runs(self) -> list[str]:
        return sorted(runs(self.tmp))


@pytest.fixture
def bed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Bed]:
    net = netbed.NetBed().create()
    made = None
    previous = app.conf.broker_url
    try:
        for name in ("node1", "node2"):
            net.machine(name)
        if net.delay_note:
            print(f"\n{net.delay_note}")
        made = netbed.backends(BROKER_URL, tmp_path, net)
        url = made.broker_url
        point_app_at(app, url)
        if not url.startswith("redis"):
            delete_queues(app, QUEUES)
        with volume_fleet(tmp_path, monkeypatch, url, made.ledger.url,
                          VOLUMES_STEP_SECONDS="copy_out=6") as fleet:
            try:
                yield Bed(net, fleet, url, tmp_path)
            finally:
                for machine in net.machines.values():
                    machine.heal()
        if not url.startswith("redis"):
            delete_queues(app, QUEUES)
    finally:
        point_app_at(app, previous)
        if made is not None:
            made.close()
        net.destroy()


def start_move(bed: Bed) -> tuple[WorkerProcess, WorkerProcess, str]:
    source = bed.start("node1")
    dest = bed.start("node2", graceful_timeout=120)
    make_volume("vol1")
    op = orch.submit("move", hosts={"source": "node1", "dest": "node2"},
                     params={"volume": "vol1"}, subject="vol1")
    wait_step(op, "copy_out")
    return source, dest, op


EVERY_STEP_ONCE = ["copy_in@node2", "copy_out@node1", "reserve@node2", "retire_source@node1"]


@pytest.mark.parametrize("cut", ["broker", "ledger", "both"])
def test_source_partitioned_mid_step(bed: Bed, cut: str) -> None:
    """copy_out runs on node1 while node1 is cut from the broker, the ledger or both, and
    node2 drains; the partition heals after 12 s (20 s when cut from both)."""
    source, dest, op = start_move(bed)
    dest.signal(signal.SIGTERM)
    machine = bed.net.machines["node1"]
    began = time.monotonic()
    if cut == "both":
        machine.cut()
    else:
        machine.cut_from(bed.net.broker_address if cut == "broker" else bed.net.ledger_address)
    if cut == "both":
        # node1 is silent on both channels: node2 cannot tell it from a dead worker, stops
        # waiting for it once its heartbeat is stale and it does not answer over the broker,
        # and exits, all before the heal (however slowly the machine gets there: the
        # partition lasts until it has); copy_in waits in the broker for node2's next start.
        try:
            wait_for(lambda: dest.proc.poll() is not None, 3 * SILENT_SECONDS,
                     "node2 to stop waiting for the silent node1 and exit")
            # At least the scenario's length: node1 finds its connections gone too.
            time.sleep(max(0.0, SILENT_SECONDS - (time.monotonic() - began)))
        finally:
            machine.heal()
        length = time.monotonic() - began
    else:
        length = PARTITION_SECONDS
        time.sleep(length)  # the partition's length: the scenario, not a wait
        machine.heal()
    healed = time.monotonic()

    exited_during = dest.proc.poll() is not None
    if cut == "both":
        assert dest.wait(timeout=10) == 0, dest.log()[-3000:]
        bed.start("node2")
    done = orch.wait(op, timeout=120)
    assert done["status"] == "completed", done
    finished = time.monotonic()
    code = dest.wait(timeout=120)
    print(f"\nsource cut from {cut} for {length:.0f}s: move completed "
          f"{finished - healed:.1f}s after the heal ({finished - began:.1f}s after the cut); "
          f"node2's drain exited {code}"
          + (" during the partition" if exited_during else " after the heal"))
    assert code == 0, dest.log()[-3000:]
    assert source.proc.poll() is None, source.log()[-3000:]
    assert bed.runs() == EVERY_STEP_ONCE, bed.runs()
    if cut != "both":
        assert "steps completed during drain: 1" in dest.log(), dest.log()[-3000:]
    for worker in (source, dest):
        assert "Traceback" not in worker.log(), worker.log()[-4000:]


def test_destination_partitioned_while_it_drains(bed: Bed) -> None:
    """node2 drains, waiting for copy_out on node1, and is cut off from everything for 12 s;
    copy_out ends meanwhile and copy_in is sent to node2."""
    source, dest, op = start_move(bed)
    dest.signal(signal.SIGTERM)
    machine = bed.net.machines["node2"]
    machine.cut()
    time.sleep(PARTITION_SECONDS)  # the partition's length: the scenario, not a wait
    machine.heal()
    healed = time.monotonic()
    code = dest.wait(timeout=150)
    data = orch.operation(op)
    print(f"\nnode2 cut while draining for {PARTITION_SECONDS:.0f}s: its drain exited {code} "
          f"{time.monotonic() - healed:.1f}s after the heal; the move was {data['status']} "
          f"at {(data['current_step'] or {}).get('step')}")
    if data["status"] != "completed":
        bed.start("node2")  # what it waits for runs when node2 is back
    done = orch.wait(op, timeout=120)
    assert done["status"] == "completed", done
    assert source.proc.poll() is None
    assert bed.runs() == EVERY_STEP_ONCE, bed.runs()
