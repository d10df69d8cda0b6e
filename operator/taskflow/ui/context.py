"""What the operator sends for a task, rebuilt from the flow's object for the task panel.

The request body is the params as sent (``status.params`` when the spec's hold expressions,
else the spec's); the headers are built as the operator's dispatch builds them
(``wire.context.execution_context`` in ``wire.request.RequestHeaders``), from the spec and the
status as they are now: for the current attempt they are the headers that were sent, give or
take the task's own status field (filled in at dispatch time). The heartbeat subject is left
out: it is signed for the service alone.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from taskflow.api.spec import TaskflowSpec
from taskflow.api.status import TaskflowStatus
from taskflow.engine.clock import parse_iso
from taskflow.engine.options import effective_options
from taskflow.wire.context import CONTEXT_HEADER, execution_context
from taskflow.wire.links import parent_context
from taskflow.wire.request import AttemptKey, ExecutionContext, RequestHeaders


@dataclass(frozen=True, slots=True)
class Sent:
    """A task's request as the operator sends it: headers (by name) and the body."""

    headers: dict[str, Any]
    body: Any


def _epoch_ms(timestamp: str | None) -> int | None:
    try:
        return parse_iso(timestamp) if timestamp else None
    except ValueError:
        return None


def sent_request(body: Mapping[str, Any], *, stage: str, task: str) -> Sent | None:
    """The request of ``stage``/``task``'s current attempt, or None when the flow's object
    does not say (no such task, not started yet, or a spec or status that does not parse)."""
    meta = body.get("metadata") or {}
    try:
        spec = TaskflowSpec.model_validate(body.get("spec") or {})
        status = TaskflowStatus.model_validate(body.get("status") or {})
    except ValidationError:
        return None
    index = next((i for i, s in enumerate(status.stages) if s.name == stage), None)
    if index is None:
        return None
    state = next((t for t in status.stages[index].tasks if t.name == task), None)
    source = spec.task(stage, task)
    if state is None or source is None or not (state.dispatch_time or state.start_time):
        return None  # not sent yet
    context = execution_context(
        uid=str(meta.get("uid") or ""),
        status=status,
        stage_index=index,
        task=source,
        state=state,
        options=effective_options(spec.options, source.options),
        parent_context=parent_context(meta),
    )
    sent = RequestHeaders(
        context=ExecutionContext(context),
        key=AttemptKey(str(meta.get("uid") or ""), stage, task, state.attempt).encode(),
        deadline=_epoch_ms(state.deadline),
        expires_at=_epoch_ms(state.expires_at) if state.deadline else None,
        # (never the heartbeat subject: signed, it is for the addressee only)
    ).encode()
    headers: dict[str, Any] = {**sent, CONTEXT_HEADER: context}  # the context as JSON, readable
    return Sent(
        headers=headers, body=state.params if state.params is not None else source.params or {}
    )
