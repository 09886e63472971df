"""An operation's timeline: what happened to it, when, where, from the ledger's own records.

Three records make it, none written for it: the step log (one row per step: where it ran,
from which queue, how many deliveries, when it started and ended), the operation's history
(:class:`~orchestrator.ledger.states.Happening`: what happened off the normal path: a step
handed back by a drain, held, resent, retried, waiting for an event, a rollback started), and
the drains of the hosts it ran on while it was in flight. :func:`timeline` puts them in order
as entries; :func:`lanes` lays them out per host (a Gantt chart: a bar per step, the drains
beneath, the happenings as marks), as Flower's Operations page draws it. Both are pure: the
view (``orchestrator.status.operation_dict``) reads the rows.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

from orchestrator.routing import ALT_SUFFIX


@dataclass(frozen=True)
class Entry:
    """One line of the timeline."""

    at: float
    #: submitted, step-started, step-completed, step-failed, ended, drain-started,
    #: drain-ended, or a Happening's value (handed-back, held, resent, ...).
    kind: str
    position: int | None = None
    step: str | None = None
    host: str | None = None
    worker: str | None = None
    queue: str | None = None
    detail: str | None = None


@dataclass(frozen=True)
class StepRow:
    """A step log row as the view reads it (``Ledger.view``)."""

    position: int
    step: str
    host: str
    status: str
    attempts: int
    worker: str | None
    finished_at: float | None
    started_at: float | None
    queue: str | None


def queue_kind(queue: str | None) -> str | None:
    """main or alt, from a queue's name (None: not known)."""
    if not queue:
        return None
    return "alt" if queue.endswith(ALT_SUFFIX) else "main"


def timeline(op: Any, steps: Iterable[StepRow], history: Iterable[tuple],
             drains: Iterable[Any]) -> list[dict[str, Any]]:
    """The operation's entries, oldest first. ``op``: its row; ``history``:
    ``Ledger.history``'s rows; ``drains``: the drains of its hosts while it was in flight."""
    entries = [Entry(op.created_at, "submitted", detail=" ".join(filter(None, [
        op.kind, op.subject and f"subject={op.subject}"])))]
    for row in steps:
        if row.started_at is not None:
            again = f"attempt {row.attempts}" if row.attempts > 1 else None
            entries.append(Entry(row.started_at, "step-started", row.position, row.step,
                                 row.host, row.worker, row.queue, again))
        if row.finished_at is not None and row.status in ("completed", "failed"):
            entries.append(Entry(row.finished_at, f"step-{row.status}", row.position,
                                 row.step, row.host, row.worker, row.queue))
    entries += [Entry(*row) for row in history]
    for drain in drains:
        entries.append(Entry(drain.started_at, "drain-started", host=drain.host,
                             worker=drain.nodename, detail=f"{drain.reason}, deadline "
                             f"{drain.deadline_at - drain.started_at:g} s"))
        if drain.ended_at is not None:
            entries.append(Entry(drain.ended_at, "drain-ended", host=drain.host,
                                 worker=drain.nodename, detail=f"{drain.outcome}, "
                                 f"{drain.handed_back} handed back"))
    if op.finished_at is not None:
        entries.append(Entry(op.finished_at, "ended", detail=op.status + (
            f": {op.error}" if op.error else "")))
    # (at the same instant: a submit first, then a step's start, what happened, the end)
    order = {"submitted": 0, "step-started": 1, "ended": 3}
    entries.sort(key=lambda e: (e.at, order.get(e.kind, 2)))
    return [asdict(e) for e in entries]


def lanes(op: Any, steps: Iterable[StepRow], entries: list[dict[str, Any]],
          drains: Iterable[Any], now: float) -> dict[str, Any]:
    """The timeline per host, each thing placed as a share of the operation's span (0 to
    100): ``{"start", "end", "hosts": [{"host", "bars", "drains", "marks"}]}``. A bar is a
    step from its start to its end (to now while it runs or waits), with its queue's kind
    and its attempts; the current step not started yet is a bar from when it was queued."""
    start = op.created_at
    end = op.finished_at or now
    span = max(end - start, 1e-6)

    def place(t0: float, t1: float) -> dict[str, float]:
        left = min(max((t0 - start) / span * 100, 0.0), 100.0)
        right = min(max((t1 - start) / span * 100, left), 100.0)
        return {"left": round(left, 2), "width": round(max(right - left, 0.4), 2)}

    hosts: dict[str, dict[str, Any]] = {}

    def lane(host: str) -> dict[str, Any]:
        return hosts.setdefault(host, {"host": host, "bars": [], "drains": [], "marks": []})

    for _, host in op.plan:
        lane(host)
    started = set()
    for row in steps:
        if row.started_at is None:
            continue
        started.add(row.position)
        until = row.finished_at if row.finished_at is not None else now
        lane(row.host)["bars"].append({
            "position": row.position, "step": row.step, "status": row.status,
            "attempts": row.attempts, "queue": row.queue, "queue_kind": queue_kind(row.queue),
            "from": row.started_at, "to": row.finished_at, **place(row.started_at, until)})
    current = op.plan[op.position] if op.finished_at is None and op.position < len(
        op.plan) else None
    if current is not None and op.position not in started:
        step, host = current
        lane(host)["bars"].append({
            "position": op.position, "step": step, "status": op.step_state, "attempts": 0,
            "queue": op.queue if op.next_published else None,
            "queue_kind": queue_kind(op.queue) if op.next_published else None,
            "from": op.step_since, "to": None, **place(op.step_since, now)})
    for drain in drains:
        if drain.host in hosts:
            lane(drain.host)["drains"].append({
                "worker": drain.nodename, "reason": drain.reason, "outcome": drain.outcome,
                "from": drain.started_at, "to": drain.ended_at,
                **place(drain.started_at, drain.ended_at or now)})
    plain = {"submitted", "step-started", "step-completed", "step-failed", "ended",
             "drain-started", "drain-ended"}
    for entry in entries:
        if entry["kind"] not in plain and entry["host"] in hosts:
            lane(entry["host"])["marks"].append({**entry, **place(entry["at"], entry["at"])})
    return {"start": start, "end": end, "hosts": list(hosts.values())}


def lines(entries: list[dict[str, Any]], start: float) -> list[str]:
    """The entries as text, one line each: the wall-clock time, the seconds since the
    submit (``start``), what happened and where (``orchestrator operation ID``)."""
    out = []
    for e in entries:
        clock = time.strftime("%H:%M:%S", time.localtime(e["at"]))
        where = " ".join(filter(None, [
            f"{e['step']}@{e['host']}" if e["step"] else e["host"],
            e["queue"] and f"via {e['queue']}", e["worker"] and f"by {e['worker']}"]))
        said = ": ".join(filter(None, [where, e["detail"]]))
        out.append(f"{clock} {e['at'] - start:+8.2f}s  {e['kind']:<16}{said}")
    return out
