"""The fleet's views, read-only, as plain dicts (the command line's JSON, Flower's API), for
any app: the hosts (:func:`hosts_page`, the one model of a host that the command line,
Flower's Hosts tab, the live view and ``/metrics`` read), the operations' lists, and what can
be said while the ledger does not answer. One operation's status is the engine's
(:mod:`orchestrator.status`: ``orch.operation`` returns it)."""

from __future__ import annotations

import fnmatch
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select

from orchestrator import registry
from orchestrator.broker import queue_depths
from orchestrator.ledger.models import Operation
from orchestrator.ledger.store import ACTIVE_STATUSES, OperationQuery
from orchestrator.routing import alt_queue


def _alt_steps_to(mode: str, status: str, host: str) -> str:
    if mode == "always" or (mode == "auto" and status == "alt"):
        return alt_queue(host)
    return host


def _host_notes(
    host: str, state: str, queued: dict[str, int], alt_consumed: bool,
) -> list[str]:
    notes = []
    waiting_main = queued.get(host, 0)
    if waiting_main and state != "up":
        notes.append(
            f"{waiting_main} message(s) wait in {host}: the host is {state} and takes no new "
            "work; they run when it (re)starts"
        )
    waiting_alt = queued.get(alt_queue(host), 0)
    if waiting_alt and not alt_consumed:
        notes.append(
            f"{waiting_alt} message(s) wait in {alt_queue(host)}, which no running "
            f"version-{registry.ALT_SERVICE_VERSION} service consumes; they run when one does "
            f"(orchestrator worker {host}, or --alt-only)"
        )
    return notes


def worker_reports(orch: Any, timeout: float = 1.0, limit: int | None = None,
                   destination: list[str] | None = None) -> dict[str, dict[str, Any]]:
    """What each live worker (``destination``: those workers only) says of itself over the
    broker (``workers.status``): host, drain state, its view of the ledger, steps recovered;
    by worker name. Returns once ``limit`` workers answered, else after ``timeout``; empty
    when the broker does not answer either."""
    try:
        replies = orch.app.control.broadcast("orchestrator_status", reply=True,
                                             timeout=timeout, limit=limit,
                                             destination=destination) or []
    except Exception:
        return {}
    out: dict[str, dict[str, Any]] = {}
    for reply in replies:
        for nodename, data in reply.items():
            if isinstance(data, dict) and "error" not in data:
                out[nodename] = data
    return out


def ledger_outage(orch: Any, exc: Exception, reports: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """What can be said while the ledger does not answer: since when (this process's view,
    else the earliest a worker reports), and each worker that answers over the broker."""
    since = [r["ledger"]["unreachable_since"] for r in reports.values()
             if r.get("ledger", {}).get("unreachable_since")]
    own = orch.ledger_health.unreachable_since
    return {
        "ledger": {"up": False, "error": str(exc),
                   "unreachable_since": min([*since, *([own] if own else [])], default=None)},
        "workers": [{"nodename": name, **data} for name, data in sorted(reports.items())],
    }


def describe_outage(outage: dict[str, Any]) -> list[str]:
    """Lines for a person: the ledger's outage and the workers that answer meanwhile."""
    now = time.time()

    def ago(t: float | None) -> str:
        return "" if not t else f" since {time.strftime('%H:%M:%S', time.localtime(t))} " \
                                f"({now - t:.0f}s)"

    lines = [f"ledger unreachable{ago(outage['ledger']['unreachable_since'])}: "
             "hosts cannot be judged from their heartbeats"]
    for w in outage["workers"]:
        ledger = w.get("ledger") or {}
        seen = ("ledger up" if ledger.get("up")
                else f"ledger unreachable{ago(ledger.get('unreachable_since'))}")
        lines.append(f"  {w['host']:<12} {w['nodename']:<28} {w['state']:<9} answers over "
                     f"the broker; {seen}")
    if not outage["workers"]:
        lines.append("  no worker answers over the broker either")
    return lines


def unserved_steps(orch: Any, views: list[Any]) -> dict[str, list[dict[str, Any]]]:
    """By host: the operations whose current step waits for a worker whose code serves it
    (held by a worker that does not register it, or queued for a host whose live workers'
    code does not): what a deploy that renamed or removed a step left behind."""
    with orch.db.read() as s:
        ops = s.execute(select(Operation).where(
            Operation.status.in_(ACTIVE_STATUSES),
            Operation.step_state.in_(("held", "queued")),
        )).scalars().all()
    out: dict[str, list[dict[str, Any]]] = {}
    grouped = registry.by_host(views)
    for op in ops:
        step, host = op.current or (None, None)
        if step is None:
            continue
        why = registry.unserved(grouped.get(host, []), host, step,
                                held=op.step_state == "held")
        if why is not None:
            out.setdefault(host, []).append({"operation": op.id, "kind": op.kind,
                                             "step": step, "state": op.step_state,
                                             "waiting": why})
    return out


@dataclass(frozen=True)
class HostFilter:
    """Which hosts a view shows: those whose name matches ``names`` (shell globs, any of
    them), in one of ``states`` (up, draining, down), with work (``busy``: operations in
    flight that need them, or messages in their queues); then ``limit`` of them from
    ``offset``, by name, or with ``first_matter`` the hosts that matter first (:func:`rank`).
    The filters apply before the broker is asked for queue depths and the workers for their
    reports: a fleet's view of a few hosts costs a few hosts."""

    names: tuple[str, ...] = ()
    states: tuple[str, ...] = ()
    busy: bool = False
    limit: int | None = None
    offset: int = 0
    first_matter: bool = False

    def named(self, host: str) -> bool:
        return not self.names or any(fnmatch.fnmatchcase(host, pattern)
                                     for pattern in self.names)

    def exact(self) -> tuple[str, ...] | None:
        """The names, when none is a glob: those hosts' rows can be read alone instead of
        the fleet's (a live view's few hosts of 10,000)."""
        if self.names and not any(c in name for name in self.names for c in "*?["):
            return self.names
        return None


def rank(state: str, work: int) -> tuple[int, int]:
    """Where a host comes when those that matter come first: draining ones, then down ones,
    then those with work (the most first), then the rest (the live view's rows, the hosts
    given Prometheus series of their own)."""
    return {"draining": 0, "down": 1}.get(state, 2 if work else 3), -work


def hosts(orch: Any, with_queues: bool = True, with_reports: bool = False,
          only: HostFilter = HostFilter()) -> list[dict[str, Any]]:
    """Each known host (``only``: those it lets through): its services, state, where alt
    steps go, queue depths and operations in flight, and notes on work waiting in a queue
    nobody consumes. ``with_reports``: also what each live worker says of the ledger over
    the broker (:func:`worker_reports`)."""
    return hosts_page(orch, with_queues, with_reports, only)["hosts"]


def hosts_page(orch: Any, with_queues: bool = True, with_reports: bool = False,
               only: HostFilter = HostFilter(),
               with_drain_totals: bool = False) -> dict[str, Any]:
    """:func:`hosts` as a page: ``{"hosts": [...], "total": N, "offset": O, "limit": L,
    "fleet": {state: hosts}}``, ``total`` the hosts ``only`` lets through before its limit
    and offset, ``fleet`` every host read by state (the fleet's, unless ``only`` names its
    hosts exactly). The one model of a host that the command line, Flower, the live view
    and ``/metrics`` read. ``with_drain_totals``: each host's drains of all time too
    (``drains_total``: ended by outcome, ``forced``, their seconds, the messages handed
    back), which Prometheus' counters need."""
    exact = only.exact()
    views = orch.registry.services(hosts=exact)
    states = registry.host_states(views)
    grouped = registry.by_host(views)
    in_flight = orch.ledger.in_flight_by_host()
    chosen = {host for host, state in states.items() if only.named(host)
              and (not only.states or state in only.states)}
    # The workers are asked about the page's hosts alone (all chosen ones when the page
    # depends on queue depths: --busy).
    known = sorted(chosen, key=(lambda h: (*rank(states[h], in_flight.get(h, 0)), h))
                   if only.first_matter else None)
    asked = chosen if only.limit is None or only.busy else \
        set(known[only.offset:only.offset + only.limit])
    mode = orch.settings.alt_routing
    snapshot = registry.alt_snapshot(views)
    fallbacks = orch.registry.fallback_counts()
    unserved = unserved_steps(orch, views)
    live_nodes = {v.nodename for v in views if v.state != "down"}
    now = time.time()
    draining: dict[str, list[dict[str, Any]]] = {}
    last_drain: dict[str, dict[str, Any]] = {}
    for d in orch.registry.drains(exact, since=now - 24 * 3600):
        if d.outcome is not None or d.nodename not in live_nodes:
            # Oldest first: the host's most recent ended drain wins. One never ended whose
            # worker is gone was cut short by the exit deadline or a kill.
            last_drain[d.host] = {
                "worker": d.nodename, "reason": d.reason, "outcome": d.outcome or "forced",
                "seconds": None if d.ended_at is None else round(d.ended_at - d.started_at, 1),
                "ended_ago": None if d.ended_at is None else round(now - d.ended_at, 1),
                "handed_back": d.handed_back,
            }
        if d.outcome is None and d.nodename in live_nodes:
            draining.setdefault(d.host, []).append({
                "worker": d.nodename, "reason": d.reason,
                "seconds": round(now - d.started_at, 1),
                "deadline_in": round(max(0.0, d.deadline_at - now), 1),
                "handed_back": d.handed_back, "waiting_for": d.waiting or {},
            })
    depths: dict[str, int] = {}
    if only.busy:  # the chosen hosts' queues, asked once: the page's are among them
        depths = queue_depths(orch.app, [q for h in known for q in (h, alt_queue(h))])
        known = [h for h in known if in_flight.get(h, 0)
                 or depths.get(h, 0) or depths.get(alt_queue(h), 0)]
    total = len(known)
    end = None if only.limit is None else only.offset + only.limit
    known = known[only.offset:end]
    totals = orch.registry.drain_totals(known) if with_drain_totals else {}
    # The workers are asked once the ledger has answered: a ledger that fails mid-read
    # costs no broadcast that its caller (the metrics' outage path) then makes again.
    live = [v.nodename for v in views if v.host in asked and v.state != "down"]
    everyone = exact is None and len(asked) == len({v.host for v in views})
    reports = (worker_reports(orch, limit=len(live) or None,
                              destination=None if everyone else live)
               if with_reports and live else {})
    if with_queues and not only.busy:
        depths = queue_depths(orch.app, [q for h in known for q in (h, alt_queue(h))])
    out = []
    for host in known:
        mine = grouped[host]
        live = [v for v in mine if v.state != "down"]
        state = states[host]
        status = snapshot.status(host)
        entry: dict[str, Any] = {
            "host": host, "state": state,
            # The running services' version (the last one known when all are down).
            "version": max(v.version for v in (live or mine)),
            "queues": sorted({host for v in live if v.consumes_main}
                             | {alt_queue(host) for v in live if v.consumes_alt}),
            "alt_routing": mode,
            "alt_support": status,
            "alt_steps_to": _alt_steps_to(mode, status, host),
            "alt_fallbacks": fallbacks.get(host, {}),
            "operations_in_flight": in_flight.get(host, 0),
            # Steps waiting for a worker whose code serves them (a deploy's leftovers).
            "steps_unserved": unserved.get(host, []),
            "code_versions": sorted({v.code_version or "?" for v in (live or mine)}),
            # Each drain in progress: its deadline and what it waits for (a gone worker's
            # drain is not shown: its host is down).
            "drains": draining.get(host, []),
            "last_drain": last_drain.get(host),
            "services": [
                {"nodename": v.nodename, "state": v.state, "version": v.version,
                 "code_version": v.code_version,
                 "consumes_main": v.consumes_main, "consumes_alt": v.consumes_alt,
                 "heartbeat_age": round(v.heartbeat_age, 1),
                 "heartbeat_unconfirmed": v.unconfirmed,
                 **({"ledger": reports[v.nodename].get("ledger"),
                     "steps_recovered": reports[v.nodename].get("steps_recovered", 0)}
                    if reports and v.nodename in reports else {})}
                for v in mine
            ],
            "notes": [],
        }
        if with_drain_totals:
            entry["drains_total"] = _drains_total(totals.get(host), live_nodes)
        if with_queues:
            entry["queued"] = {q: depths[q] for q in (host, alt_queue(host))}
            entry["notes"] = _host_notes(
                host, state, entry["queued"], registry.consumers(mine, host).alt
            )
        if entry["steps_unserved"]:
            by_step: dict[str, int] = {}
            for item in entry["steps_unserved"]:
                by_step[item["step"]] = by_step.get(item["step"], 0) + 1
            entry["notes"].append(
                f"{len(entry['steps_unserved'])} step(s) wait for a worker that serves them ("
                + ", ".join(f"{step} x{n}" for step, n in sorted(by_step.items()))
                + f"): {host} runs code that does not register them; roll back, or deploy "
                  "code that does (an alias keeps an old name)")
        out.append(entry)
    return {"hosts": out, "total": total, "offset": only.offset, "limit": only.limit,
            "fleet": {state: n for state, n in sorted(Counter(states.values()).items())}}


def _drains_total(totals: registry.DrainTotals | None, live_nodes: set[str]
                  ) -> dict[str, Any]:
    """A host's drains of all time: how many ended each way (``forced``: never ended, its
    worker gone), their seconds, and the messages they handed back."""
    totals = totals or registry.DrainTotals()
    ended = dict(totals.ended)
    forced = sum(1 for node in totals.unended if node not in live_nodes)
    if forced:
        ended["forced"] = forced
    return {"ended": ended, "timed": totals.timed, "seconds": round(totals.seconds, 3),
            "handed_back": totals.handed_back,
            "any": bool(totals.ended or totals.unended)}


def live_operations(orch: Any, since: float, limit: int) -> dict[str, Any]:
    """Operations in flight (newest first) and those ended since ``since`` (the latest to
    end first), at most ``limit`` of each, and how many there are of each: what a live view
    of a fleet shows when they do not all fit (``{"in_flight": [...], "ended": [...],
    "in_flight_total": N, "ended_total": M}``, the operations as :class:`Operation` rows)."""
    active = Operation.status.in_(ACTIVE_STATUSES)
    over = ~active & (Operation.finished_at >= since)
    with orch.db.read() as s:
        in_flight = list(s.execute(select(Operation).where(active).order_by(
            Operation.created_at.desc()).limit(limit)).scalars().all())
        done = list(s.execute(select(Operation).where(over).order_by(
            Operation.finished_at.desc()).limit(limit)).scalars().all())

        # Counted only when the page is full: otherwise the page is all of them.
        def total(rows: list[Operation], where: Any) -> int:
            if len(rows) < limit:
                return len(rows)
            return s.execute(select(func.count()).select_from(Operation).where(where)
                             ).scalar_one()

        return {"in_flight": in_flight, "ended": done,
                "in_flight_total": total(in_flight, active), "ended_total": total(done, over)}


def operations_page(orch: Any, find: OperationQuery) -> dict[str, Any]:
    """One page of the operations ``find`` asks for, in flight first (the longest unmoved
    first), as the command line's ``operations`` and Flower's Operations page show them."""
    total, page = orch.ledger.find_operations(find)
    now = time.time()
    rows = []
    for op in page:
        current = op.current if op.status in ACTIVE_STATUSES else None
        rows.append({
            "operation": op.id, "kind": op.kind, "subject": op.subject, "status": op.status,
            "position": op.position, "steps": len(op.plan),
            "current_step": None if current is None else {
                "step": current[0], "host": current[1], "state": op.step_state,
                "seconds": round(now - op.step_since, 1),
                "queue": op.queue if op.next_published else None},
            "created_at": op.created_at, "finished_at": op.finished_at,
            "seconds": round((op.finished_at or now) - op.created_at, 1),
            "error": op.error.splitlines()[0] if op.error else None,
        })
    return {"total": total, "offset": find.offset, "limit": find.limit, "operations": rows}
