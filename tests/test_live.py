"""The live view (``orchestrator.ops.live.Watch``) of a fleet larger than a screen: 300 registered
hosts and no worker, drawn into a terminal of a fixed size; what it shows first, what it says
of the rest, and what it reads each refresh."""

from __future__ import annotations

import io
import re
import time
from typing import Any

import pytest
from rich.console import Console

from nova_app import operations
from nova_app.app import orch
from orchestrator.ops import live, views
from orchestrator.ops.live import Watch

DRAINING = ["sim017", "sim077", "sim150", "sim250"]
DOWN = ["sim003", "sim030", "sim099", "sim180", "sim260", "sim280"]
#: Each with a boot queued (their queues are emptied before each test, on any broker).
BUSY = ["compute1", "compute2", "compute3"]


def register(hosts: list[str]) -> None:
    for host in hosts:
        orch.registry.register(f"{host}@sim", host, consumes_main=True, consumes_alt=True,
                               pid=1)


def drain(host: str) -> None:
    now = time.time()
    orch.registry.set_state(f"{host}@sim", "draining", drain_started_at=now)
    orch.registry.drain_started(f"{host}@sim", host, "SIGTERM", now, now + 60,
                                {"running": [], "operations": [f"boot at build@{host}"]})


@pytest.fixture
def fleet(broker: str, db_url: str, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """300 hosts: 4 draining, 6 down, 3 with an operation in flight, the rest up and idle.
    Nobody beats their hearts: the registry counts none down for a silence."""
    monkeypatch.setattr(orch.registry, "heartbeat_interval", 3600.0)
    hosts = BUSY + [f"sim{i:03d}" for i in range(297)]
    register(hosts)
    for host in DRAINING:
        drain(host)
    for host in DOWN:
        orch.registry.set_state(f"{host}@sim", "down")
    for i, host in enumerate(BUSY):
        operations.boot(f"vm{i}", host)
    return hosts


def screen(watch: Watch) -> list[str]:
    watch.console.print(watch.render())
    return watch.console.export_text().splitlines()


def watching(height: int) -> Watch:
    console = Console(file=io.StringIO(), width=120, height=height, record=True)
    return Watch(orch, live=False, out=io.StringIO(), console=console)


def table(lines: list[str], title: str) -> tuple[list[list[str]], str]:
    """The rows of the table under ``title`` (its cells), and the line under it."""
    start = next(i for i, line in enumerate(lines) if line.startswith(f"│ {title}"))
    rows, i = [], start + 4  # title, top border, header, the line under it
    while lines[i].startswith("│ │"):
        rows.append([cell.strip() for cell in lines[i].strip("│ ").split("│")])
        i += 1
    return rows, lines[i + 1].strip("│ ")


def test_the_hosts_that_matter_first_and_how_many_more(fleet: list[str]) -> None:
    watch = watching(40)
    watch.poll()
    lines = screen(watch)
    assert len(lines) <= 40, "\n".join(lines)
    assert "hosts: 300 (290 up, 4 draining, 6 down); 3 with operations in flight" in lines[1]
    rows, more = table(lines, "hosts:")
    names = [row[0] for row in rows]
    assert names[:13] == DRAINING + DOWN + BUSY, "\n".join(lines)
    assert [row[1] for row in rows[:13]] == ["draining"] * 4 + ["down"] * 6 + ["up"] * 3
    # (the drain's 60 s began as the fixture set the fleet up: a second may have gone by)
    assert rows[0][2] in ("60s left", "59s left") and rows[0][3] == "boot at build@sim017"
    assert [row[4] for row in rows[10:13]] == ["1"] * 3, "a boot waits in each queue"
    # Then the idle ones, by name.
    idle = sorted(set(fleet) - set(DRAINING + DOWN + BUSY))
    assert names[13:] == idle[:len(names) - 13]
    assert len(rows) >= 15, "the hosts get the larger share of the lines"
    assert more == f"+ {300 - len(rows)} more: {290 - (len(rows) - 10)} up " \
                   "(orchestrator hosts to list)"
    ops, more_ops = table(lines, "operations:")
    assert [(o[1], o[3], o[5]) for o in ops] == [
        ("boot", "queued", host) for host in reversed(BUSY)], "newest first"
    assert not more_ops.startswith("+"), "all three fit"


def test_a_short_terminal_says_what_it_leaves_out(fleet: list[str]) -> None:
    watch = watching(24)
    watch.poll()
    lines = screen(watch)
    assert len(lines) <= 24, "\n".join(lines)
    rows, more = table(lines, "hosts:")
    assert [row[0] for row in rows] == DRAINING + DOWN[:len(rows) - 4], "\n".join(lines)
    down_left = 6 - (len(rows) - 4)
    assert more == (f"+ {300 - len(rows)} more: 290 up, {down_left} down; 3 with operations "
                    "in flight (orchestrator hosts --state down to list)")
    ops, more_ops = table(lines, "operations:")
    assert 1 <= len(ops) < 3
    assert more_ops == f"+ {3 - len(ops)} more: {3 - len(ops)} in flight, 0 ended " \
                       "(orchestrator operation ID shows one)"


def test_a_large_fleet_is_read_whole_every_few_seconds(
        fleet: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Each refresh reads the hosts shown; the whole registry only every TOTALS_SECONDS, and
    then a host not shown that changed is told (many alike, in one line)."""
    whole: list[int] = []
    services = orch.registry.services

    def counted(host: str | None = None, *, hosts: Any = None) -> Any:
        if host is None and hosts is None:
            whole.append(1)
        return services(host, hosts=hosts)

    monkeypatch.setattr(orch.registry, "services", counted)
    # Not yet time to read it whole again, however slowly the machine runs this part.
    monkeypatch.setattr(live, "TOTALS_SECONDS", 3600.0)
    watch = watching(40)
    for _ in range(4):
        watch.poll()
    assert len(whole) == 1, "the fleet is read once, then the hosts shown"
    assert len(watch.snapshot.hosts) == 40 - live.FRAME_LINES
    assert not watch.events, "nothing changed"

    # Hosts too far down the list to be shown change, and a boot is sent.
    orch.registry.set_state("sim296@sim", "down")
    for host in ("sim281", "sim282", "sim283", "sim284", "sim285", "sim286", "sim287"):
        drain(host)
    boot = operations.boot("vm9", "compute1")
    whole.clear()  # (the boot's check of its host reads the registry)
    watch.poll()
    assert not whole
    told = [line.split(" ", 1)[1] for line in watch.events]
    assert told == [f"boot {boot.id[:8]} (vm9) accepted: build_and_run_instance@compute1 queued"]
    monkeypatch.setattr(live, "TOTALS_SECONDS", 0.0)
    watch.poll()
    assert len(whole) == 1
    told = [line.split(" ", 1)[1] for line in watch.events]
    assert told[1:] == ["7 hosts up -> draining (sim281, sim282, sim283 and 4 more)",
                        "host sim296: up -> down"], told
    # Draining now, they are shown: from totals read a moment ago, not "registered".
    watch.poll()
    assert len(watch.events) == 3, list(watch.events)
    rows, _ = table(screen(watch), "hosts:")
    assert [row[0] for row in rows[:11]] == sorted(DRAINING + ["sim281", "sim282", "sim283",
                                                               "sim284", "sim285", "sim286",
                                                               "sim287"])


def test_a_small_fleet_prints_its_lines_as_before(
        broker: str, db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """No terminal: each event a plain line, every host read each refresh."""
    monkeypatch.setattr(orch.registry, "heartbeat_interval", 3600.0)
    register(["compute1", "compute2"])
    out = io.StringIO()
    watch = Watch(orch, live=False, out=out)
    watch.poll()
    register(["compute3"])
    drain("compute2")
    boot = operations.boot("vm1", "compute2")
    watch.poll()
    lines = [re.sub(r"^\d\d:\d\d:\d\d ", "", line) for line in out.getvalue().splitlines()]
    assert lines == [
        "host compute2: up -> draining", "queue compute2: 1 message(s) waiting",
        "host compute3 registered: up",
        f"boot {boot.id[:8]} (vm1) accepted: build_and_run_instance@compute2 queued"], lines


def test_hosts_named_without_a_glob_are_read_alone(
        fleet: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """What the live view reads each refresh: the named hosts' rows, seen as a glob sees them."""
    asked: list[Any] = []
    services = orch.registry.services

    def spied(host: str | None = None, *, hosts: Any = None) -> Any:
        asked.append(hosts)
        return services(host, hosts=hosts)

    monkeypatch.setattr(orch.registry, "services", spied)
    names = ("compute1", "sim017", "sim099")
    by_name = views.hosts_page(orch, only=views.HostFilter(names=names))
    assert asked == [names]
    by_glob = views.hosts_page(orch, only=views.HostFilter(names=("compute[1]", "sim017",
                                                                  "sim09[9]")))
    assert asked[1] is None, "a glob is matched against the fleet"
    assert by_name["total"] == 3 and [h["host"] for h in by_name["hosts"]] == sorted(names)
    assert [timeless(h) for h in by_name["hosts"]] == [timeless(h) for h in by_glob["hosts"]]
    assert by_name["hosts"][1]["drains"][0]["waiting_for"]["operations"] == [
        "boot at build@sim017"]


def timeless(entry: dict[str, Any]) -> dict[str, Any]:
    """A host's entry without what moves with the clock (ages, countdowns)."""
    clocked = {"heartbeat_age", "seconds", "deadline_in", "ended_ago"}
    return {**entry,
            "services": [{k: v for k, v in s.items() if k not in clocked}
                         for s in entry["services"]],
            "drains": [{k: v for k, v in d.items() if k not in clocked}
                       for d in entry["drains"]]}
