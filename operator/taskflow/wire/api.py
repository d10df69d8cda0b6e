"""The requests of the operator's NATS API (``taskflow.api.<verb>``), encoded and decoded here.

A caller (the SDK, or any NATS client) sends a JSON object; the operator decodes it into one of
these shapes before acting, and a request that is not one is refused with ``BadRequest`` and a
message naming the field. The answers are the client's envelope (``taskflow.client``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

Verb = Literal["produce", "details", "cancel", "retry", "suspend", "resume", "history"]
VERBS: tuple[Verb, ...] = ("produce", "details", "cancel", "retry", "suspend", "resume", "history")
# How long ``wait: true`` waits for the operator to act on a cancel or retry; the most any
# request may ask for.
DEFAULT_WAIT_S = 10.0
MAX_WAIT_S = 30.0


class BadRequest(ValueError):
    """The request is not of its verb's shape; the message names what is wrong."""


def decode_object(data: bytes) -> dict[str, Any]:
    """The request's JSON object (an empty body is ``{}``)."""
    try:
        value = json.loads(data or b"{}")
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise BadRequest(f"the request is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise BadRequest("the request is a JSON object")
    return value


def _encode(body: Mapping[str, Any]) -> bytes:
    return json.dumps({k: v for k, v in body.items() if v is not None}).encode()


def _optional_text(request: Mapping[str, Any], name: str) -> str | None:
    value = request.get(name)
    if value is not None and not isinstance(value, str):
        raise BadRequest(f'"{name}" is a string')
    return value


def _wait(request: Mapping[str, Any]) -> float | None:
    wait = request.get("wait", True)
    if wait is False or wait is None:
        return None
    if wait is True:
        return DEFAULT_WAIT_S
    try:
        return min(MAX_WAIT_S, max(0.0, float(wait)))
    except (TypeError, ValueError):
        raise BadRequest('"wait" is a boolean or a number of seconds') from None


@dataclass(frozen=True, slots=True)
class ParentRef:
    """What a service received with the task that starts a child flow."""

    context: dict[str, Any]  # the taskflowExecutionContext header's JSON
    key: str | None = None  # its Taskflow-Idempotency-Key
    index: int = 0  # which of the task's children this is (names it)


@dataclass(frozen=True, slots=True)
class ProduceRequest:
    """``produce``: a flow in ``namespace`` from the seed's schema, or a child of ``parent``'s
    task (in the parent's namespace)."""

    schema: dict[str, Any]
    namespace: str | None = None
    name: str | None = None
    parent: ParentRef | None = None

    def encode(self) -> bytes:
        parent = None
        if self.parent is not None:
            parent = {
                "taskflowExecutionContext": self.parent.context,
                "idempotencyKey": self.parent.key,
                "index": self.parent.index,
            }
        return _encode(
            {
                "schema": self.schema,
                "namespace": self.namespace,
                "name": self.name,
                "parent": parent,
            }
        )

    @classmethod
    def decode(cls, request: Mapping[str, Any]) -> ProduceRequest:
        schema = request.get("schema", request.get("spec", request.get("taskflow")))
        if not isinstance(schema, dict):
            raise BadRequest('"schema" (the TaskFlowSchema object) is required')
        name = _optional_text(request, "name")
        parent = request.get("parent")
        if parent is not None:
            if not isinstance(parent, dict):
                raise BadRequest('"parent" is an object')
            context = parent.get("taskflowExecutionContext")
            if not isinstance(context, dict):
                raise BadRequest('"parent.taskflowExecutionContext" is required')
            key, index = parent.get("idempotencyKey"), parent.get("index", 0)
            ref = ParentRef(
                context=context,
                key=key if isinstance(key, str) else None,
                index=index if isinstance(index, int) and not isinstance(index, bool) else 0,
            )
            return cls(schema=schema, name=name, parent=ref)
        namespace = request.get("namespace")
        if not isinstance(namespace, str) or not namespace:
            raise BadRequest('"namespace" is required')
        return cls(schema=schema, namespace=namespace, name=name)


@dataclass(frozen=True, slots=True)
class FlowRequest:
    """``details``, ``cancel``, ``suspend``, ``resume``: one flow, by uid or ``namespace/name``
    (a bare name with ``namespace``); ``wait``: seconds to wait for the operator (cancel)."""

    taskflow_id: str
    wait: float | None = DEFAULT_WAIT_S

    def encode(self) -> bytes:
        return _encode({"taskflowId": self.taskflow_id, "wait": self.wait or False})

    @classmethod
    def decode(cls, request: Mapping[str, Any]) -> FlowRequest:
        ident = request.get("taskflowId") or request.get("id")
        if not isinstance(ident, str) or not ident.strip():
            raise BadRequest('"taskflowId" (a uid or "namespace/name") is required')
        if "/" not in ident and isinstance(request.get("namespace"), str):
            ident = f"{request['namespace']}/{ident}"
        return cls(taskflow_id=ident, wait=_wait(request))


@dataclass(frozen=True, slots=True)
class RetryRequest:
    """``retry``: the seed's selection (``stages``/``stagesInfo``, ``tasks``/``tasksInfo``)."""

    flow: FlowRequest
    stages: list[Any] | None = None
    tasks: list[Any] | None = None
    failed_only: bool = False

    def encode(self) -> bytes:
        return _encode(
            {
                "taskflowId": self.flow.taskflow_id,
                "wait": self.flow.wait or False,
                "stages": self.stages,
                "tasks": self.tasks,
                "failedOnly": self.failed_only,
            }
        )

    @classmethod
    def decode(cls, request: Mapping[str, Any]) -> RetryRequest:
        stages = request.get("stages", request.get("stagesInfo"))
        tasks = request.get("tasks", request.get("tasksInfo"))
        for value, what in ((stages, "stages"), (tasks, "tasks")):
            if value is not None and not isinstance(value, list):
                raise BadRequest(f'"{what}" is a list')
        return cls(
            flow=FlowRequest.decode(request),
            stages=stages,
            tasks=tasks,
            failed_only=bool(request.get("failedOnly", False)),
        )


@dataclass(frozen=True, slots=True)
class HistoryRequest:
    """``history``: flows of ``namespace`` deleted after their TTL, optionally filtered."""

    namespace: str
    phase: str | None = None
    service: str | None = None
    since_ms: int | None = None

    def encode(self) -> bytes:
        return _encode(
            {
                "namespace": self.namespace,
                "phase": self.phase,
                "service": self.service,
                "sinceMs": self.since_ms,
            }
        )

    @classmethod
    def decode(cls, request: Mapping[str, Any]) -> HistoryRequest:
        namespace = request.get("namespace")
        if not isinstance(namespace, str) or not namespace:
            raise BadRequest('"namespace" is required')
        phase, service, since = (request.get(k) for k in ("phase", "service", "sinceMs"))
        return cls(
            namespace=namespace,
            phase=phase if isinstance(phase, str) else None,
            service=service if isinstance(service, str) else None,
            since_ms=since if isinstance(since, int) and not isinstance(since, bool) else None,
        )


__all__ = [
    "VERBS",
    "BadRequest",
    "FlowRequest",
    "HistoryRequest",
    "ParentRef",
    "ProduceRequest",
    "RetryRequest",
    "Verb",
    "decode_object",
]
