"""The ledger behind PgBouncer in transaction mode (ORCHESTRATOR_DB_POOL_MODE=transaction), the
way to run thousands of hosts on one PostgreSQL: the schema's creation (a transaction-scoped
advisory lock), the step path's direct statements run many times over (psycopg would prepare
them on one server connection and find them missing on the next), the fleet's lease, and real
workers running Nova's operations, while the server sees no more connections than the
pooler's pool."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from celery import Celery

from orchestrator import Orchestrator
from orchestrator.ledger.engines import Database
from orchestrator.ledger.lease import Leases
from orchestrator.testing import pgbouncer, pgserver
from tests.conftest import running_fleet
from tests.helpers import assert_conserved, boot_active, ended, wait_op

POOL = 3
HOSTS = ["compute1", "compute2"]

pytestmark = pytest.mark.skipif(
    (pgserver.available() or pgbouncer.available()) is not None,
    reason=str(pgserver.available() or pgbouncer.available()))


@pytest.fixture
def bouncer(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[pgbouncer.PgBouncer, int]]:
    with pgserver.PrivatePostgres().init().serving() as server:
        server.create_database("ledger")
        pooler = pgbouncer.PgBouncer(server.port, pool_size=POOL).start()
        try:
            monkeypatch.setenv("ORCHESTRATOR_DB_POOL_MODE", "transaction")
            yield pooler, server.port
        finally:
            pooler.stop()


def server_connections(port: int) -> int:
    with psycopg.connect(f"host=127.0.0.1 port={port} user=postgres dbname=postgres",
                         autocommit=True) as conn:
        return conn.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = 'ledger'"
                            ).fetchone()[0]


def test_the_ledger_runs_through_pgbouncer_in_transaction_mode(
        bouncer: tuple[pgbouncer.PgBouncer, int], tmp_path: Path) -> None:
    pooler, port = bouncer
    (tmp_path / "routing.yaml").write_text(
        "steps:\n  prep: {queue: main, reason: r}\n  move: {queue: alt, reason: r}\n")
    orch = Orchestrator(Celery("bouncer-test"), routing=tmp_path / "routing.yaml",
                        db_url=pooler.url("ledger"))
    for name in ("prep", "move"):
        orch.step(name=name)(lambda ctx: None)
    orch.flow("two", [("prep", "a"), ("move", "b")])
    plan, hosts = [["prep", "ha"], ["move", "hb"]], {"a": "ha", "b": "hb"}
    errors: list[BaseException] = []
    peak = [0]

    def submit_and_complete(count: int) -> None:
        try:
            for _ in range(count):
                op = orch.ledger.record_new("two", plan, hosts, {}, None, "ha", None)
                for position, (step, host) in enumerate(plan):
                    start = orch.ledger.begin_step(op, position, step, host)
                    assert start.outcome == "run", start
                    orch.ledger.complete(op, position, step, host, start,
                                         output={"n": position}, next_queue=host)
                assert orch.ledger.status(op) == "completed"
                orch.ledger.stranded_steps("ha", 60, 60, 60)
                peak[0] = max(peak[0], server_connections(port))
        except BaseException as exc:  # noqa: BLE001 - raised below, in the test's thread
            errors.append(exc)

    # More clients than the pool has server connections, each statement run well past
    # psycopg's prepare threshold (5).
    threads = [threading.Thread(target=submit_and_complete, args=(15,)) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors[0]
    assert 0 < peak[0] <= POOL, f"{peak[0]} server connections for a pool of {POOL}"
    leases = Leases(Database(pooler.url("ledger")))
    assert leases.claim("looks", "a@h", 15, live_since=0, floor=5,
                        fleet_checks_per_second=0.25).held
    assert not leases.claim("looks", "b@h", 15, live_since=0, floor=5,
                            fleet_checks_per_second=0.25).held


def test_real_workers_run_novas_operations_through_pgbouncer(
        bouncer: tuple[pgbouncer.PgBouncer, int], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from nova_app import operations
    from nova_app.app import MIGRATIONS
    from orchestrator.ledger.engines import reset

    pooler, port = bouncer
    url = pooler.url("ledger")
    reset(url, [MIGRATIONS])
    with running_fleet(tmp_path, ORCHESTRATOR_DB_URL=url,
                       ORCHESTRATOR_DB_POOL_MODE="transaction") as fleet:
        monkeypatch.setenv("ORCHESTRATOR_DB_URL", url)
        fleet.start("compute1")
        fleet.start("compute2")
        ids = [boot_active(f"vm{i}", "compute1") for i in range(3)]
        moves = [operations.resize(f"vm{i}", flavor="m1.large", dest="compute2")
                 for i in range(3)]
        for op in moves:
            assert wait_op(op.id, ended, timeout=60)["status"] == "completed"
        assert server_connections(port) <= POOL
        assert_conserved(ids + [op.id for op in moves], HOSTS)
