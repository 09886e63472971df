"""The package's pytest plugin (entry point ``pytest11``): ``orchestrator_fleet``.

Active wherever the package is installed; it adds one fixture and changes nothing else. See
:mod:`orchestrator.testing` for what a shutdown matrix does.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest


@pytest.fixture
def orchestrator_fleet(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                       ) -> Iterator[Callable[..., Any]]:
    """``orchestrator_fleet(orch, hosts=[...])``: real workers of ``orch``'s app, one per
    host, on ``ORCHESTRATOR_BROKER_URL`` (else an embedded Redis) and a throw-away SQLite
    ledger, this process's ``orch`` pointed at both; every worker and server is stopped
    after the test. Returns an :class:`orchestrator.testing.KitFleet`."""
    from orchestrator.seams import celery_internals
    from orchestrator.testing import KitFleet, kit_broker

    fleets: list[KitFleet] = []
    servers: list[Any] = []
    previous: list[tuple[Any, Any]] = []

    def start(orch: Any, hosts: Iterable[str], module: str | None = None,
              graceful_timeout: float = 30.0) -> KitFleet:
        workdir = tmp_path / f"orchestrator-fleet-{len(fleets) + 1}"
        workdir.mkdir(parents=True)
        broker, server = kit_broker(workdir)
        if server is not None:
            servers.append(server)
        previous.append((orch.app, orch.app.conf.broker_url))
        celery_internals.point_app_at(orch.app, broker)
        fleet = KitFleet(orch, hosts, workdir, broker, module=module,
                         graceful_timeout=graceful_timeout)
        monkeypatch.setenv("ORCHESTRATOR_DB_URL", fleet.env["ORCHESTRATOR_DB_URL"])
        fleets.append(fleet)
        return fleet.start()

    try:
        yield start
    finally:
        for fleet in fleets:
            fleet.stop()
        for server in servers:
            server.stop()
        for app, url in reversed(previous):
            celery_internals.point_app_at(app, url)
