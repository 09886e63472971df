"""billiard (and Celery's prefork pool) internals this package relies on (verified against
billiard 4.3, celery 5.7).

Celery stops a prefork pool by closing it and joining it: each child exits on its own and
billiard's child sleeps one second after reporting its exit (``Worker._do_exit``); the pool's
supervisor thread, joined next, sleeps 0.8 s between rounds; the result handler is joined
after that. An idle worker spends about two seconds there, which is most of its SIGTERM to
exit time. When nothing is reserved there is nothing for any of them to finish, so
:func:`stop_idle_pool` ends the children itself and leaves the pool's threads (daemons) to
die with the process. It reads ``billiard.pool.Pool``'s ``_pool``, ``_state``,
``_worker_handler``, ``_terminate`` and each child's ``_popen``; anything else, or a pool with
work, is left to Celery.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)

#: How long a killed child may take to be reaped.
CHILD_EXIT_SECONDS = 2.0


def _terminate_state() -> int:
    from billiard.pool import TERMINATE

    return TERMINATE


def stop_idle_pool(pool: Any) -> bool:
    """End an idle Celery prefork pool's processes now; False (nothing done) if this is not a
    billiard pool we know, so the caller stops it the usual way."""
    inner = getattr(pool, "_pool", None)
    supervisor = getattr(inner, "_worker_handler", None)
    finalizer = getattr(inner, "_terminate", None)
    if inner is None or supervisor is None or not hasattr(inner, "_pool"):
        return False
    terminate = _terminate_state()
    # The supervisor would replace the children we end: stop it first (it checks these
    # states on every round; it is not joined).
    inner._state = terminate
    supervisor._state = terminate
    ended: set[int] = set()
    # A child the supervisor was starting as we stopped it shows up in a second pass.
    for _ in range(2):
        children = [p for p in list(inner._pool) if id(p) not in ended]
        # SIGKILL: an idle child holds nothing (no request, no transaction), and on SIGTERM
        # billiard's child would take its one-second exit sleep.
        for child in children:
            if child._popen is not None and child.exitcode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child.pid, signal.SIGKILL)
        for child in children:
            if child._popen is not None:
                child.join(CHILD_EXIT_SECONDS)
                if child.exitcode is None:
                    logger.warning("pool process %s still there after SIGKILL", child.pid)
            ended.add(id(child))
    # Its finalizer would join the threads at interpreter exit: the two seconds again.
    if finalizer is not None and hasattr(finalizer, "cancel"):
        finalizer.cancel()
    pool._pool = None
    pool._state = pool.TERMINATE
    return True


def stop_at_once_when(pool: Any, idle_and_done: Callable[[], bool]) -> None:
    """Replace the pool's ``stop`` (on the instance): when ``idle_and_done()`` is true at
    stop, the pool is ended at once (:func:`stop_idle_pool`); otherwise it is closed and
    joined as Celery does."""
    close_and_join = pool.stop

    def stop() -> None:
        if not (idle_and_done() and stop_idle_pool(pool)):
            close_and_join()

    pool.stop = stop


def pool_pids() -> list[int]:
    """The pool processes this process forked (billiard tracks its children per process)."""
    try:
        from billiard.process import active_children

        return [p.pid for p in active_children() if p.pid]
    except Exception:  # the pool may be half torn down: nothing to kill then
        return []
