"""A live terminal view of a fleet: hosts, queues, operations, drains and events as they happen.

:class:`Watch` reads the registry, the ledger and the broker (what ``orchestrator hosts`` and
Flower's Hosts page show) every :data:`REFRESH_SECONDS` from a thread of its own, and turns
what changed into event lines: a host going draining or down, an operation moving to its next
step or ending. On a terminal it draws them with ``rich`` (hosts table, operations table,
events); without one (CI, a pipe) it prints each event as a plain time-stamped line, so a log
of a run reads the same as what a person watched.

The view fits the terminal: it shows the hosts that matter first (draining, then down, then
those with work, then the rest by name), the operations in flight before those ended, as
many of each as there are lines for, and says how many more there are and in which state;
the fleet's totals by state are always there.

A fleet of more than :data:`LARGE_FLEET` hosts is not read whole every refresh: every
:data:`TOTALS_SECONDS` its hosts' states and the operations in flight on each (the totals,
and which hosts matter), and every refresh only the hosts shown (their drains, queue depths,
work). So at that scale, a host not shown has its state change told up to
:data:`TOTALS_SECONDS` late, and nothing of its queues (the messages waiting in them); and of
the operations, only those read (as many of each kind as fit, :data:`OPERATIONS_READ` at
least) have their moves told: one that starts and ends among many others in flight and unread
is told when it ends, if it ends among the latest to end. When more than
:data:`HOST_EVENTS_EACH` hosts make the same change at once (a rolling restart), one line
tells it for all of them.
"""

from __future__ import annotations

import sys
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field, replace
from typing import Any

from orchestrator import registry
from orchestrator.ops import views
from orchestrator.routing import alt_queue

REFRESH_SECONDS = 0.25
#: Event lines kept on screen.
EVENTS_SHOWN = 14
#: Operations shown: those in flight and those ended this recently.
ENDED_SHOWN_SECONDS = 120.0
#: A fleet larger than this is read whole every TOTALS_SECONDS, not every refresh.
LARGE_FLEET = 200
TOTALS_SECONDS = 3.0
#: Hosts of a large fleet read every refresh when no terminal says how many fit.
PLAIN_HOSTS_READ = 40
#: Operations read of each kind (in flight, ended) at least: those whose moves are told.
OPERATIONS_READ = 20
#: More hosts than this making one change at once are told in one line.
HOST_EVENTS_EACH = 5
#: Lines of a drain's "waiting for" shown in its host's row.
WAITING_SHOWN = 3
#: Lines the view takes besides its rows: the outer panel's borders, each table's title,
#: borders and header, the events panel's borders.
FRAME_LINES = 2 + 5 + 5 + 2
#: How the lines left are shared out when not everything fits: hosts, operations, events.
SHARES = (2, 1, 1)


@dataclass
class Fleet:
    """Every host's state and its operations in flight, as last read (``at``: the last read
    of them all), and the hosts in the order they are shown (:func:`rank`)."""

    at: float
    states: dict[str, str]
    in_flight: dict[str, int]
    order: list[str] = field(default_factory=list)

    def counts(self) -> Counter[str]:
        return Counter(self.states.values())


@dataclass
class Snapshot:
    at: float
    #: The hosts read (every host of a small fleet; of a large one, those that matter most).
    hosts: list[dict[str, Any]]
    #: The operations read: in flight, newest first, then those ended, the latest first.
    operations: list[dict[str, Any]]
    error: str | None = None
    fleet: Fleet | None = None
    in_flight_total: int = 0
    ended_total: int = 0
    #: When not all were read: the oldest operation in flight read (its creation), and the
    #: oldest ended read (its end). One seen later that is older was there, not new.
    in_flight_since: float | None = None
    ended_since: float | None = None


@dataclass
class Watch:
    """Polls ``orch`` and reports changes; ``live`` draws with rich, else plain lines."""

    orch: Any
    title: str = "orchestrator"
    #: Under the view (where Flower is, say).
    subtitle: str | None = None
    live: bool = field(default_factory=lambda: sys.stdout.isatty())
    out: Any = field(default_factory=lambda: sys.stdout)
    #: The rich console drawn on, whose height the view fits (default: one on ``out``).
    console: Any = None

    def __post_init__(self) -> None:
        self.events: deque[str] = deque(maxlen=EVENTS_SHOWN)
        self.snapshot: Snapshot | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._live: Any = None

    # -- lifecycle ---------------------------------------------------------------------------
    def __enter__(self) -> Watch:
        if self.live:
            from rich.console import Console
            from rich.live import Live

            self.console = self.console or Console(file=self.out)
            self._live = Live(self.render(), console=self.console, refresh_per_second=4,
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
            snap = self._read(time.time())
        except Exception as exc:  # a broker or database hiccup: say it, keep watching
            snap = (replace(self.snapshot, at=time.time(), error=str(exc)) if self.snapshot
                    else Snapshot(time.time(), [], [], str(exc)))
        with self._lock:
            previous, self.snapshot = self.snapshot, snap
        for line in changes(previous, snap):
            self._event(line)
        if self._live is not None:
            self._live.update(self.render())

    def _read(self, now: float) -> Snapshot:
        """Every host of a small fleet; of a large one, the hosts shown, and every
        TOTALS_SECONDS the whole fleet's states and work (which hosts are shown)."""
        fleet = self.snapshot.fleet if self.snapshot else None
        if fleet is None or (len(fleet.states) > LARGE_FLEET
                             and now - fleet.at >= TOTALS_SECONDS):
            fleet = read_fleet(self.orch, now)
        if len(fleet.states) <= LARGE_FLEET:
            hosts = views.hosts(self.orch)
            fleet = Fleet(now, {h["host"]: h["state"] for h in hosts},
                          {h["host"]: h["operations_in_flight"] for h in hosts})
            fleet.order = [h["host"] for h in sorted(hosts, key=_rank_row)]
        else:
            shown = fleet.order[:self._rows_at_most()]
            hosts = views.hosts(self.orch, only=views.HostFilter(names=tuple(shown))) \
                if shown else []
            # What was just read of the hosts shown is newer than the fleet's last read.
            fleet = replace(fleet, states={**fleet.states, **{h["host"]: h["state"]
                                                              for h in hosts}},
                            in_flight={**fleet.in_flight, **{h["host"]: h["operations_in_flight"]
                                                             for h in hosts}})
        return Snapshot(now, hosts, error=None, fleet=fleet, **self._operations(now))

    def _rows_at_most(self) -> int:
        """The most rows the terminal can show of any one table."""
        if self.console is None:
            return PLAIN_HOSTS_READ
        return max(1, self.console.height - FRAME_LINES)

    def _operations(self, now: float) -> dict[str, Any]:
        limit = max(OPERATIONS_READ, self._rows_at_most())
        page = views.live_operations(self.orch, now - ENDED_SHOWN_SECONDS, limit)
        rows = []
        with self.orch.db.read() as s:
            for op in page["in_flight"] + page["ended"]:
                row = _operation_row(op)
                # The application's describers name the subject (Nova: the instance's name).
                described: dict[str, Any] = {}
                for describe in self.orch.describers:
                    describe(s, op, described)
                names = [str(v) for v in described.values() if isinstance(v, str | int)]
                if names:
                    row["subject"] = ", ".join(names)
                rows.append(row)
        in_flight, done = page["in_flight"], page["ended"]
        return {
            "operations": rows,
            "in_flight_total": page["in_flight_total"], "ended_total": page["ended_total"],
            "in_flight_since": in_flight[-1].created_at
            if len(in_flight) < page["in_flight_total"] else None,
            "ended_since": done[-1].finished_at if len(done) < page["ended_total"] else None,
        }

    def _event(self, text: str) -> None:
        line = f"{time.strftime('%H:%M:%S')} {text}"
        with self._lock:
            self.events.append(line)
        if self._live is None:
            print(line, file=self.out, flush=True)

    # -- drawing -----------------------------------------------------------------------------
    def render(self) -> Any:
        """The view, fitted to the console's height (all of it without a console)."""
        from rich.console import Group
        from rich.panel import Panel
        from rich.table import Table
        from rich.text import Text

        snap = self.snapshot
        with self._lock:
            events = list(self.events) or ["(nothing yet)"]
        read = sorted(snap.hosts, key=_rank_row) if snap else []
        ops = snap.operations if snap else []
        fleet = snap.fleet if snap else None
        fleet_size = len(fleet.states) if fleet else len(read)
        heights = [_row_height(h) for h in read]
        error = bool(snap and snap.error)
        if self.console is None:
            n_hosts, n_ops, n_events = len(read), len(ops), len(events)
        else:
            n_hosts, n_ops, n_events = fit(
                self.console.height - FRAME_LINES - error, heights,
                hosts_unread=fleet_size - len(read), ops=len(ops),
                ops_unread=(snap.in_flight_total + snap.ended_total - len(ops)) if snap else 0,
                events=len(events))

        hosts = Table(title=_one_line(_totals(fleet), "table.title"), title_justify="left",
                      expand=True, caption_justify="left", caption=_one_line(
                          _hosts_left(fleet, read[:n_hosts], fleet_size), "table.caption"))
        for name, justify in (("host", "left"), ("state", "left"), ("drain", "left"),
                              ("waiting for", "left"), ("<host>", "right"),
                              ("<host>-alt", "right"), ("in flight", "right")):
            # One line a row (but a drain's waiting items): what fits is counted in rows.
            hosts.add_column(name, justify=justify, no_wrap=True,  # type: ignore[arg-type]
                             overflow="ellipsis", ratio=1 if name == "waiting for" else None)
        for h in read[:n_hosts]:
            drain = h["drains"][0] if h["drains"] else None
            left = ""
            if drain is not None:
                left = f"{max(0.0, drain['deadline_in'] - (time.time() - snap.at)):.0f}s left"
            if drain is None and h.get("last_drain"):
                left = f"last: {h['last_drain']['outcome']}"
            queued = h.get("queued", {})
            hosts.add_row(
                h["host"], Text(h["state"], style=STATE_STYLES.get(h["state"], "")), left,
                _waiting(drain), str(queued.get(h["host"], "?")),
                str(queued.get(alt_queue(h["host"]), "?")), str(h["operations_in_flight"]),
            )
        table = Table(title=_one_line(_operations_title(snap), "table.title"),
                      title_justify="left", expand=True, caption_justify="left",
                      caption=_one_line(_operations_left(snap, ops[:n_ops]), "table.caption"))
        for name in ("operation", "kind", "subject", "status", "step", "host", "state"):
            table.add_column(name, no_wrap=True, overflow="ellipsis")
        for o in ops[:n_ops]:
            table.add_row(o["id"][:8], o["kind"], o["subject"] or "",
                          Text(o["status"], style=STATUS_STYLES.get(o["status"], "")),
                          o["step"] or "", o["host"] or "", o["step_state"] or "")
        shown_events = _one_line("\n".join(events[len(events) - n_events:]))
        parts: list[Any] = [hosts, table, Panel(shown_events, title="events")]
        if error:
            parts.append(_one_line(f"error: {snap.error}", style="red"))
        return Panel(Group(*parts), title=self.title, subtitle=self.subtitle,
                     border_style="blue")


STATE_STYLES = {"up": "green", "draining": "bold yellow", "down": "dim"}
STATUS_STYLES = {"completed": "green", "failed": "red", "running": "cyan"}


def read_fleet(orch: Any, now: float) -> Fleet:
    """Every host's state and operations in flight (one read of the registry, one grouped
    read of the ledger), and the hosts in the order they are shown."""
    states = registry.host_states(orch.registry.services())
    in_flight = orch.ledger.in_flight_by_host()
    order = sorted(states, key=lambda h: (*views.rank(states[h], in_flight.get(h, 0)), h))
    return Fleet(now, states, in_flight, order)


def _work(h: dict[str, Any]) -> int:
    return h["operations_in_flight"] + sum((h.get("queued") or {}).values())


def _rank_row(h: dict[str, Any]) -> tuple[int, int, str]:
    return (*views.rank(h["state"], _work(h)), h["host"])


def _row_height(h: dict[str, Any]) -> int:
    return max(1, len(_waiting(h["drains"][0]).splitlines())) if h["drains"] else 1


def fit(lines: int, heights: list[int], hosts_unread: int, ops: int, ops_unread: int,
        events: int) -> tuple[int, int, int]:
    """How many hosts (rows of ``heights`` lines, then ``hosts_unread`` more of one), operations
    and event lines fit in ``lines``, a line kept for each table's "+ N more" once it has
    more than it shows."""
    host_lines = sum(heights) + hosts_unread
    captions = 0
    while True:
        room = max(0, lines - captions)
        want_hosts, want_ops, n_events = _share(room, [host_lines, ops, events], SHARES)
        n_hosts = 0
        for height in heights:
            if want_hosts < height:
                break
            want_hosts -= height
            n_hosts += 1
        n_ops = min(want_ops, ops)
        needed = (n_hosts < len(heights) + hosts_unread) + (n_ops < ops + ops_unread)
        if needed <= captions:
            return n_hosts, n_ops, n_events
        captions = needed


def _share(lines: int, wants: list[int], weights: tuple[int, ...]) -> list[int]:
    """``lines`` shared by ``weights`` among parts that want ``wants`` at most; what one does
    not take goes to the others."""
    got = [0] * len(wants)
    while lines > 0:
        open_ = [i for i, want in enumerate(wants) if got[i] < want]
        if not open_:
            break
        weight = sum(weights[i] for i in open_)
        given = 0
        for i in open_:
            n = min(wants[i] - got[i], lines * weights[i] // weight)
            got[i] += n
            given += n
        if not given:  # less than a line each: the first in line takes one
            got[open_[0]] += 1
            given = 1
        lines -= given
    return got


def _one_line(text: str, style: str = "") -> Any:
    """Text whose lines are cut (…), never wrapped: one line on screen for each."""
    from rich.text import Text

    return Text(text, style=style, no_wrap=True, overflow="ellipsis")


def _states(counts: Counter[str]) -> str:
    return ", ".join(f"{counts[s]:,} {s}" for s in ("up", "draining", "down") if counts[s])


def _totals(fleet: Fleet | None) -> str:
    if fleet is None:
        return "hosts"
    busy = sum(1 for n in fleet.in_flight.values() if n)
    return (f"hosts: {len(fleet.states):,}" + (f" ({_states(fleet.counts())})"
                                                if fleet.states else "")
            + (f"; {busy:,} with operations in flight" if busy else ""))


def _hosts_left(fleet: Fleet | None, shown: list[dict[str, Any]], fleet_size: int) -> str:
    """"+ N more: ..." of the hosts not shown, by state, and the command that lists them."""
    if fleet is None or len(shown) >= fleet_size:
        return ""
    left = fleet.counts() - Counter(h["state"] for h in shown)
    seen = {h["host"] for h in shown}
    busy = sum(1 for host, n in fleet.in_flight.items() if n and host not in seen)
    states = [s for s in ("draining", "down") if left[s]]
    how = ("orchestrator hosts " + " ".join(f"--state {s}" for s in states) if states
           else "orchestrator hosts --busy" if busy else "orchestrator hosts")
    return (f"+ {fleet_size - len(shown):,} more: {_states(left)}"
            + (f"; {busy:,} with operations in flight" if busy else "") + f" ({how} to list)")


def _operations_title(snap: Snapshot | None) -> str:
    if snap is None:
        return "operations"
    return (f"operations: {snap.in_flight_total:,} in flight, {snap.ended_total:,} ended in "
            f"the last {ENDED_SHOWN_SECONDS:.0f}s")


def _operations_left(snap: Snapshot | None, shown: list[dict[str, Any]]) -> str:
    if snap is None or len(shown) >= snap.in_flight_total + snap.ended_total:
        return ""
    done = sum(1 for o in shown if o["status"] in ("completed", "failed"))
    in_flight, done = snap.in_flight_total - (len(shown) - done), snap.ended_total - done
    return (f"+ {in_flight + done:,} more: {in_flight:,} in flight, {done:,} ended "
            "(orchestrator operation ID shows one)")


def _waiting(drain: dict[str, Any] | None) -> str:
    if drain is None:
        return ""
    w = drain.get("waiting_for") or {}
    items = [f"running: {r}" for r in w.get("running", [])] + list(w.get("operations", []))
    if len(items) > WAITING_SHOWN:
        items[WAITING_SHOWN - 1:] = [f"and {len(items) - WAITING_SHOWN + 1} more"]
    return "\n".join(items) or "nothing: exiting"


def _operation_row(op: Any) -> dict[str, Any]:
    step, host = op.current or (None, None)
    return {"id": op.id, "kind": op.kind, "subject": op.subject, "status": op.status,
            "step": step, "host": host,
            "step_state": op.step_state if op.status not in ("completed", "failed") else None,
            "created_at": op.created_at, "finished_at": op.finished_at}


def changes(before: Snapshot | None, after: Snapshot) -> list[str]:
    """Event lines for what changed between two snapshots: of hosts, what either read of them
    (the fleet's states, a host's queues read both times); of operations, those read."""
    if after.error and (before is None or before.error != after.error):
        return [f"cannot read the fleet: {after.error}"]
    if before is None or before.fleet is None or after.fleet is None:
        return []
    out = []
    was, now = before.fleet.states, after.fleet.states
    moved: dict[tuple[str | None, str], list[str]] = {}
    for host, state in now.items():
        if was.get(host) != state:
            moved.setdefault((was.get(host), state), []).append(host)
    told_each = set()
    for (old, new), hosts in moved.items():
        if len(hosts) > HOST_EVENTS_EACH:
            some = ", ".join(sorted(hosts)[:3])
            change = f"registered: {new}" if old is None else f"{old} -> {new}"
            out.append(f"{len(hosts):,} hosts {change} ({some} and {len(hosts) - 3:,} more)")
        else:
            told_each.update(hosts)
    read_before = {h["host"]: h for h in before.hosts}
    read_now = {h["host"]: h for h in after.hosts}
    for host in sorted(told_each | set(read_now)):
        if host in told_each:
            old_state = was.get(host)
            out.append(f"host {host} registered: {now[host]}" if old_state is None
                       else f"host {host}: {old_state} -> {now[host]}")
        h = read_now.get(host)
        if h is None or (host not in read_before and host in was):
            continue  # its queues were not read both times: nothing to compare
        for queue, n in (h.get("queued") or {}).items():
            m = read_before.get(host, {}).get("queued", {}).get(queue, 0)
            if n != m and (n == 0 or m == 0):
                out.append(f"queue {queue}: {n} message(s) waiting")
    ops_before = {o["id"]: o for o in before.operations}
    for o in sorted(after.operations, key=lambda o: o["created_at"]):
        prev = ops_before.get(o["id"])
        name = f"{o['kind']} {o['id'][:8]}" + (f" ({o['subject']})" if o["subject"] else "")
        if o["status"] in ("completed", "failed"):
            if prev is None and before.ended_since is not None \
                    and (o["finished_at"] or 0) <= before.ended_since:
                continue  # had ended, among more than were read
            if prev is None or prev["status"] != o["status"]:
                out.append(f"{name} {o['status']}")
        elif prev is None:
            if before.in_flight_since is not None and o["created_at"] <= before.in_flight_since:
                continue  # was in flight, among more than were read
            out.append(f"{name} accepted: {o['step']}@{o['host']} {o['step_state']}")
        elif (prev["step"], prev["host"], prev["step_state"]) != (
                o["step"], o["host"], o["step_state"]):
            out.append(f"{name}: {o['step']}@{o['host']} {o['step_state']}")
    return out
