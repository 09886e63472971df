"""The exit deadline: a draining worker is gone by ``graceful_timeout`` plus a short grace.

The drain ends through Celery's own shutdown: a warm one when nothing is left in flight, a
cold one at the deadline. Neither has a time limit of its own. A warm shutdown waits for every
job the prefork pool still holds, and a cold one for the pool to terminate; either can wedge
(a job whose pool process died at the wrong moment, a broker that stops answering, a
database lock), and then a host that was told to stop never exits and its supervisor has to
SIGKILL it blind. Nova's ``graceful_shutdown_timeout`` is a bound on the whole stop; so is
this one.

:class:`ExitDeadline` is a daemon thread, outside the event loop, that does nothing unless
the process is still alive ``grace`` seconds after the drain's deadline. Then it writes every
thread's stack to the log (where the exit wedged; the pool processes write theirs too), kills
the pool processes (their steps are unacknowledged: the broker delivers them again, as after a
SIGKILL of the host) and ends the process with :data:`EX_DRAIN_EXPIRED`.
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import select
import signal
import sys
import threading
import time

from celery.utils.log import get_logger

from orchestrator.seams import billiard_internals

logger = get_logger(__name__)

#: Exit status when the deadline ended the drain: work is left in the broker (EX_TEMPFAIL).
EX_DRAIN_EXPIRED = 75
#: How long past the deadline the exit may take before it is forced: a cold shutdown of the
#: prefork pool takes one to two seconds.
EXIT_GRACE_SECONDS = 5.0
#: Pool processes write their stacks to the log on this signal (:func:`dump_stacks_on_signal`).
STACKS_SIGNAL = signal.SIGUSR2
#: How long the pool processes get to write their stacks before they are killed.
STACKS_WAIT_SECONDS = 0.5


def dump_stacks_on_signal() -> None:
    """In a pool process: write every thread's stack to stderr (the worker's log) on
    :data:`STACKS_SIGNAL`, from C, so even a process stuck in a lock or a system call answers.
    A pool process that keeps the worker from exiting says where it is stuck."""
    faulthandler.register(STACKS_SIGNAL, file=sys.__stderr__, all_threads=True)


class ExitDeadline:
    """Forces the exit of a worker whose shutdown outlives its drain deadline.

    The thread runs from worker start and sleeps on a pipe until a deadline is set, then until
    it passes: an idle worker's thread never wakes. The SIGTERM handler sets the deadline with
    a plain assignment and a byte written to the pipe (both safe in a signal handler: no lock,
    no thread start), and it works even when the event loop that runs the drain is the thing
    wedged.
    """

    def __init__(self, grace: float = EXIT_GRACE_SECONDS) -> None:
        self.grace = grace
        #: Wall-clock time the drain must be over by; None while the host is not draining.
        self.deadline: float | None = None
        self.pid = os.getpid()
        self._thread: threading.Thread | None = None
        self._wake: tuple[int, int] | None = None

    def start(self) -> None:
        """Start watching (the worker's MainProcess, once)."""
        if self._thread is not None:
            return
        self.pid = os.getpid()
        self._wake = os.pipe()
        for fd in self._wake:
            os.set_blocking(fd, False)
        self._thread = threading.Thread(target=self._watch, name="drain-exit-deadline",
                                        daemon=True)
        self._thread.start()

    def set(self, deadline: float) -> None:
        """The drain began: the process must be gone by ``deadline + grace``. Signal-safe;
        the earliest deadline wins."""
        if self.deadline is None or deadline < self.deadline:
            self.deadline = deadline
            if self._wake is not None:
                with contextlib.suppress(OSError):  # full: the thread is waking anyway
                    os.write(self._wake[1], b"d")

    def _watch(self) -> None:
        assert self._wake is not None
        while True:
            deadline = self.deadline
            timeout = None if deadline is None else deadline + self.grace - time.time()
            if timeout is not None and timeout <= 0:
                break
            if select.select([self._wake[0]], [], [], timeout)[0]:
                with contextlib.suppress(BlockingIOError):
                    os.read(self._wake[0], 64)
        if os.getpid() == self.pid:
            self.force_exit()

    def force_exit(self) -> None:
        """Log where the exit wedged, kill the pool, and end the process now."""
        logger.critical(
            "drain: still running %.0fs after the deadline; forcing the exit (status %d), "
            "running steps go back to the broker unacknowledged. Where it wedged:",
            self.grace, EX_DRAIN_EXPIRED,
        )
        try:
            for handler in _log_handlers():
                handler.flush()
            faulthandler.dump_traceback(file=sys.__stderr__, all_threads=True)
            sys.__stderr__.flush()
        except Exception:  # stderr may be closed; the exit matters more than the stacks
            pass
        children = billiard_internals.pool_pids()
        for pid in children:
            with contextlib.suppress(OSError):
                os.kill(pid, STACKS_SIGNAL)
        if children:
            time.sleep(STACKS_WAIT_SECONDS)
        for pid in children:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        os._exit(EX_DRAIN_EXPIRED)


def _log_handlers() -> list:
    import logging

    return list(logging.getLogger().handlers) + list(logger.handlers)
