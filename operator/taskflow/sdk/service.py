"""``Service``: one instance of a NATS service that serves Taskflow tasks (the Services API
underneath), its handlers run concurrently, redeliveries answered once, cancel notices obeyed,
child flows started for a task, and each handler in a span of the operator's trace."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from taskflow.client import DEFAULT_NATS_URL, TaskflowClient
from taskflow.client.services import CAPACITY, IDEMPOTENT
from taskflow.sdk.context import Nested, TaskContext, TaskFailure, now_ms
from taskflow.wire.api import FlowRequest, ParentRef, ProduceRequest
from taskflow.wire.cancel import Notice
from taskflow.wire.context import IDEMPOTENCY_HEADER
from taskflow.wire.request import RequestHeaders
from taskflow.wire.subjects import DEFAULT_TEMPLATE, Subjects

log = logging.getLogger("taskflow.sdk")

ActionHandler = Callable[[Any, "TaskContext"], Awaitable[Any]]
# How many finished replies are kept to answer a redelivered attempt the same way.
REPLY_CACHE_SIZE = 1000
# The ServiceAccount token the kubelet mounts into a pod.
POD_TOKEN = "/var/run/secrets/kubernetes.io/serviceaccount/token"
# How long a cancelled attempt's key is remembered (a notice may overtake its request).
CANCEL_MEMORY_S = 600.0


@dataclass
class Counters:
    """What an instance did; also readable as ``service.counters``."""

    handled: int = 0
    succeeded: int = 0
    failed: int = 0
    dropped_expired: int = 0
    dropped_cancelled: int = 0
    cancelled: int = 0
    duplicates: int = 0


@dataclass(frozen=True)
class _Action:
    name: str
    subject: str
    handler: ActionHandler


class Service:
    """A NATS service whose actions serve Taskflow tasks.

    ``client``: a ``TaskflowClient`` that can reach Kubernetes, used by ``ctx.start_child``;
    without one, children are started through the operator's NATS API
    (``taskflow.api.produce``), so the service needs no Kubernetes credentials.
    ``queue_group`` defaults to the service id, like a plain ``nats.subscribe(..., queue=id)``
    service, so instances of either kind share the work.
    """

    def __init__(
        self,
        service_id: str,
        *,
        version: str = "1.0.0",
        description: str | None = None,
        nats_url: str | None = None,
        nc: Any = None,
        client: TaskflowClient | None = None,
        queue_group: str | None = None,
        subject_template: str = DEFAULT_TEMPLATE,
        subjects: Subjects | None = None,
        max_concurrency: int | None = None,
        max_children_per_task: int = 100,
        request_timeout: float = 10.0,
        api_token: str | None = None,
        tracer_provider: Any = None,
    ) -> None:
        self.service_id = service_id
        # Handler spans (with OpenTelemetry installed): this provider's, else the global one's.
        self.tracer_provider = tracer_provider
        self._tracer: Any = None
        self.api_token = api_token
        self.version = version
        self.description = description or f"taskflow service {service_id}"
        self.nats_url = nats_url or os.environ.get("NATS_URL") or DEFAULT_NATS_URL
        self.nc: Any = nc
        self._own_nc = nc is None
        self.client = client
        self.queue_group = queue_group or service_id
        self.subjects = subjects or Subjects(template=subject_template)
        self.request_timeout = request_timeout
        # The operator fails a reply naming more children than this (its default limit).
        self.max_children_per_task = max_children_per_task
        self.actions: dict[str, _Action] = {}
        self.counters = Counters()
        self.max_concurrency = max_concurrency
        self._limit = asyncio.Semaphore(max_concurrency) if max_concurrency else None
        self._micro: Any = None
        self._cancel_sub: Any = None
        self._running: dict[str, asyncio.Task[None]] = {}
        self._cancel_requested: set[str] = set()
        self._cancelled: OrderedDict[str, float] = OrderedDict()
        self._replies: OrderedDict[str, bytes] = OrderedDict()
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping = False

    # -- declaring actions -------------------------------------------------------------------

    def action(
        self, name: str, *, subject: str | None = None
    ) -> Callable[[ActionHandler], ActionHandler]:
        """Register ``async def handler(params, ctx) -> data`` for an action."""
        if name in self.actions:
            raise ValueError(f"action {name!r} is already registered")

        def register(handler: ActionHandler) -> ActionHandler:
            self.actions[name] = _Action(
                name=name,
                subject=subject or self.subjects.request(self.service_id, name),
                handler=handler,
            )
            return handler

        return register

    # -- running -----------------------------------------------------------------------------

    async def start(self) -> Service:
        from nats.micro import add_service

        if self.nc is None:
            import nats

            self.nc = await nats.connect(
                self.nats_url, name=f"taskflow-sdk-{self.service_id}", max_reconnect_attempts=-1
            )
            self._own_nc = True
        if self.client is not None and not self.client.has_nats:
            self.client.use_nats(self.nc)  # finds a parent flow from its events, cheaply
        self._micro = await add_service(
            self.nc,
            name=self.service_id,
            version=self.version,
            description=self.description,
            queue_group=self.queue_group,
            metadata=self._metadata(),
        )
        for action in self.actions.values():
            await self._micro.add_endpoint(
                name=action.name,
                subject=action.subject,
                handler=self._endpoint(action),
                queue_group=self.queue_group,
            )
        # Every instance hears every cancel notice: only the one serving the attempt acts.
        self._cancel_sub = await self.nc.subscribe(
            self.subjects.cancel(self.service_id), cb=self._on_cancel
        )
        await self.nc.flush()
        log.info(
            "service %s serving %s",
            self.service_id,
            ", ".join(a.subject for a in self.actions.values()),
        )
        return self

    def _metadata(self) -> dict[str, str]:
        """What the Services API says of every instance (strings, as its metadata is)."""
        # A repeated attempt is answered from the reply cache without running again, so
        # the operator may re-ask an attempt whose reply NATS lost.
        metadata = {"taskflow.dev/sdk": "python", IDEMPOTENT: "true"}
        if self.max_concurrency:
            # How many requests this instance serves at once, for whoever spreads the work.
            metadata[CAPACITY] = str(self.max_concurrency)
        return metadata

    async def stop(self, grace: float = 10.0) -> None:
        """Stop taking requests, let running handlers finish for ``grace`` seconds, then
        cancel them (their attempts time out in the operator and are retried if allowed)."""
        self._stopping = True
        if self._micro is not None:
            with contextlib.suppress(Exception):
                await self._micro.stop()
            self._micro = None
        if self._cancel_sub is not None:
            with contextlib.suppress(Exception):
                await self._cancel_sub.unsubscribe()
            self._cancel_sub = None
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=grace)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=5)
        if self._own_nc and self.nc is not None and not self.nc.is_closed:
            with contextlib.suppress(Exception):
                await self.nc.drain()

    async def run(self) -> None:
        """Serve until SIGINT or SIGTERM."""
        await self.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, stop.set)
        try:
            await stop.wait()
        finally:
            await self.stop()

    async def __aenter__(self) -> Service:
        return await self.start()

    async def __aexit__(self, *_: object) -> None:
        await self.stop()

    # -- requests ----------------------------------------------------------------------------

    def _endpoint(self, action: _Action) -> Callable[[Any], Awaitable[None]]:
        async def handle(request: Any) -> None:
            # nats.micro calls this once per message, one at a time: hand each request to its
            # own task so handlers of one endpoint run concurrently.
            self._accept(action, request)

        return handle

    def _accept(self, action: _Action, request: Any) -> None:
        headers: dict[str, str] = dict(request.headers or {})
        key = headers.get(IDEMPOTENCY_HEADER)
        if self._expired(headers):
            self.counters.dropped_expired += 1
            log.info("%s: dropped %s, its maxAge passed", action.subject, key or "a request")
            return
        if key and key in self._cancelled:
            self.counters.dropped_cancelled += 1
            log.info("%s: dropped %s, it was cancelled", action.subject, key)
            return
        if key and key in self._running:
            self.counters.duplicates += 1
            return  # a redelivery of an attempt still running: its reply will come
        if key and key in self._replies:
            self.counters.duplicates += 1
            self._spawn(self._respond(request, self._replies[key]))
            return
        task = self._spawn(self._serve(action, request, headers, key))
        if key:
            self._running[key] = task
            task.add_done_callback(lambda _: self._running.pop(key, None))

    def _spawn(self, coro: Awaitable[None]) -> asyncio.Task[None]:
        async def run() -> None:
            await coro

        task = asyncio.get_running_loop().create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    @staticmethod
    def _expired(headers: Mapping[str, str]) -> bool:
        expires = RequestHeaders.decode(headers).expires_at
        return expires is not None and now_ms() >= expires

    async def _serve(
        self, action: _Action, request: Any, headers: dict[str, str], key: str | None
    ) -> None:
        if self._limit is not None:
            async with self._limit:
                await self._serve_now(action, request, headers, key)
        else:
            await self._serve_now(action, request, headers, key)

    async def _serve_now(
        self, action: _Action, request: Any, headers: dict[str, str], key: str | None
    ) -> None:
        if self._expired(headers):  # it waited for a free slot past its maxAge
            self.counters.dropped_expired += 1
            log.info("%s: dropped %s, its maxAge passed", action.subject, key or "a request")
            return
        self.counters.handled += 1
        ctx: TaskContext | None = None
        body: dict[str, Any] | None
        try:
            params = json.loads(request.data) if request.data else {}
        except (ValueError, UnicodeDecodeError) as exc:
            body = _failure(f"request body is not valid JSON: {exc}", "BAD_REQUEST")
        else:
            ctx = TaskContext.parse(request.subject, headers, params, service=self)
            body = await self._call(action, params, ctx, key)
        if body is None:
            return
        payload = _encode(body)
        if body.get("success"):
            self.counters.succeeded += 1
        else:
            self.counters.failed += 1
            if ctx is not None and ctx.children:
                await self._cancel_children(ctx.children)
        if key:
            self._replies[key] = payload
            while len(self._replies) > REPLY_CACHE_SIZE:
                self._replies.popitem(last=False)
        await self._respond(request, payload)

    async def _call(
        self, action: _Action, params: Any, ctx: TaskContext, key: str | None
    ) -> dict[str, Any] | None:
        try:
            with self._span(action, ctx):
                result = await action.handler(params, ctx)
        except asyncio.CancelledError:
            if key is None or key not in self._cancel_requested:
                raise  # the service is stopping
            self._cancel_requested.discard(key)
            current = asyncio.current_task()
            if current is not None:
                current.uncancel()
            self.counters.cancelled += 1
            log.info("%s: handler of %s cancelled", action.subject, key)
            return _failure("cancelled by a cancel notice", "CANCELLED")
        except TaskFailure as exc:
            return _failure(exc.message, exc.code, exc.data, retryable=exc.retryable)
        except Exception as exc:
            log.exception("%s: handler failed", action.subject)
            return _failure(str(exc) or repr(exc), type(exc).__name__)
        children = list(ctx.children)
        if isinstance(result, Nested):
            children += [c for c in result.children if c not in children]
            result = result.data
        body: dict[str, Any] = {"success": True, "data": result}
        if children:
            body["nestedTaskflows"] = children
        try:
            json.dumps(body)
        except (TypeError, ValueError) as exc:
            return _failure(f"the handler's result is not JSON: {exc}", "BAD_RESULT")
        return body

    @contextlib.contextmanager
    def _span(self, action: _Action, ctx: TaskContext) -> Iterator[None]:
        """The handler's span, a child of the attempt's (from ``traceparent``), as the current
        span while it runs; nothing without OpenTelemetry."""
        trace = _opentelemetry()
        if trace is None:
            yield
            return
        if self._tracer is None:
            provider = self.tracer_provider or trace.get_tracer_provider()
            self._tracer = provider.get_tracer("taskflow.sdk")
        parent = None
        if ctx.traceparent is not None:
            remote = trace.SpanContext(
                int(ctx.traceparent.trace_id, 16),
                int(ctx.traceparent.span_id, 16),
                is_remote=True,
                trace_flags=trace.TraceFlags(ctx.traceparent.flags & 0xFF),
            )
            parent = trace.set_span_in_context(trace.NonRecordingSpan(remote))
        attributes = {
            "taskflow.uid": ctx.taskflow_id,
            "taskflow.stage": ctx.stage,
            "taskflow.task": ctx.task_name,
            "taskflow.attempt": ctx.attempt,
            "taskflow.service": self.service_id,
            "taskflow.action": action.name,
            "messaging.system": "nats",
            "messaging.destination.name": ctx.subject,
        }
        with self._tracer.start_as_current_span(
            f"{self.service_id}.{action.name}",
            context=parent,
            kind=trace.SpanKind.SERVER,
            attributes={k: v for k, v in attributes.items() if v is not None},
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            error = trace.StatusCode.ERROR
            try:
                yield
            except TaskFailure as exc:
                span.set_status(trace.Status(error, exc.message[:256]))
                if exc.code:
                    span.set_attribute("taskflow.error.code", exc.code)
                raise
            except asyncio.CancelledError:
                span.set_status(trace.Status(error, "cancelled"))
                raise
            except Exception as exc:
                span.record_exception(exc)
                span.set_status(trace.Status(error, (str(exc) or repr(exc))[:256]))
                raise

    async def _respond(self, request: Any, payload: bytes) -> None:
        try:
            await request.respond(payload)
        except Exception as exc:
            log.warning("could not reply on %s: %s", request.subject, exc)

    # -- cancel notices ----------------------------------------------------------------------

    async def _on_cancel(self, msg: Any) -> None:
        notice = Notice.decode(msg.data)
        if notice is None:
            return
        key = notice.key
        now = time.monotonic()
        self._cancelled[key] = now
        while self._cancelled and next(iter(self._cancelled.values())) < now - CANCEL_MEMORY_S:
            self._cancelled.popitem(last=False)
        task = self._running.get(key)
        if task is not None and not task.done():
            self._cancel_requested.add(key)
            task.cancel()

    # -- child flows -------------------------------------------------------------------------

    async def start_child(
        self, ctx: TaskContext, spec: Mapping[str, Any] | BaseModel, *, name: str | None, index: int
    ) -> str:
        if ctx.taskflow_id is None or not ctx.raw:
            raise TaskFailure(
                "a child flow can only be started while serving a task", code="CHILD_REFUSED"
            )
        if self.client is not None:
            result = await self._start_child_kube(ctx, spec, name, index)
        else:
            result = await self._start_child_nats(ctx, spec, name, index)
        if not result.get("success"):
            message = (result.get("error") or {}).get("message") or "refused"
            raise TaskFailure(
                f"could not start a child taskflow: {message}",
                code="CHILD_REFUSED",
                data=result.get("error"),
            )
        ref = (result.get("data") or {}).get("ref")
        if not isinstance(ref, str):
            raise TaskFailure(
                "could not start a child taskflow: no reference came back", code="CHILD_REFUSED"
            )
        return ref

    async def _start_child_kube(
        self, ctx: TaskContext, spec: Mapping[str, Any] | BaseModel, name: str | None, index: int
    ) -> dict[str, Any]:
        from taskflow.client import TaskflowError

        assert self.client is not None
        try:
            link = await self.client.parent_link(ctx.raw, ctx.idempotency_key)
        except TaskflowError as exc:
            return exc.envelope()
        child = name or link.child_name(index)
        result = await self.client.produce(spec, name=child, parent=link)
        if result.get("success"):
            result["data"]["ref"] = f"{link.namespace}/{child}"
        return result

    async def _start_child_nats(
        self, ctx: TaskContext, spec: Mapping[str, Any] | BaseModel, name: str | None, index: int
    ) -> dict[str, Any]:
        if isinstance(spec, BaseModel):
            spec = spec.model_dump(by_alias=True, exclude_none=True, mode="json")
        request = ProduceRequest(
            schema=dict(spec),
            name=name,
            parent=ParentRef(context=ctx.raw, key=ctx.idempotency_key, index=index),
        )
        subject = f"{self.subjects.api_prefix}.produce"
        try:
            reply = await self.nc.request(
                subject,
                request.encode(),
                timeout=self.request_timeout,
                headers=self._api_headers(),
            )
            result: dict[str, Any] = json.loads(reply.data)
        except Exception as exc:
            return {
                "success": False,
                "error": {
                    "message": f"no answer from the operator's NATS API on {subject}: {exc}",
                    "code": "Unavailable",
                },
            }
        return result

    def _api_headers(self) -> dict[str, str]:
        """The NATS API authorizes each call by a Kubernetes bearer token: the service's own
        (``api_token=``, ``TASKFLOW_API_TOKEN``, or the token its pod has mounted)."""
        token = self.api_token or os.environ.get("TASKFLOW_API_TOKEN")
        if not token and os.path.exists(POD_TOKEN):
            with contextlib.suppress(OSError):
                token = Path(POD_TOKEN).read_text().strip()  # (re-read: kubelet rotates it)
        return {"Authorization": f"Bearer {token}"} if token else {}

    async def _cancel_children(self, children: Sequence[str]) -> None:
        """A handler that failed after starting children: cancel them (best effort)."""
        for ref in children:
            try:
                if self.client is not None:
                    await self.client.cancel(ref, wait=None)
                else:
                    await self.nc.request(
                        f"{self.subjects.api_prefix}.cancel",
                        FlowRequest(taskflow_id=ref, wait=None).encode(),
                        timeout=self.request_timeout,
                        headers=self._api_headers(),
                    )
            except Exception as exc:
                log.warning("could not cancel child %s: %s", ref, exc)


def _failure(
    message: str, code: str | None, data: Any = None, *, retryable: bool = True
) -> dict[str, Any]:
    error: dict[str, Any] = {"message": message, "code": code}
    if data is not None:
        error["data"] = data
    if not retryable:
        error["retryable"] = False
    return {"success": False, "error": error}


_otel: Any = None  # opentelemetry.trace once looked for; False: not installed


def _opentelemetry() -> Any:
    """``opentelemetry.trace``, imported on the first request (None when not installed)."""
    global _otel
    if _otel is None:
        try:
            from opentelemetry import trace
        except ImportError:
            _otel = False
        else:
            _otel = trace
    return _otel or None


def _encode(body: dict[str, Any]) -> bytes:
    return json.dumps(body, separators=(",", ":"), default=str).encode()
