"""Prometheus metrics of hosts and drains, in the conventions of celery-exporter and Flower.

``orchestrator metrics --port 9808`` serves them on ``/metrics`` (and ``orchestrator flower``
beside Flower's own). One read of the service registry, the ledger and the broker (a few
indexed queries, one passive queue declare per queue, one ``workers.status`` broadcast that
ends once every live worker answered, after a second at most) is kept and renewed in the
background every ``TTL`` seconds while scrapes come (:class:`orchestrator.ops.refreshed.Refreshed`):
a scrape answers from it at once, concurrent scrapes share it, and what it shows is at most
``TTL`` seconds plus one read old. After ``IDLE_AFTER`` seconds without a scrape the reading
stops, and the next scrape waits for one read. Nothing else is kept in the exporter, and any
number of exporters can run. The names:

=========================================================  ======  ===============================
``orchestrator_host_state{host,state}``                    gauge   1 for the host's state (up,
                                                                   draining, down), 0 for others
``orchestrator_host_service_version{host}``                gauge   version of its live services
``orchestrator_drain_deadline_remaining_seconds{host}``    gauge   until a draining host's deadline
``orchestrator_drain_waiting_operations{host}``            gauge   operations its drain waits for
``orchestrator_operations_in_flight{host}``                gauge   operations that still need it
``orchestrator_steps_unserved{host}``                      gauge   steps waiting for a worker
                                                                   whose code serves them
``orchestrator_queue_messages{host,queue,kind}``           gauge   messages waiting in ``<host>``
                                                                   (main) and ``<host>-alt`` (alt)
``orchestrator_drain_handed_back_total{host}``             counter messages drains handed back
``orchestrator_drains_total{host,outcome}``                counter drains ended: done, deadline,
                                                                   second-sigterm, forced
``orchestrator_drain_duration_seconds{host}``              summary duration of ended drains
``orchestrator_alt_fallbacks_total{host,reason}``          counter alt steps sent to ``<host>``
``orchestrator_ledger_reachable``                          gauge   1 if this exporter reached
                                                                   the ledger at its last read
``orchestrator_ledger_up{worker,host}``                    gauge   1 if the worker reaches the
                                                                   ledger (it says so over the
                                                                   broker)
``orchestrator_ledger_errors_total{worker,host}``          counter its failed ledger attempts
``orchestrator_steps_recovered_total{worker,host}``        counter steps it sent again
=========================================================  ======  ===============================

The last three come from the workers over the broker (``workers.status``), so they are there
while the ledger is down; then the metrics read from the ledger are left out of the scrape.

A fleet of thousands of hosts would make tens of thousands of series and ask every queue and
every worker at each read: per-host series are kept for ``ORCHESTRATOR_METRICS_MAX_HOSTS``
hosts at most (500 by default; :func:`series_hosts` says which: draining first, then those
with work in flight, then by name), and only their queues and workers are asked. The fleet's
totals are always there:

=========================================================  ======  ===============================
``orchestrator_hosts{state}``                              gauge   hosts up, draining, down
``orchestrator_hosts_in_series``                           gauge   hosts with per-host series
=========================================================  ======  ===============================

A drain whose worker is gone without recording its end (the exit deadline forced it, or it was
killed) counts as ``forced``.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from typing import Any

from orchestrator import registry
from orchestrator.broker import queue_depths
from orchestrator.ops.refreshed import Refreshed
from orchestrator.ops.views import unserved_steps, worker_reports
from orchestrator.routing import alt_queue

HOST_STATES = ("up", "draining", "down")
DRAIN_OUTCOMES = ("done", "deadline", "second-sigterm", "forced")


#: Seconds between two reads while scrapes come; what a scrape shows is at most this plus
#: one read old.
TTL = 2.0
#: Seconds without a scrape after which the reading stops (Prometheus scrapes every minute
#: by default: past that, a scrape would find nothing kept).
IDLE_AFTER = 90.0


def series_hosts(views: list[registry.ServiceView], in_flight: dict[str, int],
                 limit: int) -> list[str]:
    """The hosts that get per-host series, ``limit`` at most: the draining ones first, then
    those with operations in flight, then the others by name; sorted by name."""
    hosts = sorted({v.host for v in views})
    if len(hosts) <= limit:
        return hosts
    states = registry.host_states(views)
    draining = {h for h in hosts if states[h] == "draining"}
    ranked = sorted(hosts, key=lambda h: (h not in draining, not in_flight.get(h), h))
    return sorted(ranked[:limit])


class OrchestratorCollector:
    """A prometheus_client collector: :meth:`read` gives every family, read now; a scrape
    (:meth:`collect`) answers from the read kept in the background (``kept=True``) or reads
    (``kept=False``: ``orchestrator metrics --once``)."""

    def __init__(self, orch: Any, kept: bool = True) -> None:
        self.orch = orch
        self.kept = Refreshed(self.read, TTL, IDLE_AFTER, "orchestrator-metrics") \
            if kept else None

    def describe(self) -> list:  # no metrics at registration: collect() reads the ledger
        return []

    def collect(self) -> Iterator[Any]:
        yield from (self.kept.get() if self.kept is not None else self.read())

    def close(self) -> None:
        if self.kept is not None:
            self.kept.close()

    def read(self) -> list[Any]:
        """Every family, from one read of the registry, the ledger and the broker. The
        ``workers.status`` broadcast ends once every worker the registry calls live answered
        (Celery's ``broadcast(limit=)``), after a second at most (as the Hosts page's); with
        none live, or the ledger not answering, it hears whoever answers within the second."""
        from prometheus_client.core import GaugeMetricFamily

        from orchestrator.errors import LedgerUnavailable

        try:
            services: list[registry.ServiceView] | None = self.orch.registry.services()
            in_flight = self.orch.ledger.in_flight_by_host()
        except LedgerUnavailable:
            services, in_flight = None, {}
        shown = None
        if services is not None:
            shown = series_hosts(services, in_flight, self.orch.settings.metrics_max_hosts)
        every = shown is None or len(shown) == len({v.host for v in services or ()})
        chosen = set(shown or ())
        asked = [v.nodename for v in services or () if v.state != "down"
                 and (every or v.host in chosen)]
        families = list(self._workers(worker_reports(
            self.orch, limit=len(asked) or None, destination=None if every else asked)))
        from_ledger = []
        if services is not None:
            try:
                from_ledger = list(self._from_ledger(services, in_flight, shown or []))
            except LedgerUnavailable:
                services = None
        reachable = GaugeMetricFamily("orchestrator_ledger_reachable",
                                      "1 if this exporter reached the ledger at its last read")
        reachable.add_metric([], 0.0 if services is None else 1.0)
        return [*families, reachable, *from_ledger]

    @staticmethod
    def _workers(reports: dict[str, dict[str, Any]]) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        up = GaugeMetricFamily("orchestrator_ledger_up", "1 if the worker reaches the ledger",
                               labels=["worker", "host"])
        errors = CounterMetricFamily("orchestrator_ledger_errors",
                                     "Failed ledger attempts of the worker's main process",
                                     labels=["worker", "host"])
        recovered = CounterMetricFamily("orchestrator_steps_recovered",
                                        "Steps the worker sent again (no delivery left)",
                                        labels=["worker", "host"])
        for name, data in sorted(reports.items()):
            labels, ledger = [name, str(data.get("host"))], data.get("ledger") or {}
            up.add_metric(labels, 1.0 if ledger.get("up") else 0.0)
            errors.add_metric(labels, float(ledger.get("errors", 0)))
            recovered.add_metric(labels, float(data.get("steps_recovered", 0)))
        yield up
        yield errors
        yield recovered

    def _from_ledger(self, views: list[registry.ServiceView], in_flight: dict[str, int],
                     hosts: list[str]) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        orch, now = self.orch, time.time()
        fleet = GaugeMetricFamily("orchestrator_hosts", "Hosts in each state, fleet-wide",
                                  labels=["state"])
        counts = Counter(registry.host_states(views).values())
        for name in HOST_STATES:
            fleet.add_metric([name], float(counts[name]))
        yield fleet
        in_series = GaugeMetricFamily("orchestrator_hosts_in_series",
                                      "Hosts with per-host series (ORCHESTRATOR_METRICS_MAX_"
                                      "HOSTS at most)")
        in_series.add_metric([], float(len(hosts)))
        yield in_series
        chosen = set(hosts)
        views = [v for v in views if v.host in chosen]
        state = GaugeMetricFamily("orchestrator_host_state", "1 for the host's state",
                                  labels=["host", "state"])
        version = GaugeMetricFamily("orchestrator_host_service_version",
                                    "Service version of the host's live services (the last "
                                    "known when all are down)", labels=["host"])
        for host in hosts:
            current = registry.host_state(views, host)
            for name in HOST_STATES:
                state.add_metric([host, name], 1.0 if current == name else 0.0)
            mine = [v for v in views if v.host == host]
            live = [v for v in mine if v.state != "down"] or mine
            version.add_metric([host], float(max(v.version for v in live)))
        yield state
        yield version

        gauge = GaugeMetricFamily("orchestrator_operations_in_flight",
                                  "Operations in flight that still need the host",
                                  labels=["host"])
        for host in sorted(set(hosts) | (set(in_flight) & chosen)):
            gauge.add_metric([host], float(in_flight.get(host, 0)))
        yield gauge
        unserved = unserved_steps(orch, views)
        waiting = GaugeMetricFamily("orchestrator_steps_unserved",
                                    "Steps waiting for a worker whose code serves them",
                                    labels=["host"])
        for host in sorted(set(hosts) | (set(unserved) & chosen)):
            waiting.add_metric([host], float(len(unserved.get(host, []))))
        yield waiting

        queues = GaugeMetricFamily("orchestrator_queue_messages",
                                   "Messages waiting in a host's queue (not counting "
                                   "unacknowledged ones)", labels=["host", "queue", "kind"])
        names = [(h, q, kind) for h in hosts for q, kind in ((h, "main"), (alt_queue(h), "alt"))]
        depths = queue_depths(orch.app, [q for _, q, _ in names]) if names else {}
        for host, queue, kind in names:
            queues.add_metric([host, queue, kind], float(depths.get(queue, 0)))
        yield queues

        yield from self._drains(views, now)

        fallbacks = CounterMetricFamily("orchestrator_alt_fallbacks",
                                        "Alt steps sent to <host> instead of <host>-alt",
                                        labels=["host", "reason"])
        for host, reasons in sorted(orch.registry.fallback_counts().items()):
            if host not in chosen:
                continue
            for reason, count in sorted(reasons.items()):
                fallbacks.add_metric([host, reason], float(count))
        yield fallbacks

    def _drains(self, views: list[registry.ServiceView], now: float) -> Iterator[Any]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            SummaryMetricFamily,
        )

        live = {v.nodename for v in views if v.state != "down"}
        remaining = GaugeMetricFamily("orchestrator_drain_deadline_remaining_seconds",
                                      "Seconds until a draining host's deadline",
                                      labels=["host"])
        waiting = GaugeMetricFamily("orchestrator_drain_waiting_operations",
                                    "Operations a draining host waits for", labels=["host"])
        handed = CounterMetricFamily("orchestrator_drain_handed_back",
                                     "Messages drains handed back to <host> unstarted",
                                     labels=["host"])
        outcomes = CounterMetricFamily("orchestrator_drains", "Drains ended, by outcome",
                                       labels=["host", "outcome"])
        durations = SummaryMetricFamily("orchestrator_drain_duration_seconds",
                                        "Duration of ended drains", labels=["host"])
        ended: Counter[tuple[str, str]] = Counter()
        handed_back: Counter[str] = Counter()
        spent: dict[str, list[float]] = defaultdict(list)
        hosts = {v.host for v in views}
        for d in self.orch.registry.drains():
            if d.host not in hosts:
                continue
            handed_back[d.host] += d.handed_back
            outcome = d.outcome or (None if d.nodename in live else "forced")
            if outcome is None:  # still draining
                remaining.add_metric([d.host], max(0.0, d.deadline_at - now))
                waiting.add_metric([d.host], float(len((d.waiting or {}).get("operations", []))))
                continue
            ended[(d.host, outcome)] += 1
            if d.ended_at is not None:
                spent[d.host].append(d.ended_at - d.started_at)
        for host in sorted(handed_back):
            handed.add_metric([host], float(handed_back[host]))
            for outcome in DRAIN_OUTCOMES:
                outcomes.add_metric([host, outcome], float(ended[(host, outcome)]))
            if spent[host]:
                durations.add_metric([host], count_value=len(spent[host]),
                                     sum_value=sum(spent[host]))
        yield remaining
        yield waiting
        yield handed
        yield outcomes
        yield durations


class Server:
    """``/metrics`` served from a thread; :meth:`shutdown` stops it and its reading."""

    def __init__(self, orch: Any, port: int, address: str) -> None:
        from prometheus_client import CollectorRegistry, start_http_server

        self.collector = OrchestratorCollector(orch)
        registry_ = CollectorRegistry(auto_describe=False)
        registry_.register(self.collector)
        self.http, _ = start_http_server(port, addr=address, registry=registry_)

    def shutdown(self) -> None:
        self.http.shutdown()
        self.collector.close()


def serve(orch: Any, port: int, address: str = "127.0.0.1") -> Server:
    """Serve /metrics on ``address:port`` from a thread; returns the server."""
    return Server(orch, port, address)
