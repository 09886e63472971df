"""routing.yaml: which queue of its host each step goes to, and the Celery router that applies it.

Each host consumes two queues: ``<host>`` takes new requests and is dropped at once on SIGTERM;
``<host>-alt`` keeps being consumed while the host drains, so an operation that has started can
finish. Operators choose, step by step, which queue a step uses; a mistake in that file must stop
the process with the file, line and key, never fall back silently to a default.

During a rolling upgrade some hosts run an older service version that consumes only ``<host>``.
Nova caps the RPC version at the deployment's minimum, so one old compute turns alt routing off
everywhere; here the router decides per target host (:class:`AltCapability`, a cached snapshot
of the service registry), and ``ORCHESTRATOR_ALT_ROUTING`` can force it either way.
"""

from __future__ import annotations

import difflib
import logging
import os
import threading
import time
import weakref
from collections import Counter
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from orchestrator.errors import OrchestratorError
from orchestrator.names import ALT_SUFFIX
from orchestrator.redact import error_text, printable

logger = logging.getLogger(__name__)

QueueKind = Literal["main", "alt"]
AltRoutingMode = Literal["auto", "always", "never"]
_ENTRY_FIELDS = {"queue", "reason", "versions"}


class RoutingError(OrchestratorError, ValueError):
    """routing.yaml is unusable; ``str()`` reads ``path:line: key: problem``."""

    def __init__(self, path: Path | str, line: int | None, key: str | None, problem: str):
        self.path, self.line, self.key, self.problem = str(path), line, key, problem
        where = f"{self.path}:{line}" if line else self.path
        super().__init__(f"{where}: {key}: {problem}" if key else f"{where}: {problem}")


class MissingHostError(OrchestratorError, ValueError):
    """A step was sent without the host that must run it."""


def alt_queue(host: str) -> str:
    return host + ALT_SUFFIX


def split_queue(queue: str) -> tuple[str, QueueKind]:
    """``'compute1-alt'`` -> ``('compute1', 'alt')``; ``'compute1'`` -> ``('compute1', 'main')``."""
    if queue.endswith(ALT_SUFFIX) and len(queue) > len(ALT_SUFFIX):
        return queue[: -len(ALT_SUFFIX)], "alt"
    return queue, "main"


@dataclass(frozen=True)
class Route:
    step: str
    queue: QueueKind
    reason: str
    line: int
    #: The code versions that serve the step (``versions: [...]``), empty when not said: an
    #: entry for a step this code does not register is accepted only when it says so.
    versions: tuple[str, ...] = ()


@dataclass(frozen=True)
class RoutingTable:
    path: Path
    routes: Mapping[str, Route]
    #: The steps this code answers to under an older name: alias -> step.
    aliases: Mapping[str, str] = field(default_factory=dict)

    def route(self, step: str) -> Route | None:
        """The entry for ``step``, or for the step it is an alias of."""
        found = self.routes.get(step)
        if found is None and step in self.aliases:
            found = self.routes.get(self.aliases[step])
        return found

    def kind(self, step: str) -> QueueKind:
        found = self.route(step)
        if found is None:
            raise KeyError(step)
        return found.queue


def _suggest(word: str, choices: Collection[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def _scalar(node: yaml.Node, path: Path, key: str, field: str) -> str:
    if not isinstance(node, yaml.ScalarNode) or not str(node.value).strip():
        raise RoutingError(
            path, node.start_mark.line + 1, key, f"{field!r} must be a non-empty string"
        )
    return str(node.value)


def _entry(key_node: yaml.Node, value: yaml.Node, path: Path) -> Route:
    step, line = str(key_node.value), key_node.start_mark.line + 1
    if not isinstance(value, yaml.MappingNode):
        raise RoutingError(
            path, line, step, "expected a mapping like {queue: alt, reason: '...'}"
        )
    fields: dict[str, yaml.Node] = {}
    for field_node, field_value in value.value:
        field = str(field_node.value)
        fline = field_node.start_mark.line + 1
        if field not in _ENTRY_FIELDS:
            raise RoutingError(
                path, fline, step,
                f"unknown field {field!r} (expected: queue, reason, versions)"
                + _suggest(field, _ENTRY_FIELDS),
            )
        if field in fields:
            raise RoutingError(path, fline, step, f"duplicate field {field!r}")
        fields[field] = field_value
    for field in ("queue", "reason"):
        if field not in fields:
            raise RoutingError(path, line, step, f"missing {field!r}")
    queue = _scalar(fields["queue"], path, step, "queue")
    if queue not in ("main", "alt"):
        raise RoutingError(
            path, fields["queue"].start_mark.line + 1, step,
            f"queue must be 'main' or 'alt', not {queue!r}",
        )
    reason = _scalar(fields["reason"], path, step, "reason")
    versions: tuple[str, ...] = ()
    if "versions" in fields:
        node = fields["versions"]
        if not isinstance(node, yaml.SequenceNode) or not node.value or not all(
                isinstance(v, yaml.ScalarNode) and str(v.value).strip() for v in node.value):
            raise RoutingError(path, node.start_mark.line + 1, step,
                               "'versions' must be a list of code versions, like [\"2\"]")
        versions = tuple(str(v.value) for v in node.value)
    return Route(step=step, queue=queue, reason=reason, line=line,  # type: ignore[arg-type]
                 versions=versions)


def parse_routing(text: str, path: Path, known_steps: Collection[str],
                  code_version: str | None = None) -> RoutingTable:
    """Validate the text of a routing file against the steps registered on the app.

    ``known_steps`` names every step this code serves; a mapping gives each name the step it
    stands for (an alias: ``{"copy_in": "install"}``, besides ``{"install": "install"}``).
    Every step needs an entry (an alias may share its step's). An entry for a name this code
    does not serve is a mistake (with "did you mean"), unless it lists the ``versions`` of
    the code that serves it, and ``code_version`` (this code's) is not among them: one file
    for a fleet that runs two versions during a rollout."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except RecursionError:
        raise RoutingError(path, None, None, "YAML nested too deep") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(exc, "problem", None) or str(exc)
        raise RoutingError(path, line, None, f"YAML syntax error: {problem}") from None
    if not isinstance(root, yaml.MappingNode):
        raise RoutingError(path, None, None, "expected a mapping with a 'steps' key")
    top: dict[str, yaml.Node] = {}
    for key_node, value in root.value:
        key = str(key_node.value)
        if key != "steps":
            raise RoutingError(
                path, key_node.start_mark.line + 1, key, "unknown top-level key (expected: steps)"
            )
        if key in top:
            raise RoutingError(path, key_node.start_mark.line + 1, key, "duplicate key")
        top[key] = value
    steps_node = top.get("steps")
    if not isinstance(steps_node, yaml.MappingNode):
        line = steps_node.start_mark.line + 1 if steps_node is not None else None
        raise RoutingError(path, line, "steps", "expected a mapping of step name to route")
    routes: dict[str, Route] = {}
    for key_node, value in steps_node.value:
        step, line = str(key_node.value), key_node.start_mark.line + 1
        if step in routes:
            raise RoutingError(
                path, line, step, f"duplicate key (first at line {routes[step].line})"
            )
        route = _entry(key_node, value, path)
        if step not in known_steps:
            if not route.versions:
                raise RoutingError(path, line, step, "unknown step" + (
                    _suggest(step, known_steps)
                    or " (a step of another code version says so: versions: [...])"))
            if code_version is not None and code_version in route.versions:
                raise RoutingError(
                    path, line, step, f"listed for version {code_version!r}, this code's, "
                    "which does not register it" + _suggest(step, known_steps))
        routes[step] = route
    aliases = ({name: canonical for name, canonical in known_steps.items() if name != canonical}
               if isinstance(known_steps, Mapping) else {})
    missing = sorted(name for name in known_steps
                     if name not in routes and not (name in aliases and aliases[name] in routes))
    if missing:
        raise RoutingError(
            path, steps_node.start_mark.line + 1, "steps",
            "no route for step(s) " + ", ".join(missing) + " (every step needs main or alt)",
        )
    return RoutingTable(path=path, routes=routes, aliases=aliases)


#: A routing file larger than this is refused unread: a few hundred steps take a few tens of
#: KiB, and every process reads the file again at each edit.
MAX_ROUTING_FILE_BYTES = 1024 * 1024


#: What to do about a routing file that cannot be read, by where its path came from.
HINTS = {
    "default": "set ORCHESTRATOR_ROUTING_FILE, or run from the directory that holds "
               "routing.yaml",
    "environment": "ORCHESTRATOR_ROUTING_FILE names it: check that setting",
    "application": "the application names it (Orchestrator(routing=...), relative to the "
                   "application's module): fix the path there",
    "argument": "the path given on the command line: check it",
}


def read_routing_text(path: Path, origin: str = "default") -> str:
    """The file's text, or a :class:`RoutingError` naming the file (and the line of a byte
    that is not UTF-8): a file that cannot be read is one more invalid edit, never a crash.
    ``origin`` (a key of :data:`HINTS`): where the path came from, which says what to fix."""
    try:
        with path.open("rb") as f:
            data = f.read(MAX_ROUTING_FILE_BYTES + 1)
    except OSError as exc:
        raise RoutingError(
            path, None, None,
            f"cannot read routing file: {exc.strerror} ({HINTS[origin]})",
        ) from None
    if len(data) > MAX_ROUTING_FILE_BYTES:
        raise RoutingError(path, None, None, f"larger than {MAX_ROUTING_FILE_BYTES} bytes; "
                           "not a routing file")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise RoutingError(path, line, None, f"not UTF-8 (byte {data[exc.start]:#04x} at "
                           f"offset {exc.start}); save the file as UTF-8") from None


def load_routing(path: Path | str, known_steps: Collection[str],
                 code_version: str | None = None, origin: str = "default") -> RoutingTable:
    path = Path(path)
    return parse_routing(read_routing_text(path, origin), path, known_steps, code_version)


#: How often a process looks at routing.yaml's modification (a stat, at most once a second, on
#: a routing decision or a worker's tick): an edit is in force within two seconds everywhere.
RELOAD_CHECK_SECONDS = 1.0


def _signature(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino


class RoutingSource:
    """routing.yaml, loaded, and loaded again when the file changes.

    :meth:`check` (cheap: one ``stat`` at most every :data:`RELOAD_CHECK_SECONDS`) reads the
    file again when its modification time, size or inode changed. The new table replaces the
    old one in a single assignment, and only once it parsed and validated in full: a router
    never sees a half-read file, and a file caught half-written fails validation (every step
    must be listed) and is read again at the next change. An invalid edit keeps the table in
    force and is logged once, with the file, the line and the key.
    """

    def __init__(
        self, path: Path | str, known_steps: Callable[[], Collection[str]],
        clock: Callable[[], float] = time.monotonic, code_version: str | None = None,
        origin: str = "default",
    ) -> None:
        self.path, self.known_steps, self.clock = Path(path), known_steps, clock
        self.code_version, self.origin = code_version, origin
        self._signature = _signature(self.path)
        self.table = load_routing(self.path, known_steps(), code_version, origin)
        #: Wall-clock time the table in force was read.
        self.loaded_at = time.time()
        #: The error of the last edit that could not be used (None once one could).
        self.error: RoutingError | None = None
        self._checked = clock()
        self._lock = threading.Lock()
        self.on_change: list[Callable[[RoutingTable], None]] = []

    def check(self, force: bool = False) -> RoutingTable:
        """The table in force, read again first if the file changed since the last look."""
        now = self.clock()
        if not force and now - self._checked < RELOAD_CHECK_SECONDS:
            return self.table
        if not self._lock.acquire(blocking=False):
            return self.table  # another thread is reloading it
        try:
            self._checked = now
            signature = _signature(self.path)
            if signature == self._signature:
                return self.table
            try:
                table = load_routing(self.path, self.known_steps(), self.code_version,
                                     self.origin)
            except RoutingError as exc:
                if self.error is None or str(exc) != str(self.error):
                    logger.error("routing: %s; keeping the table read at %s", printable(exc),
                                 time.strftime("%H:%M:%S", time.localtime(self.loaded_at)))
                self.error = exc
                self._signature = signature
                return self.table
            if _signature(self.path) != signature:  # written again while we read it
                return self.table
            changed = sorted(
                f"{step} {old.queue}->{table.routes[step].queue}"
                for step, old in self.table.routes.items()
                if step in table.routes and table.routes[step].queue != old.queue
            )
            self.table, self.loaded_at, self.error = table, time.time(), None
            self._signature = signature
            logger.warning("routing: %s reloaded (%s)", printable(self.path),
                           ", ".join(changed) if changed else "no queue changed")
            for callback in self.on_change:
                callback(table)
            return table
        finally:
            self._lock.release()


#: What a host offers alt steps: alt (a live version-2 service consumes ``<host>-alt``), no-alt
#: (live, but nothing consumes its alt queue: a legacy or main-only service), down (every
#: service down or its heartbeat stale), unknown (not in the registry).
AltStatus = Literal["alt", "no-alt", "down", "unknown"]


@dataclass(frozen=True)
class AltSnapshot:
    """What the service registry said at one moment: the hosts it knows, those with a live
    service, and those that advertise alt support."""

    known: frozenset[str]
    live: frozenset[str]
    alt: frozenset[str]
    #: Hosts counted down only because their alt-consuming services went silent (a stale
    #: heartbeat, last recorded up or draining), with those services' names: a second
    #: witness may still hear them (``AltCapability``).
    silent_alt: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    def status(self, host: str) -> AltStatus:
        if host in self.alt:
            return "alt"
        if host in self.live:
            return "no-alt"
        return "down" if host in self.known else "unknown"


_caches: weakref.WeakSet[AltCapability] = weakref.WeakSet()
_fork_hook: list[bool] = []


def _reset_caches_after_fork() -> None:
    for cache in list(_caches):
        cache.after_fork()


def _watch_forks() -> None:
    """Registered with the first cache, not at import: importing this module changes nothing."""
    if not _fork_hook and hasattr(os, "register_at_fork"):
        os.register_at_fork(after_in_child=_reset_caches_after_fork)
        _fork_hook.append(True)


#: Hosts whose registry rows a router keeps before it drops those past their window.
_KEPT_HOSTS = 4096


class AltCapability:
    """Per-host alt support, from what the registry said of that host at most ``ttl``
    seconds ago.

    ``loader(host)`` reads the registry's rows of one host (an indexed query); the answer is
    kept for ``ttl`` and read again by the first lookup of that host after it expires, so a
    process asks the registry at most once per ``ttl`` for each host it routes to, however
    many steps it routes, and a decision is never based on an answer older than ``ttl``. A
    process never reads the whole registry to route: at 10,000 hosts that read took a pool
    process a tenth of a second or more every ``ttl``, which the step it was routing waited
    for. If the registry cannot be read, the previous answer is kept (and retried after
    ``ttl``); with none at all the host counts as unknown, except when the ledger is
    unreachable (a ``ConnectionError``, as LedgerUnavailable is): that is raised, for the
    caller to wait for it rather than route on no knowledge. A forked child (prefork pool)
    starts with nothing kept and a fresh lock.
    """

    def __init__(
        self, loader: Callable[[str], AltSnapshot], ttl: float,
        clock: Callable[[], float] = time.monotonic,
        witness: Callable[[str], bool] | None = None,
    ):
        self.loader, self.ttl, self.clock = loader, ttl, clock
        #: Whether a worker (by name) answers over the broker: asked before a host whose
        #: alt-consuming services went silent is taken for down (its alt steps would go to
        #: ``<host>``, which a draining worker no longer consumes).
        self.witness = witness
        self._kept: dict[str, tuple[AltSnapshot | None, float]] = {}
        self._lock = threading.Lock()
        #: Registry queries made (the cost the cache bounds).
        self.loads = 0
        _caches.add(self)
        _watch_forks()

    def after_fork(self) -> None:
        self._lock = threading.Lock()
        self.invalidate()

    def invalidate(self) -> None:
        """Forget what was read: the next lookup of each host reads the registry."""
        self._kept = {}

    def snapshot(self, host: str) -> AltSnapshot | None:
        """What the registry said of ``host``, at most ``ttl`` seconds ago."""
        snap, loaded_at = self._kept.get(host, (None, float("-inf")))
        if self.clock() - loaded_at < self.ttl:
            return snap
        with self._lock:
            snap, loaded_at = self._kept.get(host, (None, float("-inf")))
            now = self.clock()
            if now - loaded_at < self.ttl:  # another thread read it meanwhile
                return snap
            try:
                self.loads += 1
                snap = self.loader(host)
            except Exception as exc:
                if snap is None and isinstance(exc, ConnectionError):
                    # The ledger does not answer and nothing is known: "unknown" would send
                    # an alt step to a draining host's main queue. The caller waits instead.
                    raise
                logger.warning(
                    "routing: cannot read the service registry (%s); keeping what it said of "
                    "%s %.1fs ago", error_text(exc), host, now - loaded_at,
                )
            self._kept[host] = (snap, now)
            if len(self._kept) > _KEPT_HOSTS:  # hosts no longer routed to: dropped
                self._kept = {h: kept for h, kept in self._kept.items()
                              if now - kept[1] < self.ttl}
            return snap

    def status(self, host: str) -> AltStatus:
        snap = self.snapshot(host)
        if snap is None:
            return "unknown"
        found = snap.status(host)
        if found == "down" and self.witness is not None and any(
                self.witness(node) for node in snap.silent_alt.get(host, ())):
            return "alt"
        return found


@dataclass(frozen=True)
class Decision:
    """Where one step goes, and why."""

    step: str
    host: str
    queue: str
    #: What routing.yaml asks for this step.
    wanted: QueueKind
    #: table (as routing.yaml says); for an alt step sent to <host>: no-alt, down or unknown
    #: (the host's :data:`AltStatus`), or forced-main (ORCHESTRATOR_ALT_ROUTING=never).
    reason: str

    @property
    def fallback(self) -> bool:
        """An alt step sent to ``<host>`` instead."""
        return self.wanted == "alt" and self.queue == self.host


class StepRouter:
    """Celery router (``task_routes``): a step goes to a queue of its target host.

    The host is the step's ``host`` keyword argument. A step sent without one raises at send
    time: on the default queue nobody would run it, and nobody would notice.

    ``mode`` (``ORCHESTRATOR_ALT_ROUTING``) decides what an alt step does: ``always`` sends it
    to ``<host>-alt`` (routing.yaml alone, as when every host is current); ``never`` sends it
    to ``<host>``; ``auto`` asks ``capability`` (cached) for the host's :data:`AltStatus` and
    sends it to ``<host>-alt`` only for ``alt``; a legacy, down or unknown host gets
    ``<host>``, which every service version consumes. Main steps always go to ``<host>``. Every
    alt step sent to ``<host>`` is logged at debug, counted in :attr:`counts` and passed to
    ``on_fallback``.
    """

    def __init__(
        self, table: RoutingTable, mode: AltRoutingMode = "always",
        capability: AltCapability | None = None,
        on_fallback: Callable[[Decision], None] | None = None,
        task_prefix: str = "",
    ):
        if mode not in ("auto", "always", "never"):
            raise ValueError(f"unknown alt routing mode {mode!r}")
        if mode == "auto" and capability is None:
            raise ValueError("alt routing mode 'auto' needs a capability source")
        self.table, self.mode, self.capability = table, mode, capability
        self.on_fallback = on_fallback
        #: Celery task names are the step names under this prefix.
        self.task_prefix = task_prefix
        #: Alt steps sent to ``<host>`` in this process, by ``(host, reason)``.
        self.counts: Counter[tuple[str, str]] = Counter()

    def decide(self, step: str, host: str, record: bool = True) -> Decision:
        """Where ``step`` for ``host`` goes (no registry query while the cache is fresh).
        ``record=False`` (``orchestrator routing explain``) counts no fallback."""
        if not isinstance(host, str) or not host:
            raise MissingHostError(f"step {step!r} sent without a target host (kwarg 'host')")
        if self.table.route(step) is None:
            raise RoutingError(self.table.path, None, step, "step has no route")
        wanted = self.table.kind(step)
        if wanted == "main":
            return Decision(step, host, host, wanted, "table")
        if self.mode == "never":
            return self._fallback(Decision(step, host, host, wanted, "forced-main"), record)
        if self.mode == "always":
            # No registry query: the operator says every host consumes its alt queue.
            return Decision(step, host, alt_queue(host), wanted, "table")
        assert self.capability is not None
        status = self.capability.status(host)
        if status == "alt":
            return Decision(step, host, alt_queue(host), wanted, "table")
        return self._fallback(Decision(step, host, host, wanted, status), record)

    def record(self, decision: Decision) -> None:
        """Count a fallback decided with ``record=False``, once the step was really sent."""
        if decision.fallback:
            self._fallback(decision)

    def _fallback(self, decision: Decision, record: bool = True) -> Decision:
        if not record:
            return decision
        self.counts[(decision.host, decision.reason)] += 1
        logger.debug(
            "routing: %s is an alt step; sending it to %s (%s, ORCHESTRATOR_ALT_ROUTING=%s)",
            decision.step, decision.queue, decision.reason, self.mode,
        )
        if self.on_fallback is not None:
            try:
                self.on_fallback(decision)
            except Exception as exc:  # counting must never stop a step from being sent
                logger.warning("routing: could not record a fallback: %s", error_text(exc))
        return decision

    def queue(self, step: str, host: str) -> str:
        """The queue of ``host`` that ``step`` goes to."""
        return self.decide(step, host).queue

    def stats(self) -> dict[str, Any]:
        """This process's routing counters (the registry holds the fleet-wide ones)."""
        fallbacks: dict[str, dict[str, int]] = {}
        for (host, reason), n in sorted(self.counts.items()):
            fallbacks.setdefault(host, {})[reason] = n
        return {
            "mode": self.mode,
            "cache_seconds": None if self.capability is None else self.capability.ttl,
            "registry_loads": 0 if self.capability is None else self.capability.loads,
            "alt_to_main": fallbacks,
        }

    def step_of_task(self, name: str) -> str | None:
        """The step a Celery task name stands for; None for any other task."""
        if not name.startswith(self.task_prefix):
            return None
        step = name[len(self.task_prefix):]
        return step if self.table.route(step) is not None else None

    def __call__(
        self, name: str, args: Any, kwargs: Mapping[str, Any] | None, options: Any,
        task: Any = None, **kw: Any,
    ) -> dict[str, str] | None:
        step = self.step_of_task(name)
        if step is None:
            return None
        if options and options.get("queue"):
            # An explicit queue wins over any router (the dispatcher, orchestrator.dispatch,
            # already decided and counted); deciding again here would count it twice.
            return None
        return {"queue": self.queue(step, (kwargs or {}).get("host"))}  # type: ignore[arg-type]
