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
hosts at most (500 by default): those that matter first, as the live view orders them
(draining, then down, then those with work in flight, then the rest, by name within each;
:func:`orchestrator.ops.views.rank`), and only their queues and workers are asked. The
fleet's totals are always there:

=========================================================  ======  ===============================
``orchestrator_hosts{state}``                              gauge   hosts up, draining, down
``orchestrator_hosts_in_series``                           gauge   hosts with per-host series
=========================================================  ======  ===============================

A drain whose worker is gone without recording its end (the exit deadline forced it, or it was
killed) counts as ``forced``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from orchestrator.ops import views
from orchestrator.ops.refreshed import Refreshed
from orchestrator.routing import alt_queue

HOST_STATES = ("up", "draining", "down")
DRAIN_OUTCOMES = ("done", "deadline", "second-sigterm", "forced")


#: Seconds between two reads while scrapes come; what a scrape shows is at most this plus
#: one read old.
TTL = 2.0
#: Seconds without a scrape after which the reading stops (Prometheus scrapes every minute
#: by default: past that, a scrape would find nothing kept).
IDLE_AFTER = 90.0


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
        """Every family, from one read of the fleet's hosts (:func:`views.hosts_page`, what
        ``orchestrator hosts`` and Flower's Hosts page show): the registry, the ledger, the
        broker's queue depths and a ``workers.status`` broadcast that ends once every live
        worker with series answered, after a second at most. With the ledger not answering,
        what the workers say over the broker, from whoever answers within the second."""
        from prometheus_client.core import GaugeMetricFamily

        from orchestrator.errors import LedgerUnavailable

        only = views.HostFilter(limit=self.orch.settings.metrics_max_hosts, first_matter=True)
        try:
            page: dict[str, Any] | None = views.hosts_page(
                self.orch, with_reports=True, only=only, with_drain_totals=True)
        except LedgerUnavailable:
            page = None
        if page is None:
            workers = [(name, str(data.get("host")), data)
                       for name, data in views.worker_reports(self.orch).items()]
        else:
            workers = [(service["nodename"], host["host"], service)
                       for host in page["hosts"] for service in host["services"]
                       if "ledger" in service]
        reachable = GaugeMetricFamily("orchestrator_ledger_reachable",
                                      "1 if this exporter reached the ledger at its last read")
        reachable.add_metric([], 0.0 if page is None else 1.0)
        return [*self._workers(sorted(workers)), reachable,
                *(self._hosts(page) if page is not None else ())]

    @staticmethod
    def _workers(workers: list[tuple[str, str, dict[str, Any]]]) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        up = GaugeMetricFamily("orchestrator_ledger_up", "1 if the worker reaches the ledger",
                               labels=["worker", "host"])
        errors = CounterMetricFamily("orchestrator_ledger_errors",
                                     "Failed ledger attempts of the worker's main process",
                                     labels=["worker", "host"])
        recovered = CounterMetricFamily("orchestrator_steps_recovered",
                                        "Steps the worker sent again (no delivery left)",
                                        labels=["worker", "host"])
        for name, host, data in workers:
            labels, ledger = [name, host], data.get("ledger") or {}
            up.add_metric(labels, 1.0 if ledger.get("up") else 0.0)
            errors.add_metric(labels, float(ledger.get("errors", 0)))
            recovered.add_metric(labels, float(data.get("steps_recovered", 0)))
        yield up
        yield errors
        yield recovered

    @staticmethod
    def _hosts(page: dict[str, Any]) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        hosts = sorted(page["hosts"], key=lambda h: h["host"])
        fleet = GaugeMetricFamily("orchestrator_hosts", "Hosts in each state, fleet-wide",
                                  labels=["state"])
        for name in HOST_STATES:
            fleet.add_metric([name], float(page["fleet"].get(name, 0)))
        yield fleet
        in_series = GaugeMetricFamily("orchestrator_hosts_in_series",
                                      "Hosts with per-host series (ORCHESTRATOR_METRICS_MAX_"
                                      "HOSTS at most)")
        in_series.add_metric([], float(len(hosts)))
        yield in_series

        state = GaugeMetricFamily("orchestrator_host_state", "1 for the host's state",
                                  labels=["host", "state"])
        version = GaugeMetricFamily("orchestrator_host_service_version",
                                    "Service version of the host's live services (the last "
                                    "known when all are down)", labels=["host"])
        in_flight = GaugeMetricFamily("orchestrator_operations_in_flight",
                                      "Operations in flight that still need the host",
                                      labels=["host"])
        unserved = GaugeMetricFamily("orchestrator_steps_unserved",
                                     "Steps waiting for a worker whose code serves them",
                                     labels=["host"])
        queues = GaugeMetricFamily("orchestrator_queue_messages",
                                   "Messages waiting in a host's queue (not counting "
                                   "unacknowledged ones)", labels=["host", "queue", "kind"])
        fallbacks = CounterMetricFamily("orchestrator_alt_fallbacks",
                                        "Alt steps sent to <host> instead of <host>-alt",
                                        labels=["host", "reason"])
        for h in hosts:
            host = h["host"]
            for name in HOST_STATES:
                state.add_metric([host, name], 1.0 if h["state"] == name else 0.0)
            version.add_metric([host], float(h["version"]))
            in_flight.add_metric([host], float(h["operations_in_flight"]))
            unserved.add_metric([host], float(len(h["steps_unserved"])))
            for queue, kind in ((host, "main"), (alt_queue(host), "alt")):
                queues.add_metric([host, queue, kind], float(h["queued"].get(queue, 0)))
            for reason, count in sorted(h["alt_fallbacks"].items()):
                fallbacks.add_metric([host, reason], float(count))
        yield from (state, version, in_flight, unserved, queues)
        yield from _drains(hosts)
        yield fallbacks


def _drains(hosts: list[dict[str, Any]]) -> Iterator[Any]:
    """A draining host's deadline and what it waits for (of all its workers draining: the
    latest deadline, the operations any of them waits for); every host's drains ended."""
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        SummaryMetricFamily,
    )

    remaining = GaugeMetricFamily("orchestrator_drain_deadline_remaining_seconds",
                                  "Seconds until a draining host's deadline", labels=["host"])
    waiting = GaugeMetricFamily("orchestrator_drain_waiting_operations",
                                "Operations a draining host waits for", labels=["host"])
    handed = CounterMetricFamily("orchestrator_drain_handed_back",
                                 "Messages drains handed back to <host> unstarted",
                                 labels=["host"])
    outcomes = CounterMetricFamily("orchestrator_drains", "Drains ended, by outcome",
                                   labels=["host", "outcome"])
    durations = SummaryMetricFamily("orchestrator_drain_duration_seconds",
                                    "Duration of ended drains", labels=["host"])
    for h in hosts:
        host, drains, total = h["host"], h["drains"], h["drains_total"]
        if drains:
            remaining.add_metric([host], max(d["deadline_in"] for d in drains))
            waited = {op for d in drains for op in d["waiting_for"].get("operations", [])}
            waiting.add_metric([host], float(len(waited)))
        if not total["any"]:
            continue
        handed.add_metric([host], float(total["handed_back"]))
        for outcome in DRAIN_OUTCOMES:
            outcomes.add_metric([host, outcome], float(total["ended"].get(outcome, 0)))
        if total["timed"]:
            durations.add_metric([host], count_value=total["timed"],
                                 sum_value=total["seconds"])
    yield from (remaining, waiting, handed, outcomes, durations)


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
