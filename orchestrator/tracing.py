"""One OpenTelemetry trace per operation, across hosts.

Celery's own instrumentation makes a task published by another task a trace of its own; an
operation here is a chain of such tasks, each publishing the next, so it would be as many
traces as steps. Here every step message carries its operation's trace context (W3C
``traceparent``, in the message's headers: :meth:`Tracing.headers`, from
:meth:`orchestrator.dispatch.Dispatcher.publish`, the one place a step is sent), and:

- a submit is a span ``orchestrator.submit <flow>`` (a child of the caller's current span, if
  any), its traceparent stored with the operation (column ``operations.trace``);
- each delivery of a step is a span ``orchestrator.step <step>`` (kind CONSUMER) whose parent
  is the context its message carries; the next step is published inside it;
- what the operation's history records off its normal path (``Ledger.note``: handed back,
  held, resent, retried, ...) is an event of the step's span when it happens inside one, and
  otherwise (a drain's hand-back, the looks' resend or settled wait) a short span of its own
  in the operation's trace, from the stored traceparent, linked to the span current there;
- a drain is a span of its worker (a trace of its own) from SIGTERM to the end, each
  hand-back an event of it.

It is on when ``OTEL_TRACES_EXPORTER`` names an exporter (``console``: one JSON object per
line on stdout; ``otlp``: OTLP over HTTP, configured by the standard ``OTEL_EXPORTER_OTLP_*``
variables) and opentelemetry is installed (``pip install 'orchestrator[otel]'``), or when the
application installed a TracerProvider of its own (then that one is used, and nothing is
configured). Otherwise every method returns at once, and opentelemetry is never imported:
nothing is decided or set up before the first span is asked for, in each process.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from celery.exceptions import Reject, Retry

from orchestrator.config import Settings
from orchestrator.errors import StepMismatch, UnknownOperation

logger = logging.getLogger("orchestrator.tracing")

__all__ = ["Tracing"]

#: The instrumentation scope of the engine's spans.
SCOPE = "orchestrator"
#: The attributes of the engine's spans and events.
OPERATION = "orchestrator.operation.id"
FLOW = "orchestrator.flow"
STEP = "orchestrator.step"
POSITION = "orchestrator.position"
HOST = "orchestrator.host"
QUEUE = "messaging.destination.name"
ATTEMPT = "orchestrator.attempt"
WORKER = "orchestrator.worker"
OUTCOME = "orchestrator.outcome"
DETAIL = "orchestrator.detail"
#: How long a worker's process waits for its spans to be exported as it exits.
FLUSH_MILLIS = 5000
#: Outcomes of a step's delivery that are its operation's failure.
FAILED_OUTCOMES = ("failed",)


class _Null:
    """What every method gives when tracing is off: a span that records nothing, and its
    own context manager."""

    traceparent = None

    def __enter__(self) -> _Null:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def started(self, flow: str, attempt: int) -> None:
        return None

    def outcome(self, outcome: str) -> str:
        return outcome

    def operation(self, operation_id: str, host: str, queue: str | None) -> None:
        return None

    def event(self, name: str, **attributes: Any) -> None:
        return None

    def current(self) -> _Null:
        return self

    def end(self, **attributes: Any) -> None:
        return None


NULL = _Null()


def _attributes(**given: Any) -> dict[str, Any]:
    """Span attributes: those with a value (OpenTelemetry takes no None)."""
    return {name: value for name, value in given.items() if value is not None}


class _Stdout:
    """Where the console exporter writes: file descriptor 1 itself, each span's line in one
    ``write`` (a pool process's ``sys.stdout`` is Celery's logger, and the processes of a
    worker share the file: a line written in pieces could be cut by another's)."""

    def write(self, text: str) -> None:
        data = text.encode()
        while data:
            data = data[os.write(1, data):]

    def flush(self) -> None:
        return None


def _one_line(span: Any) -> str:
    return span.to_json(indent=None) + "\n"


class _Otel:
    """Tracing on: the tracer, and the OpenTelemetry modules it needs (imported here only)."""

    def __init__(self, provider: Any) -> None:
        from opentelemetry import context, propagate, trace

        self.context, self.propagate, self.trace = context, propagate, trace
        self.provider = provider
        self.tracer = provider.get_tracer(SCOPE)
        #: The operation whose span is current (in the OpenTelemetry context, beside it).
        self.key = context.create_key("orchestrator.operation")

    def of(self, operation_id: str) -> bool:
        """Whether a span of this operation (its submit, a step's delivery) is current."""
        return self.context.get_value(self.key) == operation_id

    def stored(self, traceparent: str | None) -> Any:
        """The context an operation's stored traceparent names; an empty one (a new trace)
        without it."""
        if not traceparent:
            return self.context.Context()
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        return TraceContextTextMapPropagator().extract({"traceparent": traceparent})

    @staticmethod
    def traceparent(span: Any) -> str | None:
        """``span``'s W3C traceparent: what an operation stores of its trace."""
        ctx = span.get_span_context()
        if not ctx.is_valid:
            return None
        return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"

    def failed(self, span: Any, exc: BaseException | None, description: str) -> None:
        from opentelemetry.trace import Status, StatusCode

        if exc is not None:
            span.record_exception(exc)
        span.set_status(Status(StatusCode.ERROR, description))


class _Submit:
    """The span of one submit; the operation's id once recorded, and its traceparent."""

    def __init__(self, otel: _Otel, flow: str) -> None:
        self.otel = otel
        self.span = otel.tracer.start_span(
            f"orchestrator.submit {flow}", kind=otel.trace.SpanKind.PRODUCER,
            attributes={FLOW: flow})
        self.traceparent = otel.traceparent(self.span)
        self.tokens: list[Any] = []

    def __enter__(self) -> _Submit:
        self.tokens.append(self.otel.context.attach(
            self.otel.trace.set_span_in_context(self.span)))
        return self

    def operation(self, operation_id: str, host: str, queue: str | None) -> None:
        """Recorded as ``operation_id``, its first step for ``host`` routed to ``queue``: what
        is published from now on carries this span's context."""
        self.span.set_attributes(_attributes(**{OPERATION: operation_id, HOST: host,
                                                QUEUE: queue}))
        context = self.otel.context
        self.tokens.append(context.attach(context.set_value(self.otel.key, operation_id)))

    def __exit__(self, kind: Any, exc: BaseException | None, tb: Any) -> None:
        if exc is not None:
            self.otel.failed(self.span, exc, f"{type(exc).__name__}: {exc}")
        for token in reversed(self.tokens):
            self.otel.context.detach(token)
        self.span.end()


class _Step:
    """The span of one delivery of a step, its parent the context its message carries."""

    def __init__(self, otel: _Otel, request: Any, operation_id: str, position: int,
                 step: str, host: str) -> None:
        self.otel, self.operation_id = otel, operation_id
        parent = otel.propagate.extract(_carrier(request))
        self.span = otel.tracer.start_span(
            f"orchestrator.step {step}", context=parent, kind=otel.trace.SpanKind.CONSUMER,
            attributes=_attributes(**{
                OPERATION: operation_id, STEP: step, POSITION: position, HOST: host,
                QUEUE: (getattr(request, "delivery_info", None) or {}).get("routing_key"),
                WORKER: getattr(request, "hostname", None)}))
        self.token: Any = None

    def __enter__(self) -> _Step:
        context, trace = self.otel.context, self.otel.trace
        self.token = context.attach(context.set_value(
            self.otel.key, self.operation_id, trace.set_span_in_context(self.span)))
        return self

    def started(self, flow: str, attempt: int) -> None:
        """What the ledger said of this delivery: its operation's flow, which attempt."""
        self.span.set_attributes(_attributes(**{FLOW: flow or None, ATTEMPT: attempt or None}))

    def outcome(self, outcome: str) -> str:
        self.span.set_attribute(OUTCOME, outcome)
        if outcome in FAILED_OUTCOMES:
            self.otel.failed(self.span, None, f"the step failed: its operation {outcome}")
        return outcome

    def __exit__(self, kind: Any, exc: BaseException | None, tb: Any) -> None:
        if exc is not None:
            if isinstance(exc, Retry):
                outcome, cause = "retry", exc.exc or exc
            elif isinstance(exc, Reject | UnknownOperation | StepMismatch):
                outcome, cause = "rejected", exc
            else:
                outcome, cause = "error", exc
            self.span.set_attribute(OUTCOME, outcome)
            self.otel.failed(self.span, cause if isinstance(cause, BaseException) else None,
                             f"{type(cause).__name__}: {cause}")
        self.otel.context.detach(self.token)
        self.span.end()


class _Drain:
    """The span of a worker's drain: a trace of its own, from SIGTERM to the end."""

    def __init__(self, otel: _Otel, host: str, worker: str, reason: str,
                 deadline: float | None) -> None:
        self.otel = otel
        self.span = otel.tracer.start_span(
            f"orchestrator.drain {host}", context=otel.context.Context(),
            attributes=_attributes(**{HOST: host, WORKER: worker,
                                      "orchestrator.drain.reason": reason,
                                      "orchestrator.drain.deadline": deadline}))

    def event(self, name: str, **attributes: Any) -> None:
        self.span.add_event(name, _attributes(**attributes))

    @contextmanager
    def current(self) -> Iterator[None]:
        """This span current meanwhile: what the history records then (a hand-back) is an
        event of it too, and the operation's own span of it links to it."""
        token = self.otel.context.attach(self.otel.trace.set_span_in_context(self.span))
        try:
            yield
        finally:
            self.otel.context.detach(token)

    def end(self, **attributes: Any) -> None:
        self.span.set_attributes(_attributes(**attributes))
        self.span.end()


def _carrier(request: Any) -> dict[str, Any]:
    """The headers of a step's delivery (Celery's task request): its custom headers, where
    the trace context travels."""
    headers = getattr(request, "headers", None)
    if isinstance(headers, dict) and "traceparent" in headers:
        return headers
    found = {name: getattr(request, name, None) for name in ("traceparent", "tracestate")}
    return {name: value for name, value in found.items() if isinstance(value, str)}


class Tracing:
    """The engine's spans, hung on the Orchestrator (``orch.tracing``), from ``settings``'s
    ``OTEL_*`` variables. Off (no exporter named, no TracerProvider of the application's),
    each method returns at once: a span that records nothing, or None."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._otel: _Otel | None = None
        #: The TracerProvider set up here (from OTEL_TRACES_EXPORTER), not an application's.
        self._own: Any = None
        #: OTEL_TRACES_EXPORTER named an exporter this process could not set up (said once).
        self._broken = False
        self._lock = threading.Lock()

    # -- on or off ---------------------------------------------------------------------------
    def _on(self) -> _Otel | None:
        """Tracing in this process, or None: decided at the first span asked for (an
        application may install its TracerProvider after constructing the Orchestrator)."""
        if self._otel is not None:
            return self._otel
        if self.settings.tracing_disabled or self._broken:
            return None
        if self.settings.traces_exporters:
            return self._set_up()
        trace = sys.modules.get("opentelemetry.trace")
        if trace is None:  # nobody imported it: nobody installed a TracerProvider
            return None
        provider = trace.get_tracer_provider()
        if isinstance(provider, trace.ProxyTracerProvider | trace.NoOpTracerProvider):
            return None
        return self.use(provider)

    @property
    def enabled(self) -> bool:
        return self._on() is not None

    @property
    def batched(self) -> bool:
        """Whether this process's spans are exported in batches (``otlp``), from a thread
        that only a flush as the process exits can empty: a drained worker then lets its pool
        processes exit the usual way (Celery's ``worker_process_shutdown``), not at once."""
        return "otlp" in self.settings.traces_exporters and not self.settings.tracing_disabled

    def use(self, provider: Any) -> _Otel:
        """Make the engine's spans with ``provider`` (an application's, or a test's)."""
        with self._lock:
            if self._otel is None or self._otel.provider is not provider:
                self._otel = _Otel(provider)
            return self._otel

    def _set_up(self) -> _Otel | None:
        """The SDK's TracerProvider with the exporters OTEL_TRACES_EXPORTER names, made the
        process's own; an application's own, if it installed one first, is used instead."""
        with self._lock:
            if self._otel is not None or self._broken:
                return self._otel
            named = ",".join(self.settings.traces_exporters)
            try:
                from opentelemetry import trace
                from opentelemetry.sdk.resources import Resource
                from opentelemetry.sdk.trace import TracerProvider
                from opentelemetry.sdk.trace.export import (
                    BatchSpanProcessor,
                    ConsoleSpanExporter,
                    SimpleSpanProcessor,
                )
            except ImportError as exc:
                self._broken = True
                logger.warning("OTEL_TRACES_EXPORTER=%s, but %s: no traces (pip install "
                               "'orchestrator[otel]')", named, exc)
                return None
            current = trace.get_tracer_provider()
            if not isinstance(current, trace.ProxyTracerProvider | trace.NoOpTracerProvider):
                self._otel = _Otel(current)
                return self._otel
            resource = Resource.create(
                {"service.name": self.settings.service_name} if self.settings.service_name
                else {})
            if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
                resource = resource.merge(Resource({"service.name": SCOPE}))
            provider = TracerProvider(resource=resource)
            for name in self.settings.traces_exporters:
                if name == "console":
                    # Written as each span ends: nothing to flush, nothing lost at an exit.
                    provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter(
                        out=_Stdout(), formatter=_one_line)))  # type: ignore[arg-type]
                elif name == "otlp":
                    try:
                        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
                            OTLPSpanExporter,
                        )
                    except ImportError as exc:
                        logger.warning("OTEL_TRACES_EXPORTER=%s: no OTLP exporter (%s; pip "
                                       "install 'orchestrator[otel]')", named, exc)
                        continue
                    # In batches, from a thread the SDK starts again in each forked pool
                    # process; flushed as a worker's processes exit (flush).
                    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
            trace.set_tracer_provider(provider)
            self._own = provider
            self._otel = _Otel(provider)
            return self._otel

    def flush(self, timeout_millis: int = FLUSH_MILLIS) -> None:
        """Export the spans still batched (a worker's process exits: Celery's
        ``worker_process_shutdown`` and ``worker_shutdown``)."""
        otel = self._otel
        if otel is None:
            return
        try:
            flush = getattr(otel.provider, "force_flush", None)
            if flush is not None:
                flush(timeout_millis)
        except Exception as exc:  # an exit must not fail on its spans
            logger.warning("tracing: spans not flushed: %s", exc)

    # -- spans -------------------------------------------------------------------------------
    def submit(self, flow: str) -> _Submit | _Null:
        """The span of a submit of ``flow`` (a context manager): ``.traceparent`` to store
        with the operation, ``.operation(id, host, queue)`` once it is recorded."""
        otel = self._on()
        return NULL if otel is None else self._made(_Submit, otel, flow)

    def step(self, request: Any, operation_id: str, position: int, step: str,
             host: str) -> _Step | _Null:
        """The span of one delivery of a step (a context manager), from its Celery
        ``request``: ``.started(flow, attempt)``, ``.outcome(outcome)``."""
        otel = self._on()
        return NULL if otel is None else self._made(_Step, otel, request, operation_id,
                                                    position, step, host)

    def drain(self, host: str, worker: str, reason: str,
              deadline: float | None = None) -> _Drain | _Null:
        """The span of a worker's drain: ``.event(name, **attributes)``, ``.current()``
        (a context manager), ``.end(**attributes)``."""
        otel = self._on()
        return NULL if otel is None else self._made(_Drain, otel, host, worker, reason,
                                                    deadline)

    @staticmethod
    def _made(kind: Any, *args: Any) -> Any:
        """A span of ``kind``; a span that records nothing if it cannot be made: what it
        traces goes on whatever its trace."""
        try:
            return kind(*args)
        except Exception as exc:
            logger.warning("tracing: no %s span: %s", kind.__name__.strip("_").lower(), exc)
            return NULL

    def headers(self, operation_id: str,
                stored: Callable[[str], str | None]) -> dict[str, str] | None:
        """The headers that carry ``operation_id``'s trace in a step's message: the current
        span's context when it is the operation's (its submit, a step's delivery), else the
        traceparent stored with the operation (``stored(operation_id)``: a read of the
        ledger, off the normal path only: a resend, a wait settled by the looks). None when
        off, or when the operation has no trace."""
        otel = self._on()
        if otel is None:
            return None
        try:
            context = None if otel.of(operation_id) else otel.stored(stored(operation_id))
            carrier: dict[str, str] = {}
            otel.propagate.inject(carrier, context=context)
            return carrier or None
        except Exception as exc:  # a step is sent whatever its trace
            logger.warning("tracing: operation %s: no trace context for its step (%s)",
                           operation_id, exc)
            return None

    def noted(self, kind: str, operation_id: str, position: int | None, step: str | None,
              host: str | None, *, worker: str | None = None, queue: str | None = None,
              detail: str | None = None,
              stored: Callable[[], str | None] = lambda: None) -> None:
        """The operation's history recorded ``kind`` (``Ledger.note``): an event of the
        operation's span when one is current; otherwise a short span of its own in the
        operation's trace (``stored()``: its traceparent), linked to the span current here
        (a drain's), which gets the event too."""
        otel = self._on()
        if otel is None:
            return
        try:
            attributes = _attributes(**{OPERATION: operation_id, POSITION: position,
                                        STEP: step, HOST: host, WORKER: worker, QUEUE: queue,
                                        DETAIL: detail})
            current = otel.trace.get_current_span()
            if otel.of(operation_id):
                current.add_event(kind, attributes)
                return
            links = []
            if current.get_span_context().is_valid:
                links.append(otel.trace.Link(current.get_span_context()))
                if current.is_recording():
                    current.add_event(kind, attributes)
            span = otel.tracer.start_span(
                f"orchestrator.{kind} {step or ''}".strip(), context=otel.stored(stored()),
                links=links, attributes=attributes)
            span.add_event(kind, attributes)
            span.end()
        except Exception as exc:  # what happened did; its span is not worth an error
            logger.warning("tracing: %s of %s not traced: %s", kind, operation_id, exc)
