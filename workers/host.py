"""Worker bootstep: the host this worker serves, in the registry, with its heartbeat.

A worker of this package consumes ``<host>`` and/or ``<host>-alt``. :class:`HostService`
finds the host from the queues Celery was told to consume (``-Q``), registers the worker in the
ledger (what it consumes, the steps its code serves, its code version) before the consumer
starts, and keeps its heartbeat from a thread (:mod:`workers.heartbeat`). It hangs on the
worker as ``worker.host_service``, as Celery's own components hang theirs (``worker.pool``,
``worker.timer``); every other bootstep of this package requires it.

A worker with no host queue (a plain Celery worker of the same app) gets no host service, and
the package's other bootsteps do nothing on it.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from typing import Any, NoReturn

from celery import bootsteps
from celery.exceptions import WorkerShutdown
from celery.utils.log import get_logger

from orchestrator import registry, seams
from orchestrator.errors import ConfigError, LedgerUnavailable, OrchestratorError
from orchestrator.names import host_problem
from orchestrator.redact import error_text, redact_url
from orchestrator.routing import split_queue
from orchestrator.seams import celery_internals as celery_seam
from orchestrator.witness import Witness
from workers.heartbeat import Heartbeat

logger = get_logger(__name__)


def refuse(message: str) -> NoReturn:
    """Stop this worker's start as every command's error is said: one line, ``error: ...``,
    on the process's own stderr (Celery's log may have taken ``sys.stderr``), exit status 2."""
    print(f"error: {message}", file=sys.__stderr__, flush=True)
    raise SystemExit(2)


def orchestrator_of(app: Any) -> Any:
    """The Orchestrator installed on ``app`` (``Orchestrator(app, ...)`` hangs it there)."""
    orch = getattr(app, "orchestrator", None)
    if orch is None:
        refuse(f"Celery app {app.main!r} has no Orchestrator")
    return orch


@dataclass(frozen=True)
class HostQueues:
    """The queues of one host that this worker consumes, told apart by the ``-alt`` suffix."""

    host: str
    main: str | None
    alt: str | None

    @classmethod
    def from_queue_names(cls, names: list[str], default_queue: str) -> HostQueues | None:
        """The host of ``names`` (``-Q``), or None when none is a host queue; a
        :class:`ConfigError` (one line) when they name two hosts or a name that cannot be
        one (``orchestrator.names``: the broker's and Celery's own)."""
        hosts: dict[str, dict[str, str]] = {}
        for name in names:
            if name == default_queue:
                continue
            host, kind = split_queue(name)
            hosts.setdefault(host, {})[kind] = name
        if not hosts:
            return None
        if len(hosts) > 1:
            raise ConfigError(
                "a worker serves one host; -Q names queues of hosts "
                + ", ".join(sorted(hosts)) + " (start one worker per host)"
            )
        host, kinds = next(iter(hosts.items()))
        problem = host_problem(host, default_queue)
        if problem is not None:
            raise ConfigError(f"-Q {','.join(names)}: host {host!r} {problem}")
        return cls(host=host, main=kinds.get("main"), alt=kinds.get("alt"))

    def owns(self, queue: str) -> bool:
        """``queue`` is one of this host's two queues."""
        return split_queue(queue)[0] == self.host


def host_service_of(worker: Any) -> HostService | None:
    """The worker's host service, if it serves a host (None on a plain worker)."""
    service = getattr(worker, "host_service", None)
    return service if service is not None and service.queues is not None else None


class HostService(bootsteps.StartStopStep):
    """Register the host, keep its heartbeat, mark it down at stop."""

    label = "HostService"
    requires = ("celery.worker.components:Timer", "celery.worker.components:Pool")

    def __init__(self, worker, service_version: int | None = None, **kwargs) -> None:
        self.orch = orch = orchestrator_of(worker.app)
        try:
            # A worker with a broken routing.yaml refuses to start, with file, line and key;
            # one whose database has an older schema, with the command to run.
            orch.routing  # noqa: B018
            orch.db.engine()
        except LedgerUnavailable:
            # Not a configuration error: start() waits for the ledger before it registers,
            # as Celery waits for its broker, and checks the schema then.
            pass
        except OrchestratorError as exc:
            refuse(str(exc))
        seams.check(logger, ("celery", "kombu", "billiard"))
        # Celery set the queues of -Q (WorkController.setup_queues) before it made the
        # bootsteps: a -Q this worker cannot serve stops it here, in one line, before it
        # connects to anything.
        names = list(worker.app.amqp.queues.consume_from or {})
        try:
            self.expected = HostQueues.from_queue_names(
                names, worker.app.conf.task_default_queue)
        except ConfigError as exc:
            refuse(str(exc))
        #: What this worker registers: a legacy (version 1) worker consumes only ``<host>``.
        self.version = registry.SERVICE_VERSION if service_version is None else service_version
        if (self.expected is not None and self.expected.alt is not None
                and self.version < registry.ALT_SERVICE_VERSION):
            refuse(
                f"service version {self.version} cannot consume "
                f"{self.expected.alt}: a legacy worker consumes only {self.expected.host} "
                "(orchestrator worker HOST --legacy)")
        self.queues: HostQueues | None = None
        self.nodename = ""
        self.pid = os.getpid()
        #: When this worker registered (set in start): steps it started began after this.
        self.started_at = 0.0
        #: How many workers the fleet had when this one registered, itself included.
        self.fleet_size = 1
        #: What the heartbeat writes: ``up``, or ``draining`` once the drain has begun.
        self.state = "up"
        self.heartbeat: Heartbeat | None = None
        #: Asks a worker silent in the registry whether it is alive, over the broker.
        self.witness = Witness(worker.app)
        worker.host_service = self

    def start(self, worker) -> None:
        queues = self.expected
        if queues is None:
            logger.info("orchestrator: no host queue among %s; plain Celery worker",
                        list(worker.app.amqp.queues.consume_from or {}))
            return
        self.nodename, self.pid = worker.hostname, os.getpid()
        self._register(queues)
        self.queues = queues
        # Celery's Request knows its app, not its worker: the one link from a step's request
        # to the bootsteps of the worker running it (workers.request.StepRequest).
        self.orch.worker = worker
        self.heartbeat = Heartbeat(self.orch, worker.hostname,
                                   self.orch.settings.heartbeat_interval, lambda: self.state,
                                   lambda: self._write_row(queues))
        self.heartbeat.start()

    def _register(self, queues: HostQueues) -> None:
        """Register this worker's host, waiting for the ledger first, as Celery waits for its
        broker at start (``broker_connection_retry_on_startup``): the consumer starts after
        this step, so nothing is consumed until what runs can be recorded. A SIGTERM or
        SIGQUIT meanwhile ends the worker, exit 0, having taken nothing."""
        delay = 1.0
        while True:
            try:
                self.orch.db.engine()  # the schema check that __init__ could not make
                self.started_at = time.time()
                self._write_row(queues)
                return
            except LedgerUnavailable as exc:
                logger.error("orchestrator: %s; trying again in %g s (consuming nothing until "
                             "then)", exc, delay)
            except OrchestratorError as exc:  # an older schema: the command to run
                refuse(str(exc))
            until = time.monotonic() + delay
            while time.monotonic() < until:
                if celery_seam.shutdown_requested():
                    logger.warning("orchestrator: stopped while waiting for the ledger at %s",
                                   redact_url(self.orch.db.url))
                    raise WorkerShutdown(0)
                time.sleep(0.1)
            delay = min(10.0, delay * 2)

    def _write_row(self, queues: HostQueues) -> None:
        """This worker's row in the registry, as it stands (its state, when it started)."""
        self.fleet_size = self.orch.registry.register(
            self.nodename, queues.host, pid=self.pid, version=self.version,
            consumes_main=queues.main is not None, consumes_alt=queues.alt is not None,
            steps=self.orch.served_steps(), code_version=self.orch.code_fingerprint,
            state=self.state, started_at=self.started_at)

    def stop(self, worker) -> None:
        if self.queues is None:
            return
        if self.heartbeat is not None:
            self.heartbeat.stop()
        try:
            self.orch.registry.set_state(worker.hostname, "down")
        except Exception as exc:  # the database may be what failed; exit anyway
            logger.warning("orchestrator: could not mark %s down: %s", worker.hostname,
                           error_text(exc))
        self.orch.worker = None

    terminate = stop

    def info(self, worker) -> dict:
        if self.queues is None:
            return {}
        return {"ledger": self.orch.ledger_health.as_dict()}
