"""Ledger connections a process holds only while it uses them (PostgreSQL).

A worker's processes each keep connections to the ledger: the main process for its heartbeat
and looks, every pool process for the steps it runs, in two pools (transactions, and the
autocommit statements of :class:`~orchestrator.ledger.driver.Direct`, whose main-thread
connection stays checked out). Kept for good, an idle fleet of 10,000 hosts with ``-c 4``
holds 50,000 server connections, where PostgreSQL's default ``max_connections`` is 100.

:class:`IdleConnections` closes what a process has not used for ``idle_after`` seconds, from
one daemon thread per process that sleeps in between: a busy process keeps its connections
(each costs a connect and authentication to make again), an idle one holds none, and the
next statement connects anew. SQLite's connections are a file's, and stay.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import Engine, event

#: A connection unused this long is closed. Longer than an idle worker's heartbeat interval
#: (60 s by default), so that its heartbeat keeps the one connection it uses: a connection
#: made anew costs PostgreSQL a backend (a fork and an authentication) and counts as one more
#: transaction in its statistics, which at every beat would double an idle host's cost (seen
#: with 40 real idle workers: 0.037 transactions a second each against 0.019). The pool
#: processes of an idle worker, and its main thread between two asks for the lease, let go.
IDLE_CLOSE_SECONDS = 90.0

#: The main thread's kept connection (:class:`~orchestrator.ledger.driver.Direct`) goes back
#: to its pool once unused this long, where other threads (the heartbeat's) take it: an idle
#: worker's main thread asks for the fleet's lease every few minutes, and kept for the full
#: ``IDLE_CLOSE_SECONDS`` its connection stood beside the heartbeat's (1.7 connections an
#: idle worker, measured with 40 real ones). A step path that runs steps keeps it.
GIVE_BACK_SECONDS = 5.0


class IdleConnections:
    """The engines and direct runners of one process, and the thread that closes their idle
    connections."""

    def __init__(self, idle_after: float = IDLE_CLOSE_SECONDS,
                 give_back_after: float = GIVE_BACK_SECONDS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.idle_after = idle_after
        self.clock = clock
        self.give_back_after = give_back_after
        self._engines: list[Engine] = []
        self._directs: list[Any] = []
        self._used: dict[int, float] = {}
        #: When each engine last had two connections out at once.
        self._crowded: dict[int, float] = {}
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def watch(self, engine: Engine) -> None:
        """Close ``engine``'s pooled connections once none is out and the last came back
        ``idle_after`` seconds ago; or, when it keeps more than one, once it has not needed
        two at a time for ``idle_after`` seconds. A pool hands its connections out in turn,
        so a second one, made when two threads met (a heartbeat during a look), stays in
        use, and open, for as long as the process lives: one more connection for good,
        for one moment's need."""
        key = id(engine)

        def used(*_: Any) -> None:
            self._used[key] = self.clock()

        def out(*_: Any) -> None:
            used()
            if engine.pool.checkedout() > 1:  # type: ignore[attr-defined]
                self._crowded[key] = self._used[key]

        used()  # watched when made, to be used at once: not idle since ever
        # Nor uncrowded since ever: what it needed before it was watched is not known.
        self._crowded[key] = self._used[key]

        event.listen(engine, "checkout", out)
        event.listen(engine, "checkin", used)
        with self._lock:
            self._engines.append(engine)
        self._start()

    def watch_direct(self, direct: Any) -> None:
        """Give ``direct``'s kept connection back to its pool once unused for
        ``give_back_after`` seconds (closed with the pool's, once idle)."""
        with self._lock:
            self._directs.append(direct)
        self._start()

    def close_idle(self) -> int:
        """Give back the kept connections unused for ``give_back_after`` seconds, close the
        pools unused for ``idle_after``; how many of either."""
        closed = 0
        with self._lock:
            directs, engines = list(self._directs), list(self._engines)
        for direct in directs:
            closed += direct.give_back_if_idle(self.give_back_after)
        now = self.clock()
        for engine in engines:
            pool, key = engine.pool, id(engine)
            if pool.checkedout() != 0 or pool.checkedin() == 0:  # type: ignore[attr-defined]
                continue
            idle = now - self._used.get(key, 0.0) >= self.idle_after
            uncrowded = now - self._crowded.get(key, 0.0) >= self.idle_after
            if idle or (uncrowded and pool.checkedin() > 1):  # type: ignore[attr-defined]
                pool.dispose()
                closed += 1
        return closed

    def _start(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="ledger-idle",
                                                daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            time.sleep(min(self.give_back_after, self.idle_after / 2))
            with contextlib.suppress(Exception):  # a close that fails: the next one tries
                self.close_idle()
