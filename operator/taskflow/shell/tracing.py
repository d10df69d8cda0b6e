"""Traces of flows: a ``traceparent`` on every dispatch, and spans exported by OTLP when asked.

Every id is derived from the flow's identity, never stored: the trace id from the uid of the
flow at the root of its nesting (16 bytes of a hash), the span ids from uid, run, stage, task
and attempt. A restarted operator (or another replica) therefore continues the same trace with
the same span tree, and the ``traceparent`` a dispatch carries (the attempt's span as the
parent, sampled) is a few microseconds of hashing, with or without an exporter.

A span is emitted when what it covers ends (``ended``: every Emit the writer performs), with
the start and end times the flow's status holds (RFC 3339, milliseconds): the flow's
startTime/completionTime, a stage's and a task's startTime/endTime, an attempt's record
(dispatch time to end). Spans exist only when tracing is configured (``configure``: the
``--otlp-endpoint`` flag or the standard ``OTEL_EXPORTER_OTLP_*`` variables); until then
nothing of opentelemetry is imported. docs/observability.md has the model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol

from taskflow.api.links import PARENT_ATTEMPT, PARENT_CONTEXT, PARENT_TASK, PARENT_UID
from taskflow.api.spec import TaskflowSpec, TaskType
from taskflow.api.status import (
    TERMINAL_FLOW_PHASES,
    TERMINAL_TASK_STATUSES,
    ErrorReason,
    Status,
    TaskError,
    TaskflowStatus,
)
from taskflow.engine import Emit, parse_iso
from taskflow.wire.request import ExecutionContext, TraceParent

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.trace import Tracer

log = logging.getLogger("taskflow.tracing")

# How many flows' trace roots are remembered (a nested flow's takes a JSON parse to find).
_ROOTS_CACHED = 4096
# How far up a chain of parent contexts the root is looked for (the operator's own limit on
# nesting is --max-depth, 10 by default).
_MAX_CHAIN = 64
_PERSON = b"taskflow-trace"
# Statuses of a failed span (a cancel or a skip is no error of the span's own).
_ERRORS = frozenset({Status.FAILED, Status.TIMED_OUT})
_REASONS = frozenset(ErrorReason)


class Flow(Protocol):
    """What a flow's writer (``runner.FlowRunner``) tells the tracing of itself."""

    uid: str
    name: str
    namespace: str
    body: dict[str, Any]

    @property
    def status(self) -> TaskflowStatus: ...
    def spec(self) -> TaskflowSpec: ...


# -- ids (pure: the same flow gives the same ids in every process) -------------------------------


def _digest(size: int, *parts: str) -> str:
    text = hashlib.blake2b(
        "\x1f".join(parts).encode(), digest_size=size, person=_PERSON
    ).hexdigest()
    # All zeros is not a valid id (one in 2**64 at worst).
    return text if text.strip("0") else text[:-1] + "1"


def trace_id(root_uid: str) -> str:
    """The trace of a flow and all its nested flows: 32 hex digits from the root's uid."""
    return _digest(16, "trace", root_uid)


def flow_span_id(uid: str, run: str = "") -> str:
    return _digest(8, "flow", uid, run)


def stage_span_id(uid: str, run: str, stage: str) -> str:
    return _digest(8, "stage", uid, run, stage)


def task_span_id(uid: str, run: str, stage: str, task: str) -> str:
    return _digest(8, "task", uid, run, stage, task)


def attempt_span_id(uid: str, stage: str, task: str, attempt: int) -> str:
    """An attempt's span, the parent a service's work for it gets (attempt numbers keep
    counting across a flow's retries, so no run is needed)."""
    return _digest(8, "attempt", uid, stage, task, str(attempt))


def run_of(status: TaskflowStatus) -> str:
    """Which run of the flow a span belongs to: a retry (``spec.retry``) runs its stages and
    tasks again, and their spans need ids of their own. The first run is ""."""
    retry = status.retry
    return retry.id if retry is not None and retry.accepted else ""


class Root:
    """Where a flow sits in its trace: the root flow's uid and, for a nested flow, the span of
    the parent's attempt that started it."""

    __slots__ = ("parent_span", "trace_id")

    def __init__(self, trace_id: str, parent_span: str | None) -> None:
        self.trace_id = trace_id
        self.parent_span = parent_span


_roots: dict[str, Root] = {}


def root_of(uid: str, metadata: dict[str, Any]) -> Root:
    """A flow's trace: its own, or, for a nested flow, its root's (found through the chain of
    parent contexts its parent-context annotation holds). The link is trusted only as far as
    the flow is owned by the parent it names; a flow that merely claims a parent (anyone may
    write annotations) gets a trace of its own."""
    annotations = metadata.get("annotations") or {}
    raw = annotations.get(PARENT_CONTEXT)
    if not raw:
        return Root(trace_id(uid), None)  # (most flows: no parsing, no cache)
    found = _roots.get(uid)
    if found is not None:
        return found
    found = _nested_root(uid, metadata, annotations, raw) or Root(trace_id(uid), None)
    if len(_roots) >= _ROOTS_CACHED:
        _roots.clear()
    _roots[uid] = found
    return found


def _nested_root(
    uid: str, metadata: dict[str, Any], annotations: dict[str, Any], raw: str
) -> Root | None:
    parent_uid = (metadata.get("labels") or {}).get(PARENT_UID)
    owners = metadata.get("ownerReferences") or []
    if not parent_uid or not any(
        isinstance(o, dict) and o.get("uid") == parent_uid for o in owners
    ):
        return None
    stage, _, task = str(annotations.get(PARENT_TASK) or "").partition(".")
    attempt = str(annotations.get(PARENT_ATTEMPT) or "")
    if not (stage and task and attempt.isascii() and attempt.isdigit() and len(attempt) < 10):
        return None
    try:
        context = ExecutionContext(json.loads(raw))
    except (ValueError, TypeError, RecursionError):
        return None
    if not isinstance(context.raw, dict) or context.taskflow_id != parent_uid:
        return None
    root = parent_uid
    for _ in range(_MAX_CHAIN):  # the parent's own parent context, and so on
        above = context.parent
        if above is None:
            break
        context = ExecutionContext(above)
        if context.taskflow_id is None or context.taskflow_id == uid:
            break
        root = context.taskflow_id
    return Root(trace_id(root), attempt_span_id(parent_uid, stage, task, int(attempt)))


def traceparent(flow: Flow, stage: str, task: str, attempt: int) -> TraceParent:
    """The header of a dispatch: the flow's trace, the attempt's span, sampled."""
    root = root_of(flow.uid, flow.body["metadata"])
    return TraceParent(root.trace_id, attempt_span_id(flow.uid, stage, task, attempt))


# -- spans (only when configured) ----------------------------------------------------------------

_spans: _Spans | None = None


def enabled() -> bool:
    return _spans is not None


def ended(flow: Flow, effect: Emit) -> None:
    """An event the writer performs: the span of what ended, if tracing is on (never raises;
    a span that cannot be made is logged, once per kind of problem)."""
    if _spans is None or effect.status == Status.RUNNING:
        return
    try:
        _spans.ended(flow, effect)
    except Exception as exc:
        problem = type(exc).__name__
        if problem not in _spans.problems:
            _spans.problems.add(problem)
            log.warning("no span for a %s event of %s: %s", effect.kind, flow.uid, exc)


def configure(
    *,
    endpoint: str | None = None,
    environ: Mapping[str, str] | None = None,
    exporter: SpanExporter | None = None,
) -> bool:
    """Export spans by OTLP (HTTP/protobuf, or gRPC when ``OTEL_EXPORTER_OTLP_PROTOCOL`` says
    so and its exporter is installed) to ``endpoint`` (the collector's base URL, e.g.
    http://otel-collector:4318) or where the standard ``OTEL_EXPORTER_OTLP_*`` variables say.
    False (and nothing imported) when neither is set, ``OTEL_SDK_DISABLED`` is true or
    ``OTEL_TRACES_EXPORTER`` is none; also when the SDK is not installed (said in the log).
    ``exporter``: spans go there instead, one at a time (tests: an in-memory exporter)."""
    global _spans
    shutdown()  # (configured again: the last exporter's spans go first)
    env = os.environ if environ is None else environ
    if exporter is not None:
        _spans = _build(None, env, exporter)
        return True
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    if env.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() == "none":
        return False
    configured = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get(
        "OTEL_EXPORTER_OTLP_ENDPOINT"
    )
    if not endpoint and not configured:
        return False
    try:
        spans = _build(endpoint, env, None)
    except ImportError as exc:
        log.warning(
            "tracing asked for (%s) but the OpenTelemetry SDK is not installed "
            "(pip install 'taskflow-operator[tracing]'): %s",
            endpoint or configured,
            exc,
        )
        return False
    _spans = spans
    log.info("exporting traces by OTLP to %s", endpoint or configured)
    return True


def shutdown() -> None:
    """Flush the spans not yet exported (also done at exit)."""
    global _spans
    if _spans is not None:
        _spans.provider.shutdown()
        _spans = None


def _build(endpoint: str | None, env: Mapping[str, str], exporter: SpanExporter | None) -> _Spans:
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
    from opentelemetry.sdk.trace.id_generator import IdGenerator
    from opentelemetry.sdk.trace.sampling import ALWAYS_ON

    from taskflow import __version__

    class Ids(IdGenerator):
        """The ids the next span gets, set just before it is started (synchronously)."""

        trace_id = 0
        span_id = 0

        def generate_trace_id(self) -> int:
            return self.trace_id

        def generate_span_id(self) -> int:
            return self.span_id

    protocol = (
        env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "http/protobuf"
    )
    if exporter is not None:
        processor: SpanProcessor = SimpleSpanProcessor(exporter)
    elif protocol.strip() == "grpc" and not endpoint:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (  # type: ignore[import-not-found,unused-ignore]
            OTLPSpanExporter as GrpcExporter,
        )

        processor = BatchSpanProcessor(GrpcExporter())
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        url = f"{endpoint.rstrip('/')}/v1/traces" if endpoint else None
        processor = BatchSpanProcessor(OTLPSpanExporter(endpoint=url))
    named = env.get("OTEL_SERVICE_NAME") or "service.name=" in env.get(
        "OTEL_RESOURCE_ATTRIBUTES", ""
    )
    resource = Resource.create({} if named else {"service.name": "taskflow-operator"})
    # Every flow is traced: sample at the collector (a trace's spans come from many
    # processes and restarts, so a head sampler here could keep half a tree).
    ids = Ids()
    provider = TracerProvider(resource=resource, sampler=ALWAYS_ON, id_generator=ids)
    provider.add_span_processor(processor)
    return _Spans(provider, provider.get_tracer("taskflow.operator", __version__), ids)


class _Spans:
    """Spans made from a flow's status as its parts end, handed to the SDK's batch exporter."""

    def __init__(self, provider: TracerProvider, tracer: Tracer, ids: Any) -> None:
        from opentelemetry import context, trace
        from opentelemetry.trace.status import Status as SpanStatus
        from opentelemetry.trace.status import StatusCode

        self.provider = provider
        self.tracer = tracer
        self.ids = ids  # (the provider's IdGenerator: the next span's ids)
        self.trace = trace
        self.context = context
        self.SpanStatus = SpanStatus
        self.ERROR = StatusCode.ERROR
        self.problems: set[str] = set()

    def ended(self, flow: Flow, effect: Emit) -> None:
        status = flow.status
        root = root_of(flow.uid, flow.body["metadata"])
        run = run_of(status)
        common = {
            "taskflow.uid": flow.uid,
            "taskflow.name": flow.name,
            "taskflow.namespace": flow.namespace,
        }
        if effect.kind == "TASKFLOW":
            if effect.status not in TERMINAL_FLOW_PHASES:
                return  # (SUSPENDED: the flow goes on)
            end = _ns(status.completion_time)
            self.span(
                "taskflow",
                root.trace_id,
                flow_span_id(flow.uid, run),
                root.parent_span,
                start=_ns(status.start_time) or end,
                end=end,
                attributes={**common, "taskflow.phase": effect.status},
                failed=effect.status == "FAILED",
            )
            return
        stage = next((s for s in status.stages if s.name == effect.stage), None)
        if stage is None:
            return
        common["taskflow.stage"] = stage.name
        if effect.kind == "STAGE":
            if effect.status not in TERMINAL_TASK_STATUSES:
                return
            end = _ns(stage.end_time)
            self.span(
                f"stage {stage.name}",
                root.trace_id,
                stage_span_id(flow.uid, run, stage.name),
                flow_span_id(flow.uid, run),
                start=_ns(stage.start_time) or end,
                end=end,
                attributes={**common, "taskflow.status": effect.status},
                failed=effect.status in _ERRORS,
            )
            return
        task = next((t for t in stage.tasks if t.name == effect.task), None)
        if task is None or effect.attempt is None:
            return
        spec = flow.spec().task(stage.name, task.name)
        details = spec.task_details if spec is not None else None
        common["taskflow.task"] = task.name
        if details is not None:
            common["taskflow.service"] = details.service_id
            common["taskflow.action"] = details.action_name
        outcome = {"taskflow.status": effect.status, **_error_attributes(effect.error)}
        parent = task_span_id(flow.uid, run, stage.name, task.name)
        record = next((r for r in reversed(task.attempts) if r.attempt == effect.attempt), None)
        if record is not None:
            end = _ns(record.end_time)
            if details is not None:
                name = f"attempt {details.service_id}.{details.action_name}"
            else:
                name = (
                    "attempt child taskflow"
                    if spec and spec.type == TaskType.TASKFLOW
                    else "attempt"
                )
            self.span(
                name,
                root.trace_id,
                attempt_span_id(flow.uid, stage.name, task.name, effect.attempt),
                parent,
                start=_ns(record.start_time) or end,
                end=end,
                attributes={**common, "taskflow.attempt": effect.attempt, **outcome},
                failed=effect.status in _ERRORS,
                message=effect.error.message if effect.error else None,
                client=details is not None,
            )
        if task.attempt != effect.attempt or task.status not in TERMINAL_TASK_STATUSES:
            return  # another attempt follows: the task goes on
        end = _ns(task.end_time) or (_ns(record.end_time) if record else None)
        self.span(
            f"task {spec.name if spec else task.name}",
            root.trace_id,
            parent,
            stage_span_id(flow.uid, run, stage.name),
            start=_ns(task.start_time) or end,
            end=end,
            attributes={
                **common,
                # (how many attempts this run made; none for a task never sent)
                "taskflow.attempts": task.attempt - task.run_start_attempt + 1 if record else None,
                **outcome,
            },
            failed=effect.status in _ERRORS,
            message=effect.error.message if effect.error else None,
        )

    def span(
        self,
        name: str,
        trace_id: str,
        span_id: str,
        parent_id: str | None,
        *,
        start: int | None,
        end: int | None,
        attributes: dict[str, Any],
        failed: bool,
        message: str | None = None,
        client: bool = False,
    ) -> None:
        trace = self.trace
        if parent_id is None:
            parent = self.context.Context()  # a root: not whatever span is current
        else:
            parent = trace.set_span_in_context(
                trace.NonRecordingSpan(
                    trace.SpanContext(
                        int(trace_id, 16),
                        int(parent_id, 16),
                        is_remote=False,
                        trace_flags=trace.TraceFlags(trace.TraceFlags.SAMPLED),
                    )
                )
            )
        self.ids.trace_id, self.ids.span_id = int(trace_id, 16), int(span_id, 16)
        span = self.tracer.start_span(
            name,
            context=parent,
            kind=trace.SpanKind.CLIENT if client else trace.SpanKind.INTERNAL,
            attributes={k: v for k, v in attributes.items() if v is not None},
            start_time=start,
        )
        if failed:
            span.set_status(self.SpanStatus(self.ERROR, (message or "")[:256] or None))
        span.end(end_time=end)


def _ns(value: str | None) -> int | None:
    """An RFC 3339 time of status in epoch nanoseconds (the SDK's clock), or None."""
    if not value:
        return None
    try:
        return parse_iso(value) * 1_000_000
    except ValueError:
        return None


def _error_attributes(error: TaskError | None) -> dict[str, Any]:
    if error is None:
        return {}
    reason = error.reason if error.reason in _REASONS else None
    return {"taskflow.error.reason": reason, "taskflow.error.code": error.code}


__all__ = [
    "Flow",
    "attempt_span_id",
    "configure",
    "ended",
    "flow_span_id",
    "root_of",
    "run_of",
    "shutdown",
    "stage_span_id",
    "task_span_id",
    "trace_id",
    "traceparent",
]
