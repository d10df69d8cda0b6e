"""What a service is told about the task it serves (``TaskContext``, read from the request's
headers by ``wire.request.RequestHeaders``), and what a handler returns or raises to say how
the task went (``Nested``, ``TaskFailure``)."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from taskflow.wire.request import RequestHeaders, TraceParent

if TYPE_CHECKING:
    from taskflow.sdk.service import Service


def now_ms() -> int:
    return int(time.time() * 1000)


class TaskFailure(Exception):
    """Raise in a handler to fail the task with this message and code.

    The reply is ``{"success": false, "error": {"message", "code"[, "data"]}}``, recorded in
    the task's ``status.error``; the attempt is retried if ``maxRetries`` allows, unless
    ``retryable=False`` (``"retryable": false`` in the reply: no retry can help, e.g. a
    malformed request), which fails the task at once.
    """

    def __init__(
        self, message: str, code: str | None = None, data: Any = None, *, retryable: bool = True
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.data = data
        self.retryable = retryable


@dataclass
class Nested:
    """Return this from a handler to name child flows the reply should carry in
    ``nestedTaskflows`` ("namespace/name"); children started with ``ctx.start_child`` are
    added by the SDK on its own."""

    data: Any = None
    children: Sequence[str] = ()


@dataclass
class TaskContext:
    """What the operator told the service about the task it serves (from the headers).

    Fields are None when a request did not come from the operator (no context header).
    """

    taskflow_id: str | None
    stage_id: str | None
    stage: str | None  # the stage's name
    task_id: str | None
    task_name: str | None
    task_type: str | None
    attempt: int
    idempotency_key: str | None
    params: Any
    options: dict[str, Any]
    previous_stage_responses: list[dict[str, Any]]
    parent_context: dict[str, Any] | None  # taskInfo.meta.taskflowExecutionContext
    meta: dict[str, Any]
    created_at: int | None  # epoch ms
    deadline: int | None  # epoch ms at which this attempt times out
    expires_at: int | None  # epoch ms after which no attempt may start (maxAge)
    subject: str
    headers: dict[str, str]
    raw: dict[str, Any]  # the header's JSON, exactly as sent (the seed's shape)
    children: list[str] = field(default_factory=list)
    service: Service | None = field(default=None, repr=False, compare=False)
    # The attempt's span in the flow's trace (W3C ``traceparent``), None when not sent.
    traceparent: TraceParent | None = None

    @classmethod
    def parse(
        cls,
        subject: str,
        headers: Mapping[str, str] | None,
        params: Any,
        service: Service | None = None,
    ) -> TaskContext:
        headers = dict(headers or {})
        sent = RequestHeaders.decode(headers)
        context, key = sent.context, sent.attempt_key
        attempt = context.attempt
        return cls(
            taskflow_id=context.taskflow_id or (key.uid if key else None),
            stage_id=context.stage_id,
            stage=key.stage if key else None,
            task_id=context.task_id,
            task_name=context.task_name or (key.task if key else None),
            task_type=context.task_type,
            attempt=attempt if attempt is not None else (key.attempt if key else 0),
            idempotency_key=sent.key,
            params=params,
            options=context.options,
            previous_stage_responses=context.previous_stage_responses,
            parent_context=context.parent,
            meta=context.meta,
            created_at=context.created_at,
            deadline=sent.deadline,
            expires_at=sent.expires_at,
            subject=subject,
            headers=headers,
            raw=context.raw,
            service=service,
            traceparent=sent.traceparent,
        )

    def previous_response(self, task_name: str) -> Any:
        """The data a task of the previous stage replied with (None if it had none)."""
        for item in self.previous_stage_responses:
            if item.get("taskName") == task_name:
                response = item.get("response")
                return response.get("data") if isinstance(response, dict) else response
        return None

    async def heartbeat(self, progress: Any = None) -> bool:
        """Tell the operator this attempt is alive (with ``heartbeatTimeout``, it times out
        without one), with any JSON ``progress`` (up to 4 KiB), kept on the task and published
        as a TASK event. False when the request asked for none (no heartbeat header)."""
        subject = RequestHeaders.decode(self.headers).heartbeat
        if not subject or self.service is None or self.service.nc is None:
            return False
        body = b"" if progress is None else json.dumps({"progress": progress}).encode()
        await self.service.nc.publish(subject, body)
        return True

    def time_left(self) -> float | None:
        """Seconds until this attempt times out (None when the request carried no deadline)."""
        return None if self.deadline is None else max(0.0, (self.deadline - now_ms()) / 1000)

    async def start_child(
        self, spec: Mapping[str, Any] | BaseModel, *, name: str | None = None
    ) -> str:
        """Start a child Taskflow linked to the task being served; returns "namespace/name".

        The child gets the parent-uid label, the parent-task/attempt/context/depth annotations
        and an ownerReference, as an inline nested flow does, so its tasks see this task's
        context in ``meta`` and the task finishes only when the child does. The name is
        derived from the attempt unless given, so a redelivered request does not start a
        second child. Raises ``TaskFailure`` (code ``CHILD_REFUSED``) when refused.
        """
        if self.service is None:
            raise TaskFailure("this context belongs to no service", code="CHILD_REFUSED")
        limit = self.service.max_children_per_task
        if len(self.children) >= limit:
            raise TaskFailure(f"a task may start at most {limit} child flows", code="CHILD_LIMIT")
        ref = await self.service.start_child(self, spec, name=name, index=len(self.children))
        self.children.append(ref)
        return ref
