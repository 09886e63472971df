"""Flower with the project's additions: ``orchestrator flower``.

It is Flower (same options, same pages, same API, same ``FLOWER_*`` variables) plus:

* on Flower's Workers page, a draining worker reads "Draining, N s left" (what it waits for
  on hover) instead of "Online", and one that exited reads "Exited";
* a **Hosts** page (``/hosts``, in Flower's navigation bar), 50 hosts a page, searched by
  name (a glob, or a part of the name) and state (``?q=compute1*&state=draining&page=2``),
  the workers asked only about the page's hosts: each host's state (up, draining,
  down once its worker is gone), a draining host's live countdown to its deadline, what the
  drain waits for (steps running there, operations still needing the host, with their current
  step and host), messages handed back, the depth of ``<host>`` and ``<host>-alt`` for every
  known host, draining and down ones included (Flower's Broker page lists only the queues live
  workers consume), and how each host's last drain ended;
* the same as JSON on ``/api/orchestrator/hosts`` (Flower's API rules: basic/OAuth auth, or
  ``FLOWER_UNAUTHENTICATED_API=true``) and on ``/hosts?json=1`` (the page's, under the page's
  rule, as Flower's ``/workers?json=1``: behind auth when it is on, open when it is off);
* an **Operations** page (``/operations``): the operations in flight first (the longest in
  their current step first), then those that ended, filtered by status, flow, host, subject
  and "stuck for N s" (``?status=in-flight&host=compute2&stuck=300&page=2``), and one
  operation's page (``/operations/<id or a unique prefix>``): its timeline per host (each step
  a bar, from ``<host>`` or ``<host>-alt``; the drains of its hosts under them; what happened
  on the way, from its history), its params, result and plan; as JSON on
  ``/api/orchestrator/operations`` and ``/api/orchestrator/operations/<id>`` (404 for an
  unknown one), read from the ledger at each request, in Flower's executor;
* the orchestrator's Prometheus metrics (:mod:`orchestrator.ops.metrics`) on Flower's ``/metrics``,
  beside Flower's own, both behind Flower's authentication when it is on (which Flower's
  stock ``/metrics`` is not).

What the Hosts page and the metrics show is read from the registry, the ledger and the
broker in the background (:class:`orchestrator.ops.refreshed.Refreshed`), never on Flower's
loop: each request answers at once from the latest read, which is at most ``HOSTS_TTL``
(``metrics.TTL``) seconds plus one read old, so a gone worker shows as down within seconds,
not as the draining it last reported; concurrent requests share one read.
Flower is imported when the command runs, not when this module is.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

from orchestrator import seams, status
from orchestrator.ledger.store import OperationQuery
from orchestrator.ops import views
from orchestrator.ops.refreshed import Refreshed
from orchestrator.seams import flower_internals

logger = logging.getLogger(__name__)

TEMPLATES = Path(__file__).parent / "templates"
HOSTS_PATH = r"/hosts"
HOSTS_API_PATH = r"/api/orchestrator/hosts"
METRICS_PATH = r"/metrics"
OPERATIONS_PATH = r"/operations"
OPERATIONS_API_PATH = r"/api/orchestrator/operations"
#: An operation's page and API: its id (or a unique prefix of it).
OPERATION_PATH = r"/operations/([0-9a-fA-F-]{4,36})"
OPERATION_API_PATH = r"/api/orchestrator/operations/([0-9a-fA-F-]{4,36})"
#: Operations on a page of the Operations tab.
OPERATIONS_PAGE_SIZE = 50
#: The Hosts page asks every 2 s: a read kept 2 s, dropped 30 s after the page closed.
HOSTS_TTL = 2.0
HOSTS_IDLE_AFTER = 30.0
#: Hosts on a page of the Hosts tab; a search's length at most; pages kept at once.
PAGE_SIZE = 50
MAX_QUERY_CHARS = 200
MAX_PAGES = 32
#: Added to Flower's navigation bar, after its Broker tab.
NAV_ITEM = """
        <li class="nav-item">
          <a class="nav-link{% if active_tab == 'hosts' %} active{% end %}"
            href="{{ reverse_url('orchestrator-hosts') }}"
            {% if active_tab == 'hosts' %}aria-current="page"{% end %}>Hosts</a>
        </li>
        <li class="nav-item">
          <a class="nav-link{% if active_tab == 'operations' %} active{% end %}"
            href="{{ reverse_url('orchestrator-operations') }}"
            {% if active_tab == 'operations' %}aria-current="page"{% end %}>Operations</a>
        </li>
"""

WORKERS_SCRIPT = '\n{% include "orchestrator_workers_status.html" %}\n'


def snapshot(orch: Any, only: views.HostFilter | None = None) -> dict[str, Any]:
    """What the Hosts page and its API show: the hosts ``only`` lets through (a page of
    them), read now, with what each of their live workers says of the ledger, and how many
    match in all; while the ledger does not answer, since when and the workers that answer
    over the broker (no host judged down for a heartbeat it could not write)."""
    from orchestrator.errors import LedgerUnavailable

    only = only or views.HostFilter(limit=PAGE_SIZE)
    base = {"generated_at": time.time(), "alt_routing": orch.settings.alt_routing}
    try:
        return {**base, "ledger": {"up": True},
                **views.hosts_page(orch, with_reports=True, only=only)}
    except LedgerUnavailable as exc:
        return {**base, "hosts": [], **views.ledger_outage(orch, exc, views.worker_reports(orch))}


def host_filter(args: dict[str, str]) -> views.HostFilter:
    """The page's query (``?q=GLOB&state=STATE&page=N``, each optional) as a filter; what
    cannot be one is left out (a page past the last shows none)."""
    pattern = args.get("q", "").strip()[:MAX_QUERY_CHARS]
    state = args.get("state", "")
    try:
        page = max(1, int(args.get("page", "1")))
    except ValueError:
        page = 1
    return views.HostFilter(
        names=(pattern if any(c in pattern for c in "*?[") else f"*{pattern}*",)
        if pattern else (),
        states=(state,) if state in ("up", "draining", "down") else (),
        limit=PAGE_SIZE, offset=(page - 1) * PAGE_SIZE)


def operation_query(args: dict[str, str]) -> OperationQuery:
    """The Operations page's query (``?status=&flow=&host=&subject=&stuck=&page=``, each
    optional) as a query; what cannot be one is left out."""
    def text(name: str) -> str | None:
        return args.get(name, "").strip()[:MAX_QUERY_CHARS] or None

    status = args.get("status", "")
    try:
        stuck = float(args["stuck"]) if args.get("stuck") else None
    except ValueError:
        stuck = None
    try:
        page = max(1, int(args.get("page", "1")))
    except ValueError:
        page = 1
    statuses = {"in-flight": ("queued", "running")}.get(status, (status,))
    return OperationQuery(
        statuses=statuses if set(statuses) <= {"queued", "running", "completed", "failed"}
        else (),
        flow=text("flow"), subject=text("subject"), host=text("host"),
        stuck_after=stuck if stuck is not None and stuck >= 0 else None,
        limit=OPERATIONS_PAGE_SIZE, offset=(page - 1) * OPERATIONS_PAGE_SIZE)


def operations_read(orch: Any, args: dict[str, str]) -> dict[str, Any]:
    """The Operations page and its API: one page of operations, read now."""
    return {"generated_at": time.time(),
            **views.operations_page(orch, operation_query(args))}


def operation_read(orch: Any, args: dict[str, str], operation_id: str) -> dict[str, Any]:
    """One operation's page and its API: the operation with its timeline, read now."""
    return {"generated_at": time.time(), **status.operation_dict(
        orch, orch.ledger.resolve(operation_id), with_timeline=True)}


class HostPages:
    """One kept read per page asked for (:class:`Refreshed`: each stops reading once nobody
    has asked for it for ``HOSTS_IDLE_AFTER`` seconds), at most ``MAX_PAGES`` of them."""

    def __init__(self, orch: Any) -> None:
        self.orch = orch
        self._pages: dict[views.HostFilter, Refreshed] = {}
        self._lock = threading.Lock()

    def get(self, args: dict[str, str]) -> dict[str, Any]:
        only = host_filter(args)
        dropped = []
        with self._lock:
            kept = self._pages.pop(only, None)
            if kept is None:
                kept = Refreshed(lambda: snapshot(self.orch, only), HOSTS_TTL,
                                 HOSTS_IDLE_AFTER, "orchestrator-hosts")
            self._pages[only] = kept  # the most recently asked last
            while len(self._pages) > MAX_PAGES:
                dropped.append(self._pages.pop(next(iter(self._pages))))
        for old in dropped:  # its thread joined outside the lock: other pages do not wait
            old.close()
        return kept.get()


def patch_flower_template(name: str, text: str) -> str:
    """Flower's navbar gains the Hosts tab; its Workers page shows draining and exited
    workers as such (a script after Flower's own, which restyles the Status column)."""
    if name == "navbar.html":
        head, sep, tail = text.partition("</ul>")
        return head + NAV_ITEM + sep + tail
    if name == "workers.html":
        block = "{% block extra_scripts %}"
        return text.replace(block, block + WORKERS_SCRIPT, 1)
    return text


def handlers(orch: Any) -> list[Any]:
    """The Hosts page, its API and ``/metrics``, as Flower handlers (Flower's authentication
    applies), each answered from a read kept in the background."""
    from prometheus_client import CollectorRegistry, generate_latest

    from orchestrator.ops.metrics import OrchestratorCollector

    hosts = HostPages(orch)
    ours = CollectorRegistry(auto_describe=False)
    ours.register(OrchestratorCollector(orch))
    return [
        *flower_internals.page_and_api(
            HOSTS_PATH, HOSTS_API_PATH, "orchestrator-hosts", "orchestrator_hosts.html",
            active_tab="hosts", read=hosts.get),
        *flower_internals.page_and_api(
            OPERATIONS_PATH, OPERATIONS_API_PATH, "orchestrator-operations",
            "orchestrator_operations.html", active_tab="operations",
            read=lambda args: operations_read(orch, args)),
        *flower_internals.page_and_api(
            OPERATION_PATH, OPERATION_API_PATH, "orchestrator-operation",
            "orchestrator_operation.html", active_tab="operations",
            read=lambda args, operation_id: operation_read(orch, args, operation_id)),
        flower_internals.metrics(METRICS_PATH, "orchestrator-metrics",
                                 lambda: generate_latest(ours)),
    ]


def make_flower(orch: Any, options: Any, settings: dict[str, Any]) -> Any:
    """Flower on ``orch``'s Celery app, with the Hosts page, its API and the metrics."""
    orch.db.reads_create = False  # Flower only looks: it creates nothing in the ledger
    loader = flower_internals.template_loader(TEMPLATES, settings["template_path"],
                                              patch_flower_template)
    return flower_internals.make_app(orch.app, options, settings, loader, handlers(orch))


def run(orch: Any, argv: list[str], prog: str = "orchestrator flower") -> None:
    """What ``celery flower`` does, on ``orch``'s app, with the additions."""
    options, settings = flower_internals.command_line(prog, argv)
    seams.check(logger, ("celery", "kombu", "flower"))  # once Flower's logging is set up
    app = make_flower(orch, options, settings)

    def started(port: int) -> None:
        print(f"orchestrator: hosts and drains at {_base_url(options, port)}"
              f"{HOSTS_PATH.lstrip('/')}", flush=True)

    flower_internals.serve(app, orch.app, settings, started)


def _base_url(options: Any, port: int) -> str:
    address = options.address or "127.0.0.1"
    prefix = (options.url_prefix or "").strip("/")
    return f"http://{address}:{port}/" + (prefix + "/" if prefix else "")
