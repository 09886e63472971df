"""Nova's Celery app and its orchestrator: ``celery -A nova_app.app worker`` (or, as before,
``celery -A orchestrator worker``: the engine's default application is this one).

The broker is ``ORCHESTRATOR_BROKER_URL`` (the orchestrator's default for an app without a
broker of its own), the routing file ``ORCHESTRATOR_ROUTING_FILE``, else ``./routing.yaml``,
else the repository's ``routing.yaml``, which the package carries (so the CLI and the demo
work from any directory, in a clone or from an installed wheel). The
steps and flows live in :mod:`nova_app.steps`, which Celery imports by name (``include``).
"""

from __future__ import annotations

import sys
from pathlib import Path

from celery import Celery

from nova_app.flows import TASK_PREFIX
from nova_app.models import Instance
from orchestrator import Orchestrator, OrchestratorError
from orchestrator.ops.cli import fail

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
#: Nova's routing table, found from any working directory (ORCHESTRATOR_ROUTING_FILE or a
#: ./routing.yaml win): the repository's routing.yaml, through nova_app/routing.yaml, a link to
#: it in the clone and a copy in an installed wheel (package data), where no repository is.
ROUTING = (Path(__file__).parent / "routing.yaml").resolve()

app = Celery("orchestrator", include=["nova_app.steps"])
# Non-step tasks only (a host queue carries steps and nothing else).
app.conf.task_default_queue = "orchestrator"
try:
    orch = Orchestrator(
        app, migrations=MIGRATIONS, task_prefix=TASK_PREFIX, commands="nova_app.cli:COMMANDS",
        default_routing=ROUTING,
    )
except OrchestratorError as exc:  # a bad ORCHESTRATOR_* setting: one line, no traceback
    fail("--json" in sys.argv, str(exc))  # as every command's error: `error: ...`, exit 2


@orch.describe
def _instance_name(session, operation, data) -> None:
    """An operation's view names its instance."""
    instance_id = (operation.params or {}).get("instance_id")
    instance = session.get(Instance, instance_id) if instance_id else None
    data["instance"] = instance.name if instance is not None else instance_id
