"""Shared checks for the end-to-end tests: wait on state, and count every operation."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from nova_app import views
from nova_app.app import app, orch
from orchestrator.broker import queue_depths
from orchestrator.local.fleet import wait_for
from orchestrator.routing import alt_queue
from orchestrator.testing.kit import Gate as KitGate


def wait_op(operation_id: str, until: Callable[[dict[str, Any]], bool],
            timeout: float = 30.0, what: str = "") -> dict[str, Any]:
    return views.wait_operation(operation_id, until, timeout, what)


ended = views.ended


def at_step(step: str, state: str = "running") -> Callable[[dict[str, Any]], bool]:
    def check(data: dict[str, Any]) -> bool:
        current = data["current_step"] or {}
        return current.get("step") == step and current.get("state") == state

    return check


def queued_messages(hosts: list[str]) -> int:
    return sum(queue_depths(app, [q for h in hosts for q in (h, alt_queue(h))]).values())


def assert_conserved(operation_ids: list[str], hosts: list[str]) -> dict[str, int]:
    """Every operation submitted is completed, or its next step waits in the broker: none lost,
    none failed, and exactly one message per waiting operation."""
    statuses = [views.operation_dict(op)["status"] for op in operation_ids]
    counts = {
        "submitted": len(operation_ids),
        "completed": statuses.count("completed"),
        "waiting": statuses.count("queued") + statuses.count("running"),
        "failed": statuses.count("failed"),
        "queued_messages": queued_messages(hosts),
    }
    assert counts["failed"] == 0, counts
    assert counts["submitted"] == counts["completed"] + counts["waiting"], counts
    assert counts["queued_messages"] == counts["waiting"], counts
    return counts


def boot_active(name: str, host: str) -> str:
    """Boot an instance and wait until it is ACTIVE; returns the boot operation's id."""
    from nova_app import operations

    op = operations.boot(name, host)
    assert wait_op(op.id, ended)["status"] == "completed"
    return op.id


class Gate(KitGate):
    """The test kit's gate (:class:`orchestrator.testing.kit.Gate`), for tests whose step
    merely lasting a few seconds was a race against a loaded machine; and Nova's resize."""

    def hold_resize(self, booted: str, step: str) -> None:
        """Hold ``step`` of the next resize of the instance that operation ``booted`` booted."""
        from nova_app.flows import RESIZE

        self.hold(views.operation_dict(booted)["subject"],
                  [name for name, _role in RESIZE.steps].index(step))


def resize_vm1_until(step: str, state: str = "running",
                     gate: Gate | None = None) -> tuple[str, Any]:
    """Boot vm1 on compute1, resize it to compute2, and wait until ``step`` is in ``state``:
    the moment a test sends its signal. Returns (boot id, the resize operation). With a
    ``gate``, ``step`` is held at its start until the test releases it."""
    from nova_app import operations

    booted = boot_active("vm1", "compute1")
    if gate is not None:
        gate.hold_resize(booted, step)
    op = operations.resize("vm1", flavor="m1.large", dest="compute2")
    if gate is not None:
        gate.wait_started()
    wait_op(op.id, at_step(step, state))
    return booted, op


def wait_draining(host: str) -> None:

    wait_for(lambda: any(v.state == "draining" for v in orch.registry.services(host)), 10,
             f"{host} to report draining")
