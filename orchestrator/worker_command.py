"""The ``celery worker`` command line of one host (``orchestrator worker HOST``)."""

from __future__ import annotations

import sys
from typing import Literal

from orchestrator.registry import LEGACY_SERVICE_VERSION
from orchestrator.routing import alt_queue

QueueSet = Literal["both", "main", "alt"]


def worker_command(
    host: str, queues: QueueSet = "both", extra: tuple[str, ...] = (), legacy: bool = False,
    app: str = "orchestrator",
) -> list[str]:
    """The ``celery worker`` command line for one host (``orchestrator worker HOST``).

    ``app``: the ``-A`` argument (``orchestrator``: the application ``ORCHESTRATOR_APP`` names).
    ``legacy``: the previous service version of a rolling upgrade (``LEGACY_SERVICE_VERSION``),
    one process named like a current one (``HOST@%h``) that consumes only ``HOST``.
    """
    if legacy:
        if queues == "alt":
            raise ValueError("a legacy worker has no alt queue")
        return [
            sys.executable, "-m", "celery", "-A", app, "worker",
            "-n", f"{host}@%h", "-Q", host,
            "--service-version", str(LEGACY_SERVICE_VERSION), *extra,
        ]
    names = {"both": [host, alt_queue(host)], "main": [host], "alt": [alt_queue(host)]}[queues]
    suffix = {"both": "", "main": "-main", "alt": "-alt"}[queues]
    return [
        sys.executable, "-m", "celery", "-A", app, "worker",
        "-n", f"{host}{suffix}@%h", "-Q", ",".join(names), *extra,
    ]
