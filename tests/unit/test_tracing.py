"""Traces, the pure parts: the ``traceparent`` header (W3C format, through ``RequestHeaders``),
ids derived from a flow's identity (the same in every process, so a restarted operator
continues the trace), a nested flow's place in its root's trace, and the span tree the shell
makes from the engine's own decisions, caught by an in-memory exporter. No servers."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from taskflow.api.links import PARENT_ATTEMPT, PARENT_CONTEXT, PARENT_TASK, PARENT_UID
from taskflow.api.spec import TaskflowSpec
from taskflow.api.status import ErrorReason, FlowPhase, TaskError, TaskflowStatus
from taskflow.engine import Dispatch, Emit, Reply, decide
from taskflow.shell import metrics, tracing
from taskflow.wire.context import CONTEXT_HEADER
from taskflow.wire.request import (
    TRACEPARENT_HEADER,
    ExecutionContext,
    RequestHeaders,
    TraceParent,
)

UID = "00000000-0000-0000-0000-0000000000a1"
T0 = 1_700_000_000_000
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN = "00f067aa0ba902b7"

# -- the header ---------------------------------------------------------------------------------


def test_traceparent_is_the_w3c_format() -> None:
    header = TraceParent(TRACE, SPAN).encode()
    assert header == f"00-{TRACE}-{SPAN}-01"
    assert TraceParent.decode(header) == TraceParent(TRACE, SPAN, 1)
    assert TraceParent.decode(f"00-{TRACE}-{SPAN}-00") == TraceParent(TRACE, SPAN, 0)
    assert not TraceParent(TRACE, SPAN, 0).sampled


@pytest.mark.parametrize(
    "text",
    [
        None,
        "",
        "garbage",
        f"00-{TRACE}-{SPAN}",  # no flags
        f"00-{'0' * 32}-{SPAN}-01",  # an all-zero trace id
        f"00-{TRACE}-{'0' * 16}-01",  # an all-zero span id
        f"00-{TRACE.upper()}-{SPAN}-01",  # upper case
        f"ff-{TRACE}-{SPAN}-01",  # the forbidden version
        f"0x-{TRACE}-{SPAN}-01",
        f"00-{TRACE}-{SPAN}-0g",
        f"00_{TRACE}_{SPAN}_01",
        f"00-{TRACE}-{SPAN}-01-extra",  # version 00 has exactly four fields
        f"00-{TRACE[:-1]}-{SPAN}0-01",
        f"01-{TRACE}-{SPAN}-01x",  # a later version: a dash after the flags
        f"01-{TRACE}-{SPAN}-01-" + "a" * 600,  # unbounded
    ],
)
def test_a_traceparent_that_is_not_one_is_ignored(text: str | None) -> None:
    assert TraceParent.decode(text) is None


def test_a_later_versions_traceparent_is_read_by_its_first_fields() -> None:
    assert TraceParent.decode(f"01-{TRACE}-{SPAN}-01-what-comes") == TraceParent(TRACE, SPAN, 1)


def test_the_header_round_trips_through_request_headers() -> None:
    sent = RequestHeaders(
        context=ExecutionContext({"taskflow": {"id": UID}}),
        key=f"{UID}/s1/a/0",
        traceparent=TraceParent(TRACE, SPAN),
    )
    headers = sent.encode()
    assert headers[TRACEPARENT_HEADER] == f"00-{TRACE}-{SPAN}-01"
    assert RequestHeaders.decode(headers) == sent
    # Absent or malformed: no trace context, the rest as before.
    assert TRACEPARENT_HEADER not in RequestHeaders(context=ExecutionContext()).encode()
    assert RequestHeaders.decode({**headers, TRACEPARENT_HEADER: "nonsense"}).traceparent is None
    assert RequestHeaders.decode({}).traceparent is None


# -- ids ----------------------------------------------------------------------------------------


class Flow:
    """What a writer shows the tracing: identity, metadata, the status it decided, its spec."""

    def __init__(self, spec: TaskflowSpec, uid: str = UID, metadata: dict[str, Any] | None = None):
        self.uid, self.name, self.namespace = uid, "flow", "ns"
        self.body: dict[str, Any] = {"metadata": metadata or {"uid": uid}}
        self.status = TaskflowStatus()
        self._spec = spec

    def spec(self) -> TaskflowSpec:
        return self._spec


def spec_of(stages: dict[str, list[str]], **options: Any) -> TaskflowSpec:
    return TaskflowSpec.model_validate(
        {
            "stages": [
                {
                    "name": stage,
                    "tasks": [
                        {"name": t, "taskDetails": {"serviceId": "svc", "actionName": t}}
                        for t in tasks
                    ],
                }
                for stage, tasks in stages.items()
            ],
            **({"options": options} if options else {}),
        }
    )


def test_ids_are_derived_from_the_flow_alone() -> None:
    """Two processes (an operator and its restart) compute the same ids; every part of the
    identity changes them; ids are valid W3C ids."""
    flow = Flow(spec_of({"s1": ["a"]}))
    header = tracing.traceparent(flow, "s1", "a", 0)
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from taskflow.shell import tracing; "
            f"print(tracing.trace_id({UID!r}), tracing.attempt_span_id({UID!r}, 's1', 'a', 0)); "
            "print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    assert out[0] == f"{header.trace_id} {header.span_id}"
    assert out[1] == "[]"  # (and nothing of OpenTelemetry imported to compute them)
    assert header.sampled
    assert TraceParent.decode(header.encode()) == header
    assert len(header.trace_id) == 32 and len(header.span_id) == 16
    spans = {
        tracing.attempt_span_id(UID, "s1", "a", 0),
        tracing.attempt_span_id(UID, "s1", "a", 1),
        tracing.attempt_span_id(UID, "s1", "b", 0),
        tracing.attempt_span_id(UID, "s2", "a", 0),
        tracing.task_span_id(UID, "", "s1", "a"),
        tracing.task_span_id(UID, "r1", "s1", "a"),
        tracing.stage_span_id(UID, "", "s1"),
        tracing.stage_span_id(UID, "r1", "s1"),
        tracing.flow_span_id(UID),
        tracing.flow_span_id(UID, "r1"),
        tracing.attempt_span_id(UID.replace("a1", "a2"), "s1", "a", 0),
    }
    assert len(spans) == 11
    assert tracing.trace_id(UID) != tracing.trace_id(UID.replace("a1", "a2"))


def nested_metadata(
    uid: str, parent: str, context: dict[str, Any], *, owned: bool = True
) -> dict[str, Any]:
    return {
        "uid": uid,
        "labels": {PARENT_UID: parent},
        "annotations": {
            PARENT_TASK: "s1.spawn",
            PARENT_ATTEMPT: "2",
            PARENT_CONTEXT: json.dumps(context),
        },
        "ownerReferences": [{"uid": parent if owned else "someone-else", "kind": "Taskflow"}],
    }


def test_a_nested_flow_is_in_its_roots_trace_under_its_parents_attempt() -> None:
    root, child, grandchild = "root-uid", "child-uid", "grandchild-uid"
    root_context = {"taskflow": {"id": root, "taskInfo": {"meta": {}}}}
    child_context = {
        "taskflow": {"id": child, "taskInfo": {"meta": {CONTEXT_HEADER: root_context}}}
    }
    found = tracing.root_of(child, nested_metadata(child, root, root_context))
    assert found.trace_id == tracing.trace_id(root)
    assert found.parent_span == tracing.attempt_span_id(root, "s1", "spawn", 2)
    deeper = tracing.root_of(grandchild, nested_metadata(grandchild, child, child_context))
    assert deeper.trace_id == tracing.trace_id(root)
    assert deeper.parent_span == tracing.attempt_span_id(child, "s1", "spawn", 2)
    # Anyone may write annotations: a flow its named parent does not own has its own trace.
    forged = tracing.root_of(
        "forged-uid", nested_metadata("forged-uid", root, root_context, owned=False)
    )
    assert (forged.trace_id, forged.parent_span) == (tracing.trace_id("forged-uid"), None)
    alone = tracing.root_of(root, {"uid": root})
    assert (alone.trace_id, alone.parent_span) == (tracing.trace_id(root), None)


def test_a_retry_is_a_new_run() -> None:
    status = TaskflowStatus.model_validate(
        {"retry": {"id": "r1", "accepted": True, "time": "2024-01-01T00:00:00.000Z"}}
    )
    assert tracing.run_of(status) == "r1"
    assert status.retry is not None
    status.retry.accepted = False
    assert tracing.run_of(status) == ""
    assert tracing.run_of(TaskflowStatus()) == ""


# -- spans from the engine's decisions -----------------------------------------------------------


@pytest.fixture
def exported() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    assert tracing.configure(exporter=exporter)
    yield exporter
    tracing.shutdown()


def run(flow: Flow, answer: dict[tuple[str, int], bool]) -> list[Dispatch]:
    """Drive the engine to the flow's end as a writer does, answering each attempt
    ``answer[(task, attempt)]`` (ok or not) 10 ms after it was sent; the shell's
    ``tracing.ended`` sees every event, with the decided status."""
    now, inputs, sent = T0, [], []
    for _ in range(50):
        decision = decide(
            spec=flow.spec(),
            status=flow.status,
            now=now,
            inputs=inputs,
            uid=flow.uid,
            generation=1,
            event_subject="x",
        )
        flow.status = decision.status
        inputs = []
        for effect in decision.effects:
            if isinstance(effect, Emit):
                tracing.ended(flow, effect)
            elif isinstance(effect, Dispatch):
                sent.append(effect)
                ok = answer[(effect.task, effect.attempt)]
                error = None if ok else TaskError(message="no", reason=ErrorReason.SERVICE)
                inputs.append(Reply(effect.stage, effect.task, effect.attempt, ok, error=error))
        if flow.status.phase not in (FlowPhase.PENDING, FlowPhase.RUNNING):
            return sent
        now = decision.wake_at if not inputs and decision.wake_at else now + 10
    raise AssertionError("the flow did not end")


def test_the_span_tree_of_a_flow(exported: InMemorySpanExporter) -> None:
    """flow > stage > task > attempt, every span in the flow's trace, each attempt's span the
    one its dispatch's traceparent named, times from status; a failed attempt retried."""
    flow = Flow(spec_of({"s1": ["a", "b"], "s2": ["c"]}, maxRetries=1, retryDelay="1s"))
    sent = run(flow, {("a", 0): True, ("b", 0): False, ("b", 1): True, ("c", 0): True})
    spans = {s.name: s for s in exported.get_finished_spans()}
    names = sorted(s.name for s in exported.get_finished_spans())
    assert names == [
        "attempt svc.a",
        "attempt svc.b",
        "attempt svc.b",
        "attempt svc.c",
        "stage s1",
        "stage s2",
        "task a",
        "task b",
        "task c",
        "taskflow",
    ]
    trace = int(tracing.trace_id(UID), 16)
    assert {s.context.trace_id for s in exported.get_finished_spans()} == {trace}
    by_id = {s.context.span_id: s for s in exported.get_finished_spans()}
    assert len(by_id) == 10
    root = spans["taskflow"]
    assert root.parent is None
    assert root.attributes["taskflow.phase"] == "SUCCEEDED"
    for span in exported.get_finished_spans():
        if span is not root:
            assert span.parent is not None and span.parent.span_id in by_id, span.name
    assert by_id[spans["stage s2"].parent.span_id] is root  # type: ignore[union-attr]
    task_b = spans["task b"]
    assert by_id[task_b.parent.span_id].name == "stage s1"  # type: ignore[union-attr]
    attempts_b = [s for s in exported.get_finished_spans() if s.name == "attempt svc.b"]
    assert [s.parent.span_id for s in attempts_b] == [task_b.context.span_id] * 2  # type: ignore[union-attr]
    assert [s.attributes["taskflow.status"] for s in attempts_b] == ["FAILED", "SUCCEEDED"]
    assert attempts_b[0].status.status_code.name == "ERROR"
    assert attempts_b[0].attributes["taskflow.error.reason"] == "Service"
    # Each attempt's span is the parent the service was told of.
    for dispatch in sent:
        header = tracing.traceparent(flow, dispatch.stage, dispatch.task, dispatch.attempt)
        span = by_id[int(header.span_id, 16)]
        assert span.name == f"attempt svc.{dispatch.task}"
        assert span.attributes["taskflow.attempt"] == dispatch.attempt
    # Times are status's: b's retry waited 1 s, inside task b and stage s1.
    assert task_b.start_time == attempts_b[0].start_time
    assert task_b.end_time == attempts_b[1].end_time
    assert attempts_b[1].start_time - attempts_b[0].end_time >= 1_000_000_000
    assert root.start_time <= spans["stage s1"].start_time
    assert root.end_time >= spans["stage s2"].end_time


def test_no_spans_and_no_opentelemetry_unless_configured() -> None:
    """The default: configure() finds nothing to export to, and nothing is imported."""
    code = (
        "import sys; from taskflow.shell import tracing, effects; "
        "assert not tracing.configure(environ={}); "
        "assert not tracing.configure(environ={'OTEL_EXPORTER_OTLP_ENDPOINT': 'http://x:4318', "
        "'OTEL_SDK_DISABLED': 'true'}); "
        "assert not tracing.enabled(); "
        "print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# -- per-service metrics -------------------------------------------------------------------------


def test_service_labels_are_bounded() -> None:
    taken = dict(metrics._series)
    try:
        metrics._series.clear()
        for i in range(metrics.MAX_SERVICE_LABELS):
            assert metrics.service_labels(f"svc{i}", "do") == (f"svc{i}", "do")
        assert metrics.service_labels("svc0", "do") == ("svc0", "do")  # (known: still itself)
        assert metrics.service_labels("one-more", "do") == (metrics.OTHER, metrics.OTHER)
    finally:
        metrics._series.clear()
        metrics._series.update(taken)


def test_the_dashboard_and_the_docs_name_only_metrics_the_operator_has() -> None:
    import re
    from pathlib import Path

    from prometheus_client import REGISTRY

    root = Path(__file__).resolve().parents[2]
    names: set[str] = set()
    for family in REGISTRY.collect():
        suffixes = {
            "counter": ["_total"],
            "histogram": ["_bucket", "_sum", "_count", ""],
        }.get(family.type, [""])
        names.update(family.name + suffix for suffix in suffixes)
    dashboard = (root / "docs/dashboards/taskflow-services.json").read_text()
    json.loads(dashboard)
    used = set(re.findall(r"taskflow_[a-z_]+", dashboard)) - {"taskflow_services"}
    assert used and used <= names, used - names
    documented = set(
        re.findall(r"`(taskflow_[a-z_]+)", (root / "docs/observability.md").read_text())
    )
    assert documented <= names, documented - names
    # Every per-service series is documented (the operator's own: docs/observability.md too).
    service = {
        n
        for n in names
        if n.startswith("taskflow_service_") and not n.endswith(("_bucket", "_sum", "_count"))
    }
    assert len(service) == 4 and service <= documented, service - documented


def test_the_sdk_serves_without_opentelemetry() -> None:
    """A service without OpenTelemetry installed: the context still has the header, the
    handler runs, no span (the import is blocked in a fresh interpreter)."""
    code = f"""
import sys
sys.modules["opentelemetry"] = None  # as if not installed
from taskflow.sdk import service as sdk
ctx = sdk.TaskContext.parse("svc.do", {{"traceparent": "00-{TRACE}-{SPAN}-01"}}, {{}})
assert ctx.traceparent is not None and ctx.traceparent.span_id == "{SPAN}"
ran = []
with sdk.Service("svc")._span(sdk._Action("do", "svc.do", None), ctx):
    ran.append(1)
assert ran and sdk._opentelemetry() is None
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "ok", out.stderr
