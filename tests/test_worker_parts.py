"""The worker side's parts that need no process: the drain's states and the seams' version
check. (The drain itself runs with real workers and signals in tests/test_drain.py.)"""

from __future__ import annotations

from importlib import metadata

import pytest

from orchestrator import seams
from workers.drain import MOVES, Drain, DrainState


def _drain_in(state: DrainState) -> Drain:
    drain = Drain.__new__(Drain)  # the state machine alone: no worker, no app
    drain.state = state
    return drain


def test_a_drain_moves_forward_only() -> None:
    assert MOVES[DrainState.UP] == {DrainState.QUIET}
    for end in (DrainState.DONE, DrainState.DEADLINE, DrainState.SECOND_SIGTERM):
        assert end.over and MOVES[end] == set()
        assert end in MOVES[DrainState.QUIET] and end in MOVES[DrainState.DRAINING]
    drain = _drain_in(DrainState.UP)
    with pytest.raises(RuntimeError, match="no move from up to draining"):
        drain._move(DrainState.DRAINING)  # quiet first: the main consumer is cancelled there
    for step in (DrainState.QUIET, DrainState.DRAINING, DrainState.DRAINING, DrainState.DONE):
        drain._move(step)
    assert drain.outcome() == "done"
    with pytest.raises(RuntimeError, match="no move from done to deadline"):
        drain._move(DrainState.DEADLINE)


def test_outcome_names_how_a_drain_ended() -> None:
    assert _drain_in(DrainState.DRAINING).outcome() == "done"  # stopped by Celery (SIGQUIT)
    assert _drain_in(DrainState.DEADLINE).outcome() == "deadline"
    assert _drain_in(DrainState.SECOND_SIGTERM).outcome() == "second-sigterm"


def test_the_verified_versions_are_the_installed_ones() -> None:
    assert seams.unverified() == []


def test_an_unverified_version_names_its_seam(monkeypatch: pytest.MonkeyPatch) -> None:
    real = metadata.version
    monkeypatch.setattr(metadata, "version",
                        lambda name: "5.8.1" if name == "celery" else real(name))
    assert seams.unverified() == [
        "celery 5.8.1 is installed; orchestrator/seams/celery_internals.py was verified "
        "against celery 5.7.x: read it again against celery 5.8.1"]
    monkeypatch.setattr(metadata, "version",
                        lambda name: "1.99.0" if name == "alembic" else real(name))
    assert seams.unverified() == []  # any alembic 1.x


def test_periodic_jobs_of_a_period_come_due_together() -> None:
    """An idle worker's drain tick, routing check, stranded-step and event-wait checks share
    the 2 s grid of the monotonic clock: one wake-up of the event loop for all of them."""
    import time

    from workers.hoststep import IDLE_PERIOD_SECONDS, on_grid

    now = time.monotonic()
    first, second = on_grid(IDLE_PERIOD_SECONDS), on_grid(IDLE_PERIOD_SECONDS)
    # The same float (kombu's timer fires both in one pass), or the next point of the grid
    # if the clock crossed one between the two calls.
    assert second - first in (0.0, IDLE_PERIOD_SECONDS)
    assert now < first <= time.monotonic() + IDLE_PERIOD_SECONDS
    assert (first / IDLE_PERIOD_SECONDS).is_integer()


def test_a_notice_wakes_its_operations_waiters_only() -> None:
    """orchestrator.notices: waiters share one subscription; the notice of one operation's end
    wakes that operation's waiters (however many), not the others, and a waiter that comes
    after the notice does not wait at all."""
    import threading

    from orchestrator.notices import EndedNotices

    notices = EndedNotices(app=None)
    woken: dict[str, list[bool]] = {"a": [], "b": []}
    waiting = threading.Barrier(4)

    def wait(operation_id: str, timeout: float) -> None:
        waiting.wait(timeout=10)
        woken[operation_id].append(notices.wait_for(operation_id, timeout))

    threads = [threading.Thread(target=wait, args=(op, t))
               for op, t in (("a", 30.0), ("a", 30.0), ("b", 0.5))]
    for thread in threads:
        thread.start()
    waiting.wait(timeout=10)
    deadline = 10.0
    while notices.waiting.get("a", [None, 0])[1] < 2 and deadline > 0:  # both a's waiting
        threading.Event().wait(0.01)
        deadline -= 0.01
    notices._heard({"operation": "a", "status": "ended"}, None)
    for thread in threads:
        thread.join(timeout=30)
    assert woken == {"a": [True, True], "b": [False]}
    assert notices.wait_for("a", 0) is True  # heard before: no wait
    assert notices.waiting == {}
