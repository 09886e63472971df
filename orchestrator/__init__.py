"""Celery task orchestration with Nova-style shutdown-aware routing, for any Celery app.

::

    from celery import Celery
    from orchestrator import Orchestrator, StepFailure

    app = Celery("rebalance")
    orch = Orchestrator(app, routing="routing.yaml")

Importing this package (or any module of the engine) builds no app, reads no file, opens no
connection and patches nothing: the names below are resolved on first use.

``celery -A orchestrator worker ...`` finds the reference application (Nova's compute steps,
``ORCHESTRATOR_APP`` to name another) as ``orchestrator.app``.
"""

from __future__ import annotations

import importlib
from typing import Any

#: Public name -> the module that defines it.
_EXPORTS = {
    "Orchestrator": "orchestrator.api",
    "StepContext": "orchestrator.context",
    "load_app": "orchestrator.api",
    "StepFailure": "orchestrator.errors",
    "OrchestratorError": "orchestrator.errors",
    "ConfigError": "orchestrator.errors",
    "DefinitionError": "orchestrator.errors",
    "SubmitError": "orchestrator.errors",
    "SubjectBusy": "orchestrator.errors",
    "UnknownFlow": "orchestrator.errors",
    "UnknownOperation": "orchestrator.errors",
    "BrokerUnavailable": "orchestrator.errors",
    "LedgerUnavailable": "orchestrator.errors",
    "SchemaError": "orchestrator.errors",
    "RoutingError": "orchestrator.routing",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    if name == "app":
        # `celery -A orchestrator`: the application named by ORCHESTRATOR_APP (by name: the
        # engine imports no application).
        from orchestrator.api import load_app

        return load_app(None).app
    raise AttributeError(f"module 'orchestrator' has no attribute {name!r}")
