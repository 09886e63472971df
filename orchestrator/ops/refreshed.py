"""A read kept a few seconds and renewed in the background, for the operator endpoints.

Flower's ``/metrics``, its Hosts page and ``orchestrator metrics --port`` show what a read of
the registry, the ledger and the broker says; such a read waits on the network (one
``workers.status`` broadcast waits for the live workers' replies, up to a second) and grows
with the number of hosts (two passive queue declares each). Done per request, it would make
every scrape as slow as the read, cost one read per concurrent scrape, and, where the request
is served on an event loop (Flower's tornado loop), stall every other request meanwhile.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Refreshed(Generic[T]):
    """``read()``'s latest outcome, shared by every caller, at most ``ttl`` seconds plus one
    read old.

    One thread reads, then again ``ttl`` seconds after each read ends, for as long as someone
    asked within the last ``idle_after`` seconds; then it stops and forgets the outcome, so
    the first ask after a pause waits for a new read instead of being answered with an old
    one. No caller reads itself: concurrent asks cost one read, and only an ask that finds
    no outcome (the first, or the first after a pause) waits, for one read. A read that
    raised is that outcome: its exception is raised to the callers until a read succeeds
    (no stale value passed off as current).
    """

    def __init__(self, read: Callable[[], T], ttl: float, idle_after: float,
                 name: str = "orchestrator-refresh") -> None:
        self._read, self.ttl, self.idle_after, self.name = read, ttl, idle_after, name
        self._cond = threading.Condition()
        self._outcome: tuple[T | None, BaseException | None] | None = None
        self._asked = 0.0
        self._thread: threading.Thread | None = None
        self._closed = False

    def get(self) -> T:
        """The latest outcome; waits for a read only when there is none. Once closed, each
        ask reads for itself (a request still under way when its server stops)."""
        with self._cond:
            if not self._closed:
                self._asked = time.monotonic()
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, name=self.name,
                                                    daemon=True)
                    self._thread.start()
                self._cond.wait_for(lambda: self._outcome is not None or self._closed)
            outcome = self._outcome
        if outcome is None:
            return self._read()
        value, error = outcome
        if error is not None:
            # A copy for each caller: one exception raised in several threads at once would
            # have its traceback written by all of them.
            raise _copy(error) from error
        return value  # type: ignore[return-value]

    @property
    def reading(self) -> bool:
        """Its thread is reading (someone asked within ``idle_after`` seconds)."""
        with self._cond:
            return self._thread is not None

    def close(self) -> None:
        """Stop reading (a read under way finishes; its outcome is dropped)."""
        with self._cond:
            self._closed = True
            thread, self._thread, self._outcome = self._thread, None, None
            self._cond.notify_all()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5)

    def _run(self) -> None:
        try:
            self._reads()
        finally:  # whatever ended the thread, no caller waits for it any more
            with self._cond:
                if self._thread is threading.current_thread():
                    self._thread = None
                    if self._outcome is None:
                        self._outcome = (None, RuntimeError(f"{self.name}: its reader ended"))
                self._cond.notify_all()

    def _reads(self) -> None:
        while True:
            try:
                outcome: tuple[T | None, BaseException | None] = (self._read(), None)
            except Exception as exc:  # the callers get it, as they would from their own read
                outcome = (None, exc)
            with self._cond:
                if self._closed:
                    return
                self._outcome = outcome
                self._cond.notify_all()
                self._cond.wait_for(lambda: self._closed, timeout=self.ttl)
                if self._closed or time.monotonic() - self._asked > self.idle_after:
                    if self._thread is threading.current_thread():
                        self._thread, self._outcome = None, None
                    return


def _copy(error: BaseException) -> BaseException:
    """An exception like ``error`` (same class and message when it can be built so)."""
    try:
        return type(error)(*error.args)
    except Exception:
        return RuntimeError(str(error))

