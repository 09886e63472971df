"""Nova's read-only views: instances, and operations named by their instance."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlalchemy import select

import orchestrator
from nova_app.app import orch
from nova_app.models import Instance, Migration
from nova_app.operations import find_instance

ended = orchestrator.ended


def instance_dict(instance: Instance) -> dict[str, Any]:
    return {
        "id": instance.id, "name": instance.name, "host": instance.host,
        "flavor": instance.flavor, "vm_state": instance.vm_state,
        "task_state": instance.task_state,
    }


def show_instance(ref: str) -> dict[str, Any]:
    with orch.read() as s:
        instance = find_instance(s, ref)
        out = instance_dict(instance)
        mig = s.execute(
            select(Migration).where(Migration.instance_id == instance.id)
            .order_by(Migration.id.desc())
        ).scalars().first()
        out["migration"] = None if mig is None else {
            "id": mig.id, "source": mig.source, "dest": mig.dest, "status": mig.status,
            "old_flavor": mig.old_flavor, "new_flavor": mig.new_flavor,
        }
        return out


def list_instances() -> list[dict[str, Any]]:
    with orch.read() as s:
        rows = s.execute(select(Instance).order_by(Instance.name)).scalars().all()
        return [instance_dict(i) for i in rows]


def operation_dict(operation_id: str) -> dict[str, Any]:
    """The engine's view of the operation, with the name of its instance (nova_app.app)."""
    return orch.operation(operation_id)


def wait_operation(
    operation_id: str, until: Callable[[dict[str, Any]], bool] = ended, timeout: float = 30.0,
    what: str = "",
) -> dict[str, Any]:
    """Poll the operation until ``until`` holds; its view then. TimeoutError after ``timeout``."""
    return orchestrator.wait_operation(orch, operation_id, until, timeout, what,
                                       view=operation_dict)
