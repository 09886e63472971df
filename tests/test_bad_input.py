"""Bad input on a host queue: published with kombu at a real worker, on Redis and RabbitMQ.

Each bad message is refused with one logged reason, none is run or redelivered, and the worker
keeps working: an operation sent after them completes, and when the worker stops nothing comes
back to the queues (no message was held unacknowledged).
"""

from __future__ import annotations

import pickle
import signal

from nova_app import operations, views
from nova_app.app import app
from orchestrator.broker import queue_depth
from orchestrator.local.fleet import Fleet, wait_for
from orchestrator.stepcall import problems
from tests.helpers import ended, wait_op
from tests.raw import STEP, publish_raw

QUEUE = "compute1"


def test_bad_messages_are_rejected_and_the_host_keeps_working(fleet: Fleet) -> None:
    worker = fleet.start("compute1")
    first = operations.boot("vm0", "compute1")
    assert wait_op(first.id, ended)["status"] == "completed"
    good = {"operation_id": first.id, "position": 0, "host": "compute1"}
    all_headers = tuple(app.amqp.as_task_v2("x", STEP, kwargs={}).headers)

    def step(label: str, reason: str, **publish) -> tuple[str, str]:
        task_id = publish_raw(QUEUE, **publish)
        task = publish.get("task", STEP)
        return label, f"rejected step message {task}[{task_id}] from queue {QUEUE}: {reason}"

    def malformed(label: str, reason: str, **publish) -> tuple[str, str]:
        task_id = publish_raw(QUEUE, **publish)
        shown = task_id if "id" not in publish.get("drop_headers", ()) else "None"
        task = publish.get("headers", {}).get("task", STEP)
        return label, (f"rejected malformed task message {task}[{shown}] from queue {QUEUE}: "
                       f"{reason}")

    def celery(label: str, line: str, **publish) -> tuple[str, str]:
        publish_raw(QUEUE, **publish)
        return label, line

    expected = [
        # Refused by Celery itself (accept_content, decoding, task registry).
        celery("pickle", "Received invalid task message: Refusing to deserialize untrusted "
               "content of type pickle", body=pickle.dumps(((), good, {})),
               content_type="application/x-python-serialize", content_encoding="binary"),
        celery("not JSON", "Can't decode message body: DecodeError",
               body=b"\x00{not json", content_type="application/json"),
        celery("unknown task", "Received unregistered task of type 'compute.no_such_step'",
               task="compute.no_such_step", kwargs=good),
        celery("no task", "Received and deleted unknown message",
               drop_headers=all_headers, body=b'{"hello": "world"}'),
        # Would stop or stall Celery's consumer: refused in the worker's main process.
        malformed("body shape", "body is not [args, kwargs, options]: [1]", body=b"[1]"),
        malformed("body mapping", "body is not [args, kwargs, options]",
                  body=b'{"operation_id": "x"}'),
        malformed("no id", "no task id", kwargs=good, drop_headers=("id",)),
        malformed("task name type", "task name is not a string: ['x']", kwargs=good,
                  headers={"task": ["x"]}),
        malformed("timelimit", "timelimit is not [soft, hard]: 'abc'", kwargs=good,
                  headers={"timelimit": "abc"}),
        malformed("eta", "a step is never scheduled for later", kwargs=good,
                  headers={"eta": "2099-01-01T00:00:00+00:00"}),
        malformed("celery builtin", "'celery.chord_unlock' is not a step",
                  kwargs={}, headers={"task": "celery.chord_unlock"}),
        celery("id with a newline", f"[id\\nFAKE LOG LINE] from queue {QUEUE}: task name or id "
               "holds control characters", kwargs=good, headers={"id": "id\nFAKE LOG LINE"}),
        # Well-formed Celery messages, bad steps: refused before the step runs.
        step("missing host", "missing host",
             kwargs={"operation_id": first.id, "position": 0}),
        step("missing operation", "missing operation_id",
             kwargs={"position": 0, "host": "compute1"}),
        step("position as string", "position must be int, not str '0'",
             kwargs={**good, "position": "0"}),
        step("position as bool", "position must be int, not bool True",
             kwargs={**good, "position": True}),
        step("extra kwargs", "unexpected 'flavor', 'script'",
             kwargs={**good, "script": "rm -rf /", "flavor": "m1.huge"}),
        step("positional args", "positional arguments ('compute1',)", args=("compute1",),
             kwargs=good),
        step("operation id with a newline",
             "operation_id holds control characters: 'op\\nFAKE LOG LINE'",
             kwargs={**good, "operation_id": "op\nFAKE LOG LINE"}),
        step("another host's step", "host 'compute2' is not this queue's host",
             kwargs={**good, "host": "compute2"}),
        step("unknown operation", "unknown operation 'no-such-operation'",
             kwargs={**good, "operation_id": "no-such-operation"}),
        step("step not in the plan", f"operation {first.id} has no step "
             "build_and_run_instance@compute1 at position 3", kwargs={**good, "position": 3}),
        step("wrong step name", f"operation {first.id} has no step finish_resize@compute1 at "
             "position 0", task="compute.finish_resize", kwargs=good),
    ]

    def all_logged() -> bool:
        log = worker.log()
        return all(line in log for _, line in expected)

    try:
        wait_for(all_logged, 30, "every bad message to be refused")
    except TimeoutError:
        log = worker.log()
        missing = [label for label, line in expected if line not in log]
        raise AssertionError(f"not logged: {missing}\n{log[-4000:]}") from None

    # The worker kept working: a normal operation on the same host completes.
    assert worker.proc.poll() is None, worker.log()[-3000:]
    after = operations.boot("vm1", "compute1")
    assert wait_op(after.id, ended)["status"] == "completed"
    # Nothing ran twice or against the operation the bad messages named.
    first_steps = views.operation_dict(first.id)["steps"]
    assert [(s["status"], s["attempts"]) for s in first_steps] == [("completed", 1)]

    # Nothing was left unacknowledged: stopping the worker returns no message to the queues
    # (RabbitMQ requeues unacked messages when the channel closes, Redis restores them).
    worker.signal(signal.SIGTERM)
    assert worker.wait(timeout=30) == 0, worker.log()[-3000:]
    assert queue_depth(app, QUEUE) == 0 and queue_depth(app, QUEUE + "-alt") == 0
    log = worker.log()
    for crash in ("Unrecoverable error", "Connection to broker lost", "Restoring"):
        assert crash not in log, crash
    # One line per refused step: Celery's own repeat of each Reject (a WARNING with a
    # traceback) is filtered out.
    assert "reject requeue=False" not in log
    # A value from a message never starts a line of its own.
    assert [line for line in log.splitlines() if line.startswith("FAKE")] == []


def test_step_call_problems() -> None:
    ok = {"operation_id": "op", "position": 0, "host": "compute1"}
    assert problems((), ok, "compute1") == []
    assert problems((), ok, "compute1-alt") == []
    assert problems((), ok, None) == []
    assert problems((), {**ok, "position": -1}, "compute1") == ["position is negative (-1)"]
    assert problems((), {**ok, "host": " "}, "compute1") == ["host is empty"]
    assert problems((), {**ok, "operation_id": 7}, "compute1") == [
        "operation_id must be str, not int 7"
    ]
    long = problems((), {**ok, "host": "x" * 500}, "compute1")
    assert len(long) == 1 and "x..." in long[0] and len(long[0]) < 200, long
    assert problems((), {}, "compute1") == ["missing operation_id, position, host"]
