"""One OpenTelemetry trace per operation (orchestrator.tracing).

Off (no ``OTEL_TRACES_EXPORTER``), nothing is set up and a step's message
carries no header. On, in-process with an in-memory exporter: the submit, each delivery, the
next step published inside it, and what the history records off the normal path are one
trace. With real workers on two hosts (``OTEL_TRACES_EXPORTER=console``): an operation whose
step a drain hands back and a restart runs is one trace across the command line that
submitted it and both hosts' processes, read from their JSON lines.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from orchestrator import Orchestrator
from orchestrator.config import Settings
from orchestrator.dispatch import StepMessage
from orchestrator.errors import ConfigError, StepFailure
from orchestrator.ledger.states import Happening
from orchestrator.local.fleet import Fleet, wait_for
from orchestrator.runner import run_step
from tests.helpers import (
    Gate,
    assert_conserved,
    at_step,
    boot_active,
    ended,
    wait_draining,
    wait_op,
)
from tests.test_ledger import three_step_orchestrator

REPO = Path(__file__).resolve().parent.parent
HOSTS = ["compute1", "compute2"]
#: The environment of every traced process of the end-to-end test.
CONSOLE = {"OTEL_TRACES_EXPORTER": "console", "OTEL_SERVICE_NAME": "orchestrator-test"}
STEP_ATTRIBUTES = ("orchestrator.operation.id", "orchestrator.flow", "orchestrator.step",
                   "orchestrator.position", "orchestrator.host", "messaging.destination.name",
                   "orchestrator.attempt", "orchestrator.worker", "orchestrator.outcome")


def _untraced_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}


# -- off ---------------------------------------------------------------------------------------
PROBE = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    if sys.argv[2] == "missing":  # as if opentelemetry were not installed
        sys.modules["opentelemetry"] = None
    from tests.test_ledger import three_step_orchestrator
    orch = three_step_orchestrator(Path(sys.argv[1]))
    sent = []
    orch.app.send_task = lambda name, **options: sent.append(options)
    op_id = orch.submit("three", hosts={"a": "ha", "b": "hb"})
    orch.ledger.note("resent", op_id, 0, "prep", "hb")
    trace = sys.modules.get("opentelemetry.trace")
    print(json.dumps({
        "enabled": orch.tracing.enabled, "headers": sent[0].get("headers"),
        "trace": orch.ledger.trace_of(op_id),
        "imported": sorted(m for m in sys.modules if m.startswith(OURS)
                           and sys.modules[m] is not None),
        "provider": None if trace is None else type(trace.get_tracer_provider()).__name__,
    }))
""")
#: What only the engine's tracing would import (redis-py imports opentelemetry's metrics
#: itself when it is installed).
OURS = ("opentelemetry.propagate", "opentelemetry.sdk.trace", "opentelemetry.exporter")


@pytest.mark.parametrize("case, env", [
    ("unset", {}),
    ("none", {"OTEL_TRACES_EXPORTER": "none"}),
    ("missing", {"OTEL_TRACES_EXPORTER": "console"}),
])
def test_off_nothing_is_set_up_and_a_step_carries_no_trace(tmp_path: Path, case: str,
                                                             env: dict[str, str]) -> None:
    """Not configured (or configured where opentelemetry is not installed: said once), a
    submit sets nothing up, imports none of the SDK's tracing, records no trace and
    sends no header."""
    proc = subprocess.run([sys.executable, "-c", f"OURS = {OURS!r}\n{PROBE}", str(tmp_path),
                           case], cwd=REPO,
                          env={**_untraced_env(), **env}, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    said = json.loads(proc.stdout.splitlines()[-1])
    assert said.pop("provider") in (None, "ProxyTracerProvider"), "none set up"
    assert said == {"enabled": False, "headers": None, "trace": None, "imported": []}, said
    if case == "missing":
        assert proc.stderr.count("OTEL_TRACES_EXPORTER=console, but") == 1, proc.stderr


def test_an_unknown_exporter_is_refused_with_its_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console,jaegr")
    with pytest.raises(ConfigError, match="'jaegr' is not one of console, otlp, none"):
        Settings.from_env()
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", " Console , otlp")
    assert Settings.from_env().traces_exporters == ("console", "otlp")


# -- on, in one process ------------------------------------------------------------------------
@pytest.fixture
def traced(tmp_path: Path) -> Any:
    """An orchestrator whose spans go to memory (``provider``, a TracerProvider of the
    application's own, handed over: ``exporter``), and the options of every step it sends
    (``sent``)."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    orch = three_step_orchestrator(tmp_path)
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    orch.tracing.use(provider)
    sent: list[dict] = []
    orch.app.send_task = lambda name, **options: sent.append({"name": name, **options})
    return types.SimpleNamespace(orch=orch, exporter=exporter, sent=sent, provider=provider)


def _deliver(orch: Orchestrator, sent: dict, position: int, step: str, host: str,
             worker: str = "w@x") -> str:
    """Run the step ``sent`` names as a worker would, its message's headers and all."""
    request = types.SimpleNamespace(headers=dict(sent.get("headers") or {}), retries=0,
                                    delivery_info={"routing_key": sent["queue"]},
                                    hostname=worker)
    return run_step(orch, orch.steps[step], types.SimpleNamespace(request=request),
                    sent["kwargs"]["operation_id"], position, host)


def _hex(number: int, width: int) -> str:
    return format(number, f"0{width}x")


def test_an_operation_is_one_trace_in_one_process(traced: Any) -> None:
    orch, exporter, sent = traced.orch, traced.exporter, traced.sent
    op_id = orch.submit("three", hosts={"a": "ha", "b": "hb"})
    (submit,) = exporter.get_finished_spans()
    trace_id = _hex(submit.context.trace_id, 32)
    assert submit.name == "orchestrator.submit three"
    assert submit.attributes["orchestrator.operation.id"] == op_id
    parent = f"00-{trace_id}-{_hex(submit.context.span_id, 16)}"
    assert sent[0]["headers"]["traceparent"].startswith(parent), "the first step's message"
    assert orch.ledger.trace_of(op_id).startswith(parent), "stored with the operation"

    assert _deliver(orch, sent[0], 0, "prep", "hb") == "completed"
    prep = exporter.get_finished_spans()[-1]
    assert prep.name == "orchestrator.step prep" and prep.parent.span_id == submit.context.span_id
    assert sent[1]["headers"]["traceparent"].split("-")[2] == _hex(prep.context.span_id, 16), \
        "the next step is published inside the step's span"
    assert {k: prep.attributes[k] for k in STEP_ATTRIBUTES} == {
        "orchestrator.operation.id": op_id, "orchestrator.flow": "three",
        "orchestrator.step": "prep", "orchestrator.position": 0, "orchestrator.host": "hb",
        "messaging.destination.name": "hb", "orchestrator.attempt": 1,
        "orchestrator.worker": "w@x", "orchestrator.outcome": "completed"}

    # Off the normal path, with no span of the operation current: a resend by the looks
    # carries the stored trace, and its history entry is a short span in it.
    orch.dispatch.again(StepMessage(op_id, 1, "move", "ha", "three"))
    assert sent[2]["headers"]["traceparent"].startswith(parent)
    orch.ledger.note(Happening.RESENT, op_id, 1, "move", "ha", worker="looks@x")
    resent = exporter.get_finished_spans()[-1]
    assert resent.name == "orchestrator.resent move"
    assert (resent.context.trace_id, resent.parent.span_id) == (submit.context.trace_id,
                                                                submit.context.span_id)
    assert [e.name for e in resent.events] == ["resent"]

    # A drain: a span of the worker's own, the hand-back an event of it, and the
    # operation's span of the hand-back linked to it.
    drain = orch.tracing.drain("ha", "ha@x", "SIGTERM")
    with drain.current():
        orch.ledger.note(Happening.HANDED_BACK, op_id, 1, "move", "ha", worker="ha@x",
                         queue="ha", detail="draining (SIGTERM)")
    drain.end(**{"orchestrator.drain.outcome": "done"})
    handed, drained = exporter.get_finished_spans()[-2:]
    assert handed.name == "orchestrator.handed-back move"
    assert handed.context.trace_id == submit.context.trace_id
    assert drained.name == "orchestrator.drain ha"
    assert drained.context.trace_id != submit.context.trace_id, "a trace of the worker's"
    assert [link.context.span_id for link in handed.links] == [drained.context.span_id]
    assert [(e.name, e.attributes["orchestrator.operation.id"]) for e in drained.events] == [
        ("handed-back", op_id)]

    # A step that fails: its span says so, and the failure is an event of it.
    orch.steps["move"] = dataclasses.replace(orch.steps["move"], fn=_fails)
    assert _deliver(orch, sent[2], 1, "move", "ha") == "failed"
    move = exporter.get_finished_spans()[-1]
    assert move.attributes["orchestrator.outcome"] == "failed"
    assert move.status.status_code.name == "ERROR"
    assert [e.name for e in move.events] == ["failed"]
    assert move.context.trace_id == submit.context.trace_id


def _fails(ctx: Any) -> None:
    raise StepFailure("disk full")


def test_a_submit_inside_a_span_of_the_caller_is_a_child_of_it(traced: Any) -> None:
    tracer = traced.provider.get_tracer("app")
    with tracer.start_as_current_span("request") as request:
        traced.orch.submit("three", hosts={"a": "ha", "b": "hb"})
    (submit,) = [s for s in traced.exporter.get_finished_spans()
                 if s.name == "orchestrator.submit three"]
    assert submit.parent.span_id == request.get_span_context().span_id


# -- on, real workers on two hosts -------------------------------------------------------------
def _spans(*texts: str) -> list[dict]:
    """The spans in the console exporter's lines of ``texts`` (one JSON object per line,
    between a worker's log lines)."""
    found = []
    for text in texts:
        for line in text.splitlines():
            if line.startswith("{") and '"context"' in line:
                found.append(json.loads(line))
    return found


def _op(span: dict) -> str | None:
    return span["attributes"].get("orchestrator.operation.id")


@pytest.mark.shutdown
def test_one_trace_across_hosts_a_drain_and_a_restart(fleet: Fleet, tmp_path: Path) -> None:
    """compute1 (one pool process, prefetch 4) runs a long resize_instance; a resize of vm2
    to compute1, submitted from the command line, has its prep_resize prefetched there and
    handed back by compute1's drain, then run after the restart; resize_instance runs on
    compute2 and finish_resize on compute1. Every span of it, from three processes and two
    runs of compute1, is in one trace; the drain is a span of compute1 of its own."""
    # vm1's resize_instance holds compute1's one pool process until compute1 drains, which
    # then hands the prefetched prep_resize back when its turn comes (held at its start: a
    # step that only lasted a few seconds could end first on a loaded machine, and the pool
    # would run prep_resize before the drain).
    gate = Gate(tmp_path / "gate")
    env = {**CONSOLE, **gate.env}
    first = fleet.start("compute1", concurrency=1, extra=("--prefetch-multiplier", "4"),
                        env=env)
    other = fleet.start("compute2", env=env)
    booted = [boot_active("vm1", "compute1"), boot_active("vm2", "compute2")]
    from nova_app import operations

    gate.hold_resize(booted[0], "resize_instance")
    busy = operations.resize("vm1", flavor="m1.large", dest="compute2")
    gate.wait_started()
    wait_op(busy.id, at_step("resize_instance"))

    cli = subprocess.run(
        [sys.executable, "-m", "orchestrator.ops.cli", "resize", "vm2", "--flavor", "m1.large",
         "--to", "compute1", "--json"],
        cwd=REPO, env={**os.environ, **CONSOLE}, capture_output=True, text=True, timeout=60)
    assert cli.returncode == 0, cli.stderr
    spans = _spans(cli.stdout)  # each a line of its own, beside the command's JSON
    said = json.loads("\n".join(line for line in cli.stdout.splitlines()
                                 if not (line.startswith("{") and '"context"' in line)))
    op_id = said["operation"]
    assert [s["name"] for s in spans] == ["orchestrator.submit resize"], cli.stdout
    from nova_app.app import app
    from orchestrator.broker import queue_depth

    wait_for(lambda: queue_depth(app, "compute1") == 0, 10, "prep_resize to be prefetched")
    first.signal(signal.SIGTERM)
    try:
        wait_draining("compute1")
    finally:
        gate.release()
    assert first.wait(timeout=30) == 0, first.log()
    assert "messages handed back: 1" in first.log()
    assert wait_op(op_id, lambda d: True)["status"] == "queued", "not run by the drain"

    again = fleet.start("compute1", env=env)
    assert wait_op(op_id, ended)["status"] == "completed"
    assert wait_op(busy.id, ended)["status"] == "completed"

    def all_spans() -> list[dict] | None:
        spans = _spans(cli.stdout, first.log(), other.log(), again.log())
        steps = {s["attributes"].get("orchestrator.step") for s in spans
                 if _op(s) == op_id and s["name"].startswith("orchestrator.step ")}
        return spans if steps >= {"prep_resize", "resize_instance", "finish_resize"} else None

    spans = wait_for(all_spans, 10, "every step's span in the workers' logs")
    mine = [s for s in spans if _op(s) == op_id]
    by_name = {}
    for span in mine:
        by_name.setdefault(span["name"], []).append(span)
    print(f"operation {op_id}: {len(mine)} spans: "
          + ", ".join(f"{name} x{len(found)}" for name, found in sorted(by_name.items())))

    (submit,) = by_name["orchestrator.submit resize"]
    trace_id = submit["context"]["trace_id"]
    assert {s["context"]["trace_id"] for s in mine} == {trace_id}, "one trace"
    assert submit["resource"]["attributes"]["service.name"] == "orchestrator-test"

    (prep,) = by_name["orchestrator.step prep_resize"]
    (move,) = by_name["orchestrator.step resize_instance"]
    (finish,) = by_name["orchestrator.step finish_resize"]
    assert prep["parent_id"] == submit["context"]["span_id"]
    assert move["parent_id"] == prep["context"]["span_id"], "published inside prep_resize"
    assert finish["parent_id"] == move["context"]["span_id"]
    for span, host, queue in ((prep, "compute1", "compute1"),
                              (move, "compute2", "compute2-alt"),
                              (finish, "compute1", "compute1-alt")):
        attributes = span["attributes"]
        assert set(STEP_ATTRIBUTES) <= set(attributes), attributes
        assert (attributes["orchestrator.flow"], attributes["orchestrator.host"],
                attributes["messaging.destination.name"], attributes["orchestrator.attempt"],
                attributes["orchestrator.outcome"]) == ("resize", host, queue, 1, "completed")
        assert attributes["orchestrator.worker"].startswith(f"{host}@")
        assert span["kind"] == "SpanKind.CONSUMER"
    assert prep in _spans(again.log()), "run after the restart"

    # The hand-back: a span of the operation's trace from compute1's first run, linked to
    # that run's drain, a span (and trace) of the worker's own with the hand-back an event.
    (handed,) = by_name["orchestrator.handed-back prep_resize"]
    assert handed in _spans(first.log())
    assert [e["name"] for e in handed["events"]] == ["handed-back"]
    (drain,) = [s for s in _spans(first.log()) if s["name"] == "orchestrator.drain compute1"]
    assert drain["context"]["trace_id"] != trace_id
    assert [link["context"]["span_id"] for link in handed["links"]] == [
        drain["context"]["span_id"]]
    assert drain["attributes"]["orchestrator.drain.outcome"] == "done"
    assert drain["attributes"]["orchestrator.drain.handed_back"] == 1
    events = [(e["name"], e["attributes"].get("orchestrator.operation.id"))
              for e in drain["events"]]
    assert ("handed-back", op_id) in events and ("drain.done", None) in events, events
    print(f"trace {trace_id[2:]}: {len(mine)} spans of the operation; drain trace "
          f"{drain['context']['trace_id'][2:]} with {len(drain['events'])} events")
    assert_conserved([*booted, busy.id, op_id], HOSTS)


# -- OTLP over HTTP ----------------------------------------------------------------------------
class Collector:
    """An OTLP/HTTP receiver on a free loopback port: what is posted to it, decoded."""

    def __init__(self) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        bodies = self.bodies = []

        class Receive(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                bodies.append((self.path, self.rfile.read(int(
                    self.headers.get("Content-Length") or 0))))
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                return None

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Receive)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def spans(self) -> list[tuple[str, dict[str, Any]]]:
        """(name, attributes) of every span received at /v1/traces."""
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest,
        )

        found = []
        for path, body in list(self.bodies):
            assert path == "/v1/traces", path
            request = ExportTraceServiceRequest.FromString(body)
            for resource in request.resource_spans:
                for scope in resource.scope_spans:
                    for span in scope.spans:
                        found.append((span.name, {
                            a.key: getattr(a.value, a.value.WhichOneof("value"))
                            for a in span.attributes}))
        return found

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def collector() -> Iterator[Collector]:
    receiver = Collector()
    try:
        yield receiver
    finally:
        receiver.close()


OTLP_PROBE = textwrap.dedent("""
    import sys
    from pathlib import Path
    from tests.test_ledger import three_step_orchestrator
    orch = three_step_orchestrator(Path(sys.argv[1]))
    orch.app.send_task = lambda name, **options: None
    print(orch.submit("three", hosts={"a": "ha", "b": "hb"}))
""")


def test_otlp_exports_over_http_as_the_process_exits(tmp_path: Path,
                                                     collector: Collector) -> None:
    """OTEL_TRACES_EXPORTER=otlp: batched, and flushed at the process's exit."""
    proc = subprocess.run(
        [sys.executable, "-c", OTLP_PROBE, str(tmp_path)], cwd=REPO, capture_output=True,
        text=True, timeout=60, env={**_untraced_env(), "OTEL_TRACES_EXPORTER": "otlp",
                                    "OTEL_EXPORTER_OTLP_ENDPOINT": collector.url,
                                    "OTEL_BSP_SCHEDULE_DELAY": "600000"})
    assert proc.returncode == 0, proc.stderr
    op_id = proc.stdout.split()[-1]
    assert [(name, attributes["orchestrator.operation.id"])
            for name, attributes in collector.spans()] == [("orchestrator.submit three", op_id)]


@pytest.mark.shutdown
def test_a_drained_workers_batched_spans_are_flushed_before_it_exits(
        fleet: Fleet, collector: Collector) -> None:
    """OTLP, batches never sent on a timer (a 10-minute delay): a drained worker's pool
    processes exit the usual way, each flushing what it batched, and the drain's span is
    flushed by the worker's own exit."""
    host = fleet.start("compute1", env={"OTEL_TRACES_EXPORTER": "otlp",
                                        "OTEL_EXPORTER_OTLP_ENDPOINT": collector.url,
                                        "OTEL_BSP_SCHEDULE_DELAY": "600000"})
    booted = boot_active("vm1", "compute1")
    assert collector.spans() == [], "nothing sent before the exit"
    signalled = time.monotonic()
    host.signal(signal.SIGTERM)
    assert host.wait(timeout=30) == 0, host.log()
    print(f"SIGTERM to exit with OTLP batches: {time.monotonic() - signalled:.2f}s")
    names = [name for name, _ in collector.spans()]
    assert {"orchestrator.step build_and_run_instance", "orchestrator.step "
            "external_instance_event", "orchestrator.drain compute1"} <= set(names), names
    assert_conserved([booted], ["compute1"])
