"""Performing a decision's effects: dispatches, events (the outbox), cancel notices, Kubernetes
Events and child flows. One kind of side effect per method; each effect on its own, so one
that fails never stops the others. A mixin of ``FlowRunner``, whose state it reads.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from typing import TYPE_CHECKING, Any

from taskflow.api.names import API_VERSION
from taskflow.api.spec import TaskflowSpec, TaskType
from taskflow.api.status import ErrorReason, Status, TaskError, TaskflowStatus
from taskflow.engine import (
    Ask,
    CancelChild,
    CancelNotice,
    ChildFinished,
    CreateChild,
    Decision,
    Dispatch,
    Effect,
    Emit,
    Input,
    NoResponders,
    Record,
    Reply,
    Throttled,
    effective_options,
    parse_iso,
)
from taskflow.kube import Conflict, Gone
from taskflow.shell import metrics, tracing
from taskflow.shell.tenants import Link, LinkDown
from taskflow.wire.cancel import Notice
from taskflow.wire.context import IDEMPOTENCY_HEADER, execution_context
from taskflow.wire.links import (
    DEPTH,
    PARENT_ATTEMPT,
    PARENT_CONTEXT,
    PARENT_NAME,
    PARENT_TASK,
    PARENT_UID,
    child_input,
    child_name,
    parent_context,
)
from taskflow.wire.request import AttemptKey, ExecutionContext, RequestHeaders

if TYPE_CHECKING:
    from taskflow.kube import Kube
    from taskflow.shell.bus import Bus
    from taskflow.shell.registry import Registry
    from taskflow.shell.settings import RunnerSettings


class Effects:
    """The effects half of a flow's writer (``runner.FlowRunner`` holds the state)."""

    uid: str
    name: str
    namespace: str
    body: dict[str, Any]
    bus: Bus
    kube: Kube
    registry: Registry
    settings: RunnerSettings
    log: logging.LoggerAdapter[logging.Logger]
    sent_at: dict[tuple[str, str, int], float]
    outbox: list[tuple[int, bytes]]

    if TYPE_CHECKING:  # provided by runner.FlowRunner and its other parts

        @property
        def status(self) -> TaskflowStatus: ...
        def spec(self) -> TaskflowSpec: ...
        def push(self, item: Input) -> None: ...

    @property
    def link(self) -> Link:
        """The NATS connection of this flow's namespace (its tenant's, or the operator's)."""
        return self.registry.link(self.namespace)

    async def perform(self, decision: Decision) -> None:
        """Each effect on its own: one that fails is logged and counted, and the rest still
        happen (the decision is recorded; a dispatch that did not leave times out as any lost
        message does)."""
        for effect in decision.effects:
            try:
                await self.perform_one(effect)
            except Exception as exc:
                metrics.EFFECT_FAILURES.labels(effect=type(effect).__name__).inc()
                self.log.warning("%s failed: %s", type(effect).__name__, exc)
        await self.publish_outbox()

    async def perform_one(self, effect: Effect) -> None:
        if isinstance(effect, Dispatch):
            await self.dispatch(self.spec(), effect)
        elif isinstance(effect, Emit):
            self.count(effect)  # (published from the outbox, after the other effects)
        elif isinstance(effect, Record):
            self.registry.spawn(
                self.kube.event(
                    self.body, reason=effect.reason, message=effect.message, type_=effect.type
                )
            )
        elif isinstance(effect, CancelNotice):
            await self.cancel_notice(effect)
        elif isinstance(effect, CreateChild):
            self.registry.spawn(self.create_child(self.spec(), effect))
        elif isinstance(effect, CancelChild):
            namespace, _, name = effect.child.partition("/")
            self.registry.spawn(self.cancel_child(namespace, name))

    def parent_context(self) -> dict[str, Any] | None:
        return parent_context(self.body["metadata"])

    def context_for(self, spec: TaskflowSpec, stage_name: str, task_name: str) -> dict[str, Any]:
        index = next(i for i, s in enumerate(self.status.stages) if s.name == stage_name)
        state = next(t for t in self.status.stages[index].tasks if t.name == task_name)
        task = spec.task(stage_name, task_name)
        assert task is not None
        return execution_context(
            uid=self.uid,
            status=self.status,
            stage_index=index,
            task=task,
            state=state,
            options=effective_options(spec.options, task.options),
            parent_context=self.parent_context(),
        )

    async def dispatch(self, spec: TaskflowSpec, effect: Dispatch) -> None:
        stage_index = next(i for i, s in enumerate(spec.stages) if s.name == effect.stage)
        task = spec.task(effect.stage, effect.task)
        assert task is not None
        state = next(t for t in self.status.stages[stage_index].tasks if t.name == effect.task)
        assert task.task_details is not None
        subjects = self.settings.subjects
        key = AttemptKey(self.uid, effect.stage, effect.task, effect.attempt).encode()
        headers = RequestHeaders(
            context=ExecutionContext(self.context_for(spec, effect.stage, effect.task)),
            key=key,
            deadline=parse_iso(state.deadline) if state.deadline else None,
            expires_at=parse_iso(state.expires_at) if state.deadline and state.expires_at else None,
            # (only with heartbeatTimeout)
            heartbeat=(
                subjects.heartbeat(self.uid, effect.stage, effect.task, effect.attempt)
                if state.heartbeat_deadline
                else None
            ),
            traceparent=tracing.traceparent(self, effect.stage, effect.task, effect.attempt),
        ).encode()
        slots = self.registry.slots
        if slots is not None:
            ask = Ask(
                holder=key,
                key=effect.slot,
                limit=effect.slot_limit,
                service_id=task.task_details.service_id,
                action_name=task.task_details.action_name,
            )
            gates = self.registry.gates(self.namespace, ask)
            if gates and not await slots.acquire(gates, key):
                # Taken by another flow meanwhile: wait for a slot again (nothing was sent).
                self.push(Throttled(stage=effect.stage, task=effect.task, attempt=effect.attempt))
                return
        self.sent_at[(effect.stage, effect.task, effect.attempt)] = time.monotonic()
        metrics.dispatched(task.task_details.service_id, task.task_details.action_name)
        try:
            await self.link.dispatch(
                subject=subjects.request(
                    task.task_details.service_id, task.task_details.action_name, self.namespace
                ),
                reply=subjects.reply(self.uid, effect.stage, effect.task, effect.attempt),
                # The params as the engine resolved them for this attempt, if they hold
                # expressions; else the spec's.
                body=json.dumps(
                    state.params if state.params is not None else task.params or {}
                ).encode(),
                headers=headers,
            )
        except LinkDown as exc:
            # The namespace's NATS user is not connected: wait as for no responders (sent
            # again every few seconds until it is, or until the attempt times out).
            if not getattr(self, "_link_down", False):  # once per writer: it repeats
                self._link_down = True
                self.log.warning("not dispatched (sent again until the attempt times out): %s", exc)
            self.push(NoResponders(stage=effect.stage, task=effect.task, attempt=effect.attempt))

    def count(self, effect: Emit) -> None:
        slots = self.registry.slots
        if effect.kind == "TASK" and effect.status != "RUNNING" and slots is not None:
            holder = AttemptKey(
                self.uid, effect.stage or "", effect.task or "", effect.attempt or 0
            ).encode()
            if slots.holds(holder):  # (most tasks have no concurrency key: nothing to do)
                self.registry.spawn(slots.release(holder))
        if effect.kind == "TASK" and effect.status not in ("RUNNING",):
            metrics.TASKS_FINISHED.labels(status=effect.status).inc()
            key = (effect.stage or "", effect.task or "", effect.attempt or 0)
            sent = self.sent_at.pop(key, None)
            if sent is not None:
                metrics.REPLY_LATENCY.observe(time.monotonic() - sent)
            metrics.task_ended(self.spec(), effect, sent=sent)
        tracing.ended(self, effect)  # (its span, when tracing is configured)

    async def publish_outbox(self) -> None:
        """Publish the events not yet acknowledged by the event stream, in order. Those that
        are not stay in the outbox (and in the next journal entry) for the next round."""
        if not self.outbox:
            return
        events, self.outbox = self.outbox, []
        stored = await self.link.publish_events(
            self.settings.subjects.events(self.uid), self.uid, events
        )
        missed = [e for e in events if e[0] not in stored]
        if missed:
            metrics.EFFECT_FAILURES.labels(effect="Emit").inc(len(missed))
            self.log.warning(
                "%d events not acknowledged by the event stream; trying again", len(missed)
            )
            self.outbox[:0] = missed

    async def cancel_notice(self, effect: CancelNotice) -> None:
        task = self.spec().task(effect.stage, effect.task)
        if task is None or task.type != TaskType.ACTION or task.task_details is None:
            return
        notice = Notice(
            key=AttemptKey(self.uid, effect.stage, effect.task, effect.attempt).encode(),
            taskflow_id=self.uid,
            stage=effect.stage,
            task=effect.task,
            attempt=effect.attempt,
            service_id=task.task_details.service_id,
            action_name=task.task_details.action_name,
        )
        await self.link.publish(
            self.settings.subjects.cancel(task.task_details.service_id),
            notice.encode(),
            headers={IDEMPOTENCY_HEADER: notice.key},
        )

    # -- nested flows ------------------------------------------------------------------------

    async def create_child(self, spec: TaskflowSpec, effect: CreateChild) -> None:
        task = spec.task(effect.stage, effect.task)
        assert task is not None
        annotations = self.body["metadata"].get("annotations") or {}
        depth = int(annotations.get(DEPTH, "0")) + 1
        name = child_name(self.name, effect.stage, effect.task, effect.attempt)
        if depth > self.settings.max_depth:
            self.push(
                Reply(
                    stage=effect.stage,
                    task=effect.task,
                    attempt=effect.attempt,
                    ok=False,
                    error=child_error(
                        f"nesting depth {depth} exceeds the limit of {self.settings.max_depth}"
                    ),
                )
            )
            return
        context = self.context_for(spec, effect.stage, effect.task)
        body = {
            "apiVersion": API_VERSION,
            "kind": "Taskflow",
            "metadata": {
                "name": name,
                "namespace": self.namespace,
                "labels": {
                    PARENT_UID: self.uid,
                    PARENT_NAME: self.name[:63],
                },
                "annotations": {
                    PARENT_TASK: f"{effect.stage}.{effect.task}",
                    PARENT_ATTEMPT: str(effect.attempt),
                    DEPTH: str(depth),
                    PARENT_CONTEXT: json.dumps(context, separators=(",", ":")),
                },
                "ownerReferences": [
                    {
                        "apiVersion": API_VERSION,
                        "kind": "Taskflow",
                        "name": self.name,
                        "uid": self.uid,
                        "controller": True,
                        "blockOwnerDeletion": True,
                    }
                ],
            },
            "spec": task.taskflow or {},
        }
        try:
            created = await self.kube.create(self.namespace, body)
        except Conflict:
            created = await self.kube.get(self.namespace, name)  # made before a restart
        except Exception as exc:
            self.push(
                Reply(
                    stage=effect.stage,
                    task=effect.task,
                    attempt=effect.attempt,
                    ok=False,
                    error=child_error(f"child taskflow refused: {describe(exc, typed=False)}"),
                )
            )
            return
        ref = f"{self.namespace}/{created['metadata']['name']}"
        self.push(
            ChildFinished(
                stage=effect.stage,
                task=effect.task,
                child=ref,
                status=Status.RUNNING,
                attempt=effect.attempt,
            )
        )
        item = child_input(created)
        if item is not None:
            self.push(item)

    async def cancel_child(self, namespace: str, name: str) -> None:
        with contextlib.suppress(Gone):
            await self.kube.patch(namespace, name, {"spec": {"cancel": True}})


def describe(exc: BaseException, *, typed: bool = True) -> str:
    """An error in one line: the API server's own message when it sent one (not the whole
    HTTP exchange the Kubernetes client puts in ``str()``)."""
    text = str(exc)
    body = getattr(exc, "body", None)
    if body:
        text = body.decode(errors="replace") if isinstance(body, bytes) else str(body)
        with contextlib.suppress(ValueError, TypeError, AttributeError):
            text = str(json.loads(text).get("message", text))
        status = getattr(exc, "status", None)
        text = f"{status} {text}" if status else text
    return f"{type(exc).__name__}: {text}" if typed else text


def child_error(message: str) -> TaskError:
    return TaskError(message=message[:4096], reason=ErrorReason.CHILD)
