"""Traces and per-service metrics on the real servers.

- An SDK service (in this process, its spans in an in-memory exporter) continues the trace:
  its handler's span is a child of the attempt's span the ``traceparent`` header names.
- An operator started with ``--otlp-endpoint`` exports the span tree of a flow (flow > stage >
  task > attempt, a nested flow under its parent's attempt) to a small OTLP/HTTP receiver
  run by the test (aiohttp, decoding the protobuf with opentelemetry-proto), and a restarted
  operator continues the same trace with the same ids. (Its own stack: no other operator may
  serve those flows.)
- The operator's metrics endpoint has dispatches, reply latency, outcomes and failures by
  service and action after flows ran.
"""

from __future__ import annotations

import asyncio
import gzip
import signal
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
from aiohttp import web
from kubernetes import client, config
from opentelemetry import trace
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client.parser import text_string_to_metric_families

from conftest import Flows, OperatorProcess, eventually, flow, serve
from taskflow.devstack import DevStack
from taskflow.devstack.servers import free_port
from taskflow.sdk import Service, TaskContext, TaskFailure
from taskflow.shell import tracing
from taskflow.wire.request import TraceParent


def in_memory() -> tuple[TracerProvider, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


# -- the service's side -------------------------------------------------------------------------


async def test_a_service_span_is_a_child_of_the_attempts_span(
    operator: OperatorProcess, flows: Flows, stack: DevStack, svc: str
) -> None:
    provider, exporter = in_memory()
    seen: dict[str, Any] = {}
    service = Service(svc, nats_url=stack.nats.url, tracer_provider=provider)

    @service.action("do")
    async def do(params: Any, ctx: TaskContext) -> Any:
        seen[params["task"]] = (ctx.traceparent, trace.get_current_span().get_span_context())
        if params["task"] == "bad":
            raise TaskFailure("refused", code="NOPE", retryable=False)
        return {"ok": True}

    async with service:
        created = await flows.create(flow(svc, ["good", "bad"]), "traced")
        done = await flows.wait("traced")
    assert done["status"]["phase"] == "FAILED"
    uid = created["metadata"]["uid"]
    spans = {s.attributes["taskflow.task"]: s for s in exporter.get_finished_spans()}
    assert sorted(spans) == ["bad", "good"]
    for task in ("good", "bad"):
        sent, current = seen[task]
        span = spans[task]
        # The header: the flow's trace, the attempt's span (derived from uid/stage/task/attempt).
        assert sent == TraceParent(
            tracing.trace_id(uid), tracing.attempt_span_id(uid, "s1", task, 0), 1
        )
        assert span.parent is not None and span.parent.is_remote
        assert f"{span.context.trace_id:032x}" == sent.trace_id
        assert f"{span.parent.span_id:016x}" == sent.span_id
        assert span.name == f"{svc}.do"
        assert span.kind == trace.SpanKind.SERVER
        assert span.attributes["taskflow.uid"] == uid
        assert span.attributes["taskflow.attempt"] == 0
        # The handler ran inside it: its own work (an instrumented client) is a child.
        assert current.span_id == span.context.span_id
    assert spans["good"].status.status_code == trace.StatusCode.UNSET
    assert spans["bad"].status.status_code == trace.StatusCode.ERROR
    assert spans["bad"].attributes["taskflow.error.code"] == "NOPE"


# -- the operator's side ------------------------------------------------------------------------


@dataclass
class Received:
    trace_id: str
    span_id: str
    parent: str
    name: str
    attributes: dict[str, Any]
    start: int
    end: int
    service: str


class Collector:
    """An OTLP/HTTP receiver (POST /v1/traces, protobuf) keeping every span it is sent."""

    def __init__(self) -> None:
        self.spans: list[Received] = []
        self.port = free_port()
        self.runner: web.AppRunner | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/traces", self.receive)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    async def receive(self, request: web.Request) -> web.Response:
        body = await request.read()
        if request.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        message = ExportTraceServiceRequest.FromString(body)
        for resource in message.resource_spans:
            service = next(
                (
                    a.value.string_value
                    for a in resource.resource.attributes
                    if a.key == "service.name"
                ),
                "",
            )
            for scope in resource.scope_spans:
                for span in scope.spans:
                    self.spans.append(
                        Received(
                            trace_id=span.trace_id.hex(),
                            span_id=span.span_id.hex(),
                            parent=span.parent_span_id.hex(),
                            name=span.name,
                            attributes={
                                a.key: getattr(a.value, a.value.WhichOneof("value"))
                                for a in span.attributes
                            },
                            start=span.start_time_unix_nano,
                            end=span.end_time_unix_nano,
                            service=service,
                        )
                    )
        return web.Response(
            body=ExportTraceServiceResponse().SerializeToString(),
            content_type="application/x-protobuf",
        )

    def named(self, name: str) -> list[Received]:
        return [s for s in self.spans if s.name == name]


@pytest.fixture
async def collector() -> AsyncIterator[Collector]:
    receiver = Collector()
    await receiver.start()
    yield receiver
    await receiver.stop()


@pytest.mark.integration
async def test_the_operator_exports_the_span_tree_and_continues_it_after_a_restart(
    tmp_path_factory: pytest.TempPathFactory,
    collector: Collector,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """s1: a, and b failing once (retried); s2: c, held by the service while the operator is
    killed and started again; s3: a nested flow. Every span of the operator's (both
    processes') and of the service's is in one trace, each under the parent its ids name."""
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")  # (the operator's export: every 0.1 s)
    spec = {
        "options": {"maxRetries": 1, "retryDelay": "1s"},
        "stages": [
            {"name": "s1", "tasks": [action("a"), action("b")]},
            {"name": "s2", "tasks": [action("c")]},
            {
                "name": "s3",
                "tasks": [
                    {
                        "name": "nested",
                        "type": "TASKFLOW",
                        "taskflow": {"stages": [{"name": "inner", "tasks": [action("leaf")]}]},
                    }
                ],
            },
        ],
    }
    provider, exporter = in_memory()
    with DevStack(tmp_path_factory.mktemp("tracing")) as stack:
        api = config.new_client_from_config(str(stack.kubeconfig))
        await asyncio.to_thread(
            client.CoreV1Api(api).create_namespace, client.V1Namespace(metadata={"name": "flows"})
        )
        operator = OperatorProcess(
            stack,
            tmp_path_factory.mktemp("tracing-operator"),
            extra=["--otlp-endpoint", collector.endpoint],
        )
        release = asyncio.Event()
        failed_once: list[int] = []
        service = Service("tsvc", nats_url=stack.nats.url, tracer_provider=provider)

        @service.action("do")
        async def do(params: Any, ctx: TaskContext) -> Any:
            if params["task"] == "b" and not failed_once:
                failed_once.append(ctx.attempt)
                raise TaskFailure("once", code="FLAKY")
            if params["task"] == "c":
                await release.wait()
            return {"task": params["task"]}

        try:
            operator.start()
            await service.start()
            flows = Flows(api, "flows")
            created = await flows.create(spec, "traced")
            uid = created["metadata"]["uid"]
            # s1 ended and its spans left the first process; c is running.
            await eventually(lambda: collector.named("stage s1"), timeout=30)
            await eventually(lambda: service.counters.handled >= 4, timeout=10)
            operator.kill(signal.SIGKILL)
            operator.start()
            release.set()
            done = await flows.wait("traced", timeout=60)
            assert done["status"]["phase"] == "SUCCEEDED", done["status"]
            await eventually(lambda: len(collector.named("taskflow")) == 2, timeout=10)
        finally:
            await service.stop()
            operator.stop()
            api.close()

    trace_id = tracing.trace_id(uid)
    spans = collector.spans
    assert {s.trace_id for s in spans} == {trace_id}  # (the nested flow's too)
    assert {s.service for s in spans} == {"taskflow-operator"}
    by_id = {s.span_id: s for s in spans}
    assert len(by_id) == len(spans)  # no span twice, though two processes made them
    [root] = [s for s in collector.named("taskflow") if s.parent == ""]
    assert root.span_id == tracing.flow_span_id(uid)
    assert root.attributes["taskflow.phase"] == "SUCCEEDED"
    # Every span but the root hangs under a span that was exported too.
    for span in spans:
        if span is not root:
            assert span.parent in by_id, (span.name, span.attributes)
    # The stages: s1's from the first process, s2's and s3's from the second, one parent.
    stages = [
        s for s in spans if s.name.startswith("stage ") and s.attributes["taskflow.uid"] == uid
    ]
    assert sorted(s.name for s in stages) == ["stage s1", "stage s2", "stage s3"]
    assert {s.parent for s in stages} == {root.span_id}
    # b: two attempts under one task span, the first failed.
    [task_b] = collector.named("task b")
    attempts_b = sorted(
        (s for s in collector.named("attempt tsvc.do") if s.attributes["taskflow.task"] == "b"),
        key=lambda s: s.attributes["taskflow.attempt"],
    )
    assert [s.attributes["taskflow.status"] for s in attempts_b] == ["FAILED", "SUCCEEDED"]
    assert {s.parent for s in attempts_b} == {task_b.span_id}
    assert task_b.start <= attempts_b[0].start < attempts_b[1].start <= task_b.end
    # c was sent by the first process and ended in the second: still one attempt, one task.
    [attempt_c] = [
        s for s in collector.named("attempt tsvc.do") if s.attributes["taskflow.task"] == "c"
    ]
    assert attempt_c.span_id == tracing.attempt_span_id(uid, "s2", "c", 0)
    # The nested flow: its flow span under the parent's attempt, its stage under it.
    [child] = [s for s in collector.named("taskflow") if s is not root]
    assert child.parent == tracing.attempt_span_id(uid, "s3", "nested", 0)
    assert by_id[child.parent].name == "attempt child taskflow"
    [inner] = collector.named("stage inner")
    assert inner.parent == child.span_id
    # The service's spans: each under the attempt span the operator exported.
    served = exporter.get_finished_spans()
    assert len(served) == 5  # a, b twice, c, leaf
    for span in served:
        assert span.parent is not None
        parent = by_id[f"{span.parent.span_id:016x}"]
        assert parent.name == "attempt tsvc.do"
        assert parent.attributes["taskflow.task"] == span.attributes["taskflow.task"]
        assert f"{span.context.trace_id:032x}" == trace_id


def action(name: str) -> dict[str, Any]:
    return {
        "name": name,
        "params": {"task": name},
        "taskDetails": {"serviceId": "tsvc", "actionName": "do"},
    }


# -- metrics per service ------------------------------------------------------------------------


def scrape(operator: OperatorProcess) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = (
        urllib.request.urlopen(f"http://127.0.0.1:{operator.metrics_port}/metrics", timeout=5)
        .read()
        .decode()
    )
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def test_metrics_by_service_and_action(
    operator: OperatorProcess, flows: Flows, nc: Any, svc: str
) -> None:
    """do: succeeds; fail: the service's failure; hang: never answered (times out)."""
    await serve(nc, f"{svc}.do", delay=0.05)
    await serve(nc, f"{svc}.fail", lambda msg: {"success": False, "error": {"message": "no"}})
    await serve(nc, f"{svc}.hang", lambda msg: None)
    spec = {
        "options": {"continueOnTaskFailure": True, "timeout": "1s"},
        "stages": [
            {
                "name": "s1",
                "tasks": [
                    {"name": name, "taskDetails": {"serviceId": svc, "actionName": action_name}}
                    for name, action_name in (("ok", "do"), ("bad", "fail"), ("lost", "hang"))
                ],
            }
        ],
    }
    done = await flows.wait((await flows.create(spec))["metadata"]["name"])
    assert done["status"]["phase"] == "COMPLETED_WITH_FAILURES"
    got = scrape(operator)

    def value(name: str, action: str, **labels: str) -> float:
        key = tuple(sorted({"service": svc, "action": action, **labels}.items()))
        return got.get((name, key), 0.0)

    for action_name in ("do", "fail", "hang"):
        assert value("taskflow_service_dispatches_total", action_name) == 1
    assert value("taskflow_service_attempts_total", "do", status="SUCCEEDED") == 1
    assert value("taskflow_service_attempts_total", "fail", status="FAILED") == 1
    assert value("taskflow_service_attempts_total", "hang", status="TIMED_OUT") == 1
    assert value("taskflow_service_failures_total", "fail", reason="Service") == 1
    assert value("taskflow_service_failures_total", "hang", reason="Timeout") == 1
    assert value("taskflow_service_failures_total", "do", reason="Service") == 0
    # Latency of what the service answered: do's (>= its 50 ms) and fail's, not the timeout.
    assert value("taskflow_service_reply_seconds_count", "do") == 1
    assert value("taskflow_service_reply_seconds_sum", "do") >= 0.05
    assert value("taskflow_service_reply_seconds_bucket", "do", le="0.025") == 0
    assert value("taskflow_service_reply_seconds_count", "fail") == 1
    assert value("taskflow_service_reply_seconds_count", "hang") == 0
