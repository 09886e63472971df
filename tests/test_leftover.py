"""The drain's policy, case by case: which operations a draining host waits for
(``workers.leftover.what_is_left``), from ledger rows, registry views and what this worker
holds, with no process, broker or database."""

from __future__ import annotations

import pytest

from orchestrator.ledger.models import Operation
from orchestrator.looks import UNPUBLISHED_GRACE
from orchestrator.registry import ServiceView
from workers.leftover import what_is_left

NOW = 1_000_000.0
HERE = "node2"
PLAN = [["reserve", "node2"], ["copy_out", "node1"], ["copy_in", "node2"],
        ["retire_source", "node1"]]


def op(position: int = 1, state: str = "running", queue: str | None = "node1-alt",
       published: bool = True, since: float = NOW - 1, plan: list | None = None,
       op_id: str = "op1") -> Operation:
    return Operation(id=op_id, kind="move", plan=plan or PLAN, position=position,
                     step_state=state, queue=queue, next_published=published,
                     step_since=since, status="running")


def view(host: str, state: str = "up", *, main: bool = True, alt: bool = True,
         started: float = NOW - 100, steps: frozenset[str] | None = None) -> ServiceView:
    return ServiceView(nodename=f"{host}@vm", host=host, version=2, consumes_main=main,
                       consumes_alt=alt, state=state, heartbeat_age=0.5, started_at=started,
                       recorded_state=state, steps=steps)


def left(ops: list[Operation], views: list[ServiceView], ran_here: frozenset[str] = frozenset(),
         serves=lambda step: True) -> tuple[list[str], list[str]]:
    got = what_is_left(ops, views, host=HERE, ran_here=ran_here, serves=serves, now=NOW)
    return got.operations, got.blocked


DRAINING_HERE = view(HERE, "draining", main=True, alt=True)


def waited(*args, **kwargs) -> bool:
    operations, blocked = left(*args, **kwargs)
    assert len(operations) + len(blocked) == 1
    return bool(operations)


def test_a_step_running_on_a_live_host_is_waited_for() -> None:
    assert waited([op()], [view("node1"), DRAINING_HERE])


def test_a_step_running_on_a_dead_host_is_not() -> None:
    assert not waited([op()], [view("node1", "down"), DRAINING_HERE])


def test_a_step_running_since_before_its_hosts_worker_started_is_not() -> None:
    """Its worker was killed and replaced: the step waits for its message to come back."""
    assert not waited([op(since=NOW - 200)], [view("node1", started=NOW - 100),
                                              DRAINING_HERE])


def test_a_step_waiting_for_an_event_on_a_live_host_is_waited_for() -> None:
    assert waited([op(state="waiting")], [view("node1"), DRAINING_HERE])


@pytest.mark.parametrize(("queue", "views", "expected"), [
    ("node2-alt", [DRAINING_HERE], True),            # our alt queue: we still consume it
    ("node2", [DRAINING_HERE], False),               # our main queue: not while we drain
    ("node2", [DRAINING_HERE, view(HERE, "up", alt=False)], True),  # a main-only sibling
    ("node1-alt", [view("node1", alt=False), DRAINING_HERE], False),  # legacy node1: no alt
])
def test_a_queued_step_counts_only_if_its_queue_is_consumed(queue, views, expected) -> None:
    host = queue.removesuffix("-alt")
    position = 2 if host == HERE else 1
    assert waited([op(position=position, state="queued", queue=queue)], views) is expected


def test_a_step_not_yet_sent_waits_while_its_host_lives_or_for_the_grace() -> None:
    unsent = op(position=2, state="queued", published=False, queue="node1-alt")
    assert waited([unsent], [DRAINING_HERE])  # this worker lives: its resend sends it
    lost = op(state="queued", published=False, since=NOW - UNPUBLISHED_GRACE - 1)
    assert not waited([lost], [view("node1", "down"), DRAINING_HERE])
    fresh = op(state="queued", published=False, since=NOW - 1)
    assert waited([fresh], [view("node1", "down"), DRAINING_HERE])


def test_a_step_this_worker_ran_and_lost_counts_by_its_queue() -> None:
    mine = op(position=2, state="running", queue="node2-alt")
    assert waited([mine], [DRAINING_HERE], ran_here=frozenset({"op1"}))
    main = op(position=2, state="running", queue="node2")
    assert not waited([main], [DRAINING_HERE], ran_here=frozenset({"op1"}))


def test_a_held_step_waits_only_for_a_live_worker_that_serves_it() -> None:
    held = op(position=1, state="held", queue=None, published=False)
    old = frozenset({"reserve", "copy_out", "copy_in", "retire_source"})
    assert not waited([held], [view("node1", steps=frozenset({"reserve"})), DRAINING_HERE])
    assert waited([held], [view("node1", steps=old), DRAINING_HERE])
    assert not waited([held], [view("node1", "down", steps=old), DRAINING_HERE])


def test_what_this_code_cannot_run_here_is_not_waited_for() -> None:
    operations, blocked = left([op()], [view("node1"), DRAINING_HERE],
                               serves=lambda step: step not in ("copy_in", "reserve"))
    assert operations == []
    assert blocked == ["move op1 at copy_out@node1 (running): this code does not register "
                       "copy_in"]


def test_an_operation_done_with_its_plan_is_skipped() -> None:
    assert left([op(position=4)], [DRAINING_HERE]) == ([], [])
