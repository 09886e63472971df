"""Nova's scale: the looks every host needs, done once for the fleet by the holder of a lease
(orchestrator/ledger/lease.py, workers/fleet.py), and ledger connections a process holds only
while it uses them (orchestrator/ledger/idle.py). On SQLite, and on PostgreSQL with
ORCHESTRATOR_TEST_DB_URL."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import nova_app.steps  # noqa: F401  (the flows, registered at import)
from orchestrator.ledger.engines import Database, _direct_for, _engine, reset
from orchestrator.ledger.idle import IdleConnections
from orchestrator.ledger.lease import (
    BACKSTOP_SECONDS,
    MAX_CHECK_SECONDS,
    LeaseHolder,
    Leases,
    check_every,
)
from orchestrator.ledger.statements import statements_for
from orchestrator.local.fleet import Fleet
from orchestrator.looks import FLEET_LEASE
from orchestrator.registry import Registry
from tests.helpers import ended, wait_op

ASK = {"floor": 5.0, "fleet_checks_per_second": 0.25}


@pytest.fixture
def database(tmp_path: Path) -> Iterator[Database]:
    url = os.environ.get("ORCHESTRATOR_TEST_DB_URL") or f"sqlite:///{tmp_path / 'l.db'}"
    if not url.startswith("sqlite"):
        reset(url)
    yield Database(url)


def test_one_worker_holds_the_lease_and_the_next_takes_it_when_it_runs_out(
        database: Database) -> None:
    leases = Leases(database)
    first = leases.claim("looks", "a@h1", 15, live_since=0, **ASK)
    assert first.held and first.term == 1
    other = leases.claim("looks", "b@h2", 15, live_since=0, **ASK)
    assert not other.held and other.holder == "a@h1" and other.check_every == 5.0
    renewed = leases.claim("looks", "a@h1", 15, live_since=0, **ASK)
    assert renewed.held and renewed.term == 1, "a renewal is the same term"
    # The holder stops renewing (it died): its lease has run out, the next ask takes it.
    assert leases.claim("looks", "a@h1", -1, live_since=0, **ASK).held
    taken = leases.claim("looks", "b@h2", 15, live_since=0, **ASK)
    assert taken.held and taken.term == 2
    assert not leases.claim("looks", "a@h1", 15, live_since=0, **ASK).held
    leases.release("looks", "a@h1")  # not its lease any more: nothing changes
    assert leases.read("looks").holder == "b@h2" and leases.read("looks").held
    leases.release("looks", "b@h2")  # a worker that stops gives it up
    assert not leases.read("looks").held
    assert leases.claim("looks", "a@h1", 15, live_since=0, **ASK).term == 3


def test_the_fleet_asks_for_the_lease_at_the_same_pace_whatever_its_size(
        database: Database) -> None:
    """The holder sets how often each other worker asks from the number of live workers:
    40 workers ask every 160 s each, the fleet together every 4 s; never less often than
    every 15 minutes (a fleet of 10,000 that shrinks to a few must find a holder)."""
    registry = Registry(database)
    for i in range(40):
        registry.register(f"w@h{i}", f"h{i}", consumes_main=True, consumes_alt=True, pid=i)
    registry.set_state("w@h0", "down")
    leases = Leases(database)
    assert leases.claim("looks", "w@h1", 15, live_since=time.time() - 60, **ASK).held
    assert leases.read("looks").check_every == check_every(39, **ASK) == 39 / 0.25
    assert check_every(200, **ASK) / 200 == check_every(40, **ASK) / 40
    assert check_every(10_000, **ASK) == MAX_CHECK_SECONDS == 900
    assert check_every(1, **ASK) == 5.0


def test_a_worker_whose_heartbeat_watches_the_lease_asks_once_it_saw_it_free(
        database: Database) -> None:
    """Each heartbeat reads when the fleet's lease runs out, in its own transaction: a fleet
    of 40 beating every 60 s reads it more often than its asks would (every 160 s each), so a
    worker that does not hold it asks only once a beat saw it free (and hourly as a
    backstop); a fleet of 2 still asks at the holder's pace. Counted in statements, not time."""
    from orchestrator.looks import fleet_lease

    registry = Registry(database)
    for i in range(40):
        registry.register(f"w@h{i}", f"h{i}", consumes_main=True, consumes_alt=True, pid=i)
    leases = Leases(database)
    holder, other = (fleet_lease(leases, f"w@h{i}", 60.0) for i in (1, 2))
    other.watched_every(60.0)
    assert holder.hold() and holder.last.check_every == check_every(40, **ASK) == 160
    assert not other.hold()  # its first ask: the holder's
    asks = other.last
    assert other.ask_at - time.monotonic() > 0.5 * BACKSTOP_SECONDS - 1, "a backstop only"
    assert not other.hold() and other.last is asks, "no statement until its turn"

    beat = registry.heartbeat("w@h2", "up", lease=FLEET_LEASE)
    assert beat.found and beat.read_lease and beat.lease_expires_at == holder.until
    other.seen(beat.lease_expires_at)
    assert not other.hold() and other.last is asks, "held by another: still no ask"

    holder.give_up()  # the holder stopped (or died: its lease ran out)
    beat = registry.heartbeat("w@h2", lease=FLEET_LEASE)
    other.seen(beat.lease_expires_at)
    assert other.hold() and other.last is not asks and other.last.term == 2, "taken at once"
    assert registry.heartbeat("w@h3").read_lease is False  # a beat alone reads no lease

    # Three live workers: their heartbeats would notice a free lease up to a minute late;
    # they ask at the holder's pace (12 s each, spread by half either way).
    for i in range(3, 40):
        registry.set_state(f"w@h{i}", "down")
    small = [LeaseHolder(leases, "small", f"w@h{i}", ttl=15, renew=5, live_window=180, **ASK)
             for i in (1, 2)]
    small[1].watched_every(60.0)
    assert small[0].hold() and small[0].last.check_every == 12
    assert not small[1].hold()
    assert small[1].ask_at - time.monotonic() <= 1.5 * 12


def test_idle_connections_are_closed_and_the_next_statement_connects_again(
        database: Database) -> None:
    if database.url.startswith("sqlite"):
        pytest.skip("PostgreSQL (ORCHESTRATOR_TEST_DB_URL): only its connections are closed "
                    "when idle; SQLite's are a file's and stay")

    statement = statements_for(database.url).status
    direct, pooled = _direct_for(database.url), _engine(database.url, False)
    direct.give_back_if_idle(0)  # what this process's earlier tests left: closed
    direct.engine.pool.dispose()
    pooled.pool.dispose()
    assert database.direct(statement, id="none") == []
    assert direct.kept is not None, "the main thread keeps its connection while in use"
    # Two connections idle in the other pool (two threads met before it was watched):
    # not taken for "two not needed at once since ever".
    first, second = pooled.raw_connection(), pooled.raw_connection()
    first.close()
    second.close()
    with database.read() as s:
        s.execute(statement.params(id="none"))
    closer = IdleConnections(idle_after=3600, give_back_after=3600)
    closer.watch_direct(direct)
    closer.watch(direct.engine)
    closer.watch(pooled)
    assert closer.close_idle() == 0, "used a moment ago: kept"
    closer.give_back_after = 0
    kept = direct.kept.dbapi_connection
    assert closer.close_idle() == 1 and direct.kept is None, "given back to the pool"
    # Another thread (the heartbeat's) now takes the very connection the main thread kept:
    # one connection for both, not one each.
    seen: list[object] = []

    def other_thread() -> None:
        with direct._connection(main=False) as connection:
            seen.append(connection.dbapi_connection)

    thread = threading.Thread(target=other_thread)
    thread.start()
    thread.join()
    assert seen == [kept] and direct.engine.pool.checkedin() == 1
    closer.idle_after = 0
    assert closer.close_idle() >= 2, "the pools' idle connections"
    assert direct.engine.pool.checkedin() == 0
    assert pooled.pool.checkedin() == 0
    assert database.direct(statement, id="none") == []
    with database.read() as s:
        s.execute(statement.params(id="none"))


def test_a_second_connection_made_for_a_moment_is_closed_once_not_needed(
        database: Database) -> None:
    """A heartbeat that met a look made the pool a second connection; handed out in turn,
    both stay in use. Once two have not been needed at once for the idle time, the pool's
    idle ones are closed, though the engine is used all along."""
    if database.url.startswith("sqlite"):
        pytest.skip("PostgreSQL (ORCHESTRATOR_TEST_DB_URL): only its connections are closed "
                    "when idle; SQLite's are a file's and stay")
    engine = _engine(database.url, False)
    database.direct(statements_for(database.url).status, id="none")
    now = [1000.0]
    closer = IdleConnections(idle_after=90, give_back_after=3600, clock=lambda: now[0])
    closer.watch(engine)
    first, second = engine.raw_connection(), engine.raw_connection()  # two threads met
    first.close()
    second.close()
    assert engine.pool.checkedin() >= 2
    for _ in range(4):  # used every 30 s, one at a time
        now[0] += 30
        engine.raw_connection().close()
        if now[0] - 1000 < 90:
            assert closer.close_idle() == 0, "two were needed less than 90 s ago"
    assert closer.close_idle() == 1 and engine.pool.checkedin() == 0
    engine.raw_connection().close()
    assert closer.close_idle() == 0, "one kept, used: stays"


def test_a_worker_whose_row_was_deleted_writes_it_again_as_it_was(fleet: Fleet) -> None:
    """An operator's cleanup deleted a live worker's registry row: its next heartbeat finds
    none and writes it again, with the state and start it had (not taken for a new worker,
    nor left unseen while its steps are taken for stranded)."""
    from nova_app.app import orch
    from orchestrator.ledger.models import Service

    worker = fleet.start("compute1")
    (before,) = orch.registry.services("compute1")
    with orch.db.session() as s:
        s.delete(s.get(Service, before.nodename))
    # (not read back here: the next heartbeat may write it again at once; its log says so)
    deadline = time.monotonic() + 20
    while not (after := orch.registry.services("compute1")):
        assert time.monotonic() < deadline, worker.log()[-3000:]
        time.sleep(0.2)
    assert (after[0].nodename, after[0].state, after[0].started_at) == (
        before.nodename, "up", before.started_at)
    assert "has no row in the registry (deleted?); registering again" in worker.log()


def test_the_lease_holder_sends_an_idle_hosts_unsent_step_and_a_killed_holder_is_replaced(
        fleet: Fleet) -> None:
    """Two hosts: the lease's holder sends a step whose sender died, for a host whose own
    worker has stopped looking (idle); SIGKILLed, the holder is replaced once its lease runs
    out, and the new one sends the next such step."""
    from nova_app.app import orch
    from nova_app.models import Instance

    workers = [fleet.start("compute1"), fleet.start("compute2")]
    deadline = time.monotonic() + 30
    while (holder := orch.leases.read(FLEET_LEASE)) is None or not holder.held:
        assert time.monotonic() < deadline, "nobody took the fleet's lease"
        time.sleep(0.2)
    first = holder.holder
    holder_worker, other_host = (workers[0], "compute2") if first.startswith("compute1@") \
        else (workers[1], "compute1")
    other = workers[1] if holder_worker is workers[0] else workers[0]

    def unsent(name: str) -> str:
        with orch.transaction() as s:  # recorded, its sender died before publishing
            instance = Instance(name=name, host=other_host, flavor="m1.small",
                                vm_state="building", task_state="spawning")
            s.add(instance)
            s.flush()
            return orch._record(s, orch.flows["boot"], {"source": other_host},
                                {"instance_id": instance.id}, instance.id)

    op = unsent("vm1")
    assert wait_op(op, ended, timeout=30)["status"] == "completed"
    holder_worker.signal(signal.SIGKILL)
    holder_worker.wait(timeout=10)
    deadline = time.monotonic() + 45
    while (claim := orch.leases.read(FLEET_LEASE)) is None or not claim.held \
            or claim.holder == first:
        assert time.monotonic() < deadline, f"the lease stayed with {first}: {claim}"
        time.sleep(0.2)
    assert claim.term >= 2 and claim.holder.startswith(f"{other_host}@")
    op = unsent("vm2")
    assert wait_op(op, ended, timeout=30)["status"] == "completed"
    assert f"resent build_and_run_instance of {op} to {other_host}: it was never sent" \
        in other.log()
