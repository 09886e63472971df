"""A live terminal view of a fleet: hosts, queues, operations, drains and events as they happen.

:class:`Watch` reads the registry, the ledger and the broker (what ``orchestrator hosts`` and
Flower's Hosts page show) every :data:`REFRESH_SECONDS` from a thread of its own, and turns
what changed into event lines: a host going draining or down, an operation moving to its next
step or ending. On a terminal it draws them with ``rich`` (hosts table, operations table,
events); without one (CI, a pipe) it prints each event as a plain time-stamped line, so a log
of a run reads the same as what a person watched.
"""

from __future__ import annotations

import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from orchestrator import views
from orchestrator.routing import alt_queue

REFRESH_SECONDS = 0.25
#: Event lines kept on screen.
EVENTS_SHOWN = 14
#: Operations shown: those in flight and those ended this recently.
ENDED_SHOWN_SECONDS = 120.0


@dataclass
class Snapshot:
    at: float
    hosts: list[dict[str, Any]]
    operations: list[dict[str, Any]]
    error: str | None = None


@dataclass
class Watch:
    """Polls ``orch`` and reports changes; ``live`` draws with rich, else plain lines."""

    orch: Any
    title: str = "orchestrator"
    #: Under the view (where Flower is, say).
    subtitle: str | None = None
    live: bool = field(default_factory=lambda: sys.stdout.isatty())
    out: Any = field(default_factory=lambda: sys.stdout)

    def __post_init__(self) -> None:
        self.events: deque[str] = deque(maxlen=EVENTS_SHOWN)
        self.snapshot: Snapshot | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._console: Any = None
        self._live: Any = None

    # -- lifecycle ---------------------------------------------------------------------------
    def __enter__(self) -> Watch:
        if self.live:
            from rich.console import Console
            from rich.live import Live

            self._console = Console(file=self.out)
            self._live = Live(self.render(), console=self._console, refresh_per_second=4,
                              transient=False)
            self._live.__enter__()
        self._thread = threading.Thread(target=self._run, name="orchestrator-watch",
                                        daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.poll()  # the last word: what the run ended with
        if self._live is not None:
            self._live.update(self.render())
            self._live.__exit__(*exc)

    def say(self, text: str) -> None:
        """A line of the story (the demo's narration), among the events."""
        self._event(text)

    # -- polling -----------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.wait(REFRESH_SECONDS):
            self.poll()

    def poll(self) -> None:
        try:
            now = time.time()
            snap = Snapshot(now, views.hosts(self.orch), self._operations(now))
        except Exception as exc:  # a broker or database hiccup: say it, keep watching
            snap = Snapshot(time.time(), self.snapshot.hosts if self.snapshot else [],
                            self.snapshot.operations if self.snapshot else [], str(exc))
        with self._lock:
            previous, self.snapshot = self.snapshot, snap
        for line in changes(previous, snap):
            self._event(line)
        if self._live is not None:
            self._live.update(self.render())

    def _operations(self, now: float) -> list[dict[str, Any]]:
        rows = []
        with self.orch.db.read() as s:
            for op in self.orch.ledger.recent_operations(now - ENDED_SHOWN_SECONDS):
                row = _operation_row(op)
                # The application's describers name the subject (Nova: the instance's name).
                described: dict[str, Any] = {}
                for describe in self.orch.describers:
                    describe(s, op, described)
                names = [str(v) for v in described.values() if isinstance(v, str | int)]
                if names:
                    row["subject"] = ", ".join(names)
                rows.append(row)
        return rows

    def _event(self, text: str) -> None:
        line = f"{time.strftime('%H:%M:%S')} {text}"
        with self._lock:
            self.events.append(line)
        if self._live is None:
            print(line, file=self.out, flush=True)

    # -- drawing -----------------------------------------------------------------------------
    def render(self) -> Any:
        from rich.console import Group
        from rich.panel import Panel
        from rich.table import Table
        from rich.text import Text

        snap = self.snapshot
        hosts = Table(title="hosts", title_justify="left", expand=True)
        for name, justify in (("host", "left"), ("state", "left"), ("drain", "left"),
                              ("waiting for", "left"), ("<host>", "right"),
                              ("<host>-alt", "right"), ("in flight", "right")):
            hosts.add_column(name, justify=justify)  # type: ignore[arg-type]
        for h in snap.hosts if snap else []:
            drain = h["drains"][0] if h["drains"] else None
            left = ""
            if drain is not None:
                # The countdown moves between polls too: the view is redrawn 4 times a second.
                left = f"{max(0.0, drain['deadline_in'] - (time.time() - snap.at)):.0f}s left"
            if drain is None and h.get("last_drain"):
                left = f"last: {h['last_drain']['outcome']}"
            queued = h.get("queued", {})
            hosts.add_row(
                h["host"], Text(h["state"], style=STATE_STYLES.get(h["state"], "")), left,
                _waiting(drain), str(queued.get(h["host"], "?")),
                str(queued.get(alt_queue(h["host"]), "?")), str(h["operations_in_flight"]),
            )
        ops = Table(title="operations", title_justify="left", expand=True)
        for name in ("operation", "kind", "subject", "status", "step", "host", "state"):
            ops.add_column(name)
        for o in snap.operations if snap else []:
            ops.add_row(o["id"][:8], o["kind"], o["subject"] or "",
                        Text(o["status"], style=STATUS_STYLES.get(o["status"], "")),
                        o["step"] or "", o["host"] or "", o["step_state"] or "")
        with self._lock:
            events = "\n".join(self.events) or "(nothing yet)"
        footer = Text(f"error: {snap.error}", style="red") if snap and snap.error else Text("")
        return Panel(Group(hosts, ops, Panel(events, title="events"), footer),
                     title=self.title, subtitle=self.subtitle, border_style="blue")


STATE_STYLES = {"up": "green", "draining": "bold yellow", "down": "dim"}
STATUS_STYLES = {"completed": "green", "failed": "red", "running": "cyan"}


def _waiting(drain: dict[str, Any] | None) -> str:
    if drain is None:
        return ""
    w = drain.get("waiting_for") or {}
    items = [f"running: {r}" for r in w.get("running", [])] + list(w.get("operations", []))
    return "\n".join(items) or "nothing: exiting"


def _operation_row(op: Any) -> dict[str, Any]:
    step, host = op.current or (None, None)
    return {"id": op.id, "kind": op.kind, "subject": op.subject, "status": op.status,
            "step": step, "host": host,
            "step_state": op.step_state if op.status not in ("completed", "failed") else None}


def changes(before: Snapshot | None, after: Snapshot) -> list[str]:
    """Event lines for what changed between two snapshots."""
    if after.error and (before is None or before.error != after.error):
        return [f"cannot read the fleet: {after.error}"]
    if before is None:
        return []
    out = []
    was = {h["host"]: h for h in before.hosts}
    for h in after.hosts:
        old = was.get(h["host"])
        if old is None:
            out.append(f"host {h['host']} registered: {h['state']}")
        elif old["state"] != h["state"]:
            out.append(f"host {h['host']}: {old['state']} -> {h['state']}")
        for queue, n in (h.get("queued") or {}).items():
            m = (old or {}).get("queued", {}).get(queue, 0)
            if n != m and (n == 0 or m == 0):
                out.append(f"queue {queue}: {n} message(s) waiting")
    ops_before = {o["id"]: o for o in before.operations}
    for o in reversed(after.operations):
        prev = ops_before.get(o["id"])
        name = f"{o['kind']} {o['id'][:8]}" + (f" ({o['subject']})" if o["subject"] else "")
        if o["status"] in ("completed", "failed"):
            if prev is None or prev["status"] != o["status"]:
                out.append(f"{name} {o['status']}")
        elif prev is None:
            out.append(f"{name} accepted: {o['step']}@{o['host']} {o['step_state']}")
        elif (prev["step"], prev["host"], prev["step_state"]) != (
                o["step"], o["host"], o["step_state"]):
            out.append(f"{name}: {o['step']}@{o['host']} {o['step_state']}")
    return out
