"""The ``taskflowExecutionContext`` header, exactly in the seed's shape.

A service reads it to learn which flow, stage, task and attempt it serves, the merged options,
the previous stage's responses, and (for nested flows) the parent's context in ``meta``.
"""

from __future__ import annotations

from typing import Any

from taskflow.api.spec import Task
from taskflow.api.status import StageStatus, TaskflowStatus, TaskStatus
from taskflow.engine.options import EffectiveOptions

CONTEXT_HEADER = "taskflowExecutionContext"
IDEMPOTENCY_HEADER = "Taskflow-Idempotency-Key"
EXPIRES_HEADER = "Taskflow-Expires-At"  # epoch ms after which the service may drop the message
DEADLINE_HEADER = "Taskflow-Deadline"  # epoch ms at which this attempt times out
# With heartbeatTimeout: the subject on which the service heartbeats this attempt (signed, like
# the reply subject, so only the request's addressee knows it).
HEARTBEAT_HEADER = "Taskflow-Heartbeat"


def task_info(
    *,
    task: Task,
    state: TaskStatus,
    options: EffectiveOptions,
    meta: dict[str, Any] | None,
) -> dict[str, Any]:
    info: dict[str, Any] = {
        "id": state.id,
        "attempt": state.attempt,
        "meta": meta or {},
        "params": task.params or {},
        "options": options.as_wire(),
        "status": str(state.status),
        "nestedActiveRunningTaskFlowIds": list(state.nested_active_running_taskflow_ids),
        "nestedTaskflows": list(state.nested_taskflows),
        "name": task.name,
        "type": str(task.type),
    }
    if task.task_details is not None:
        info["taskDetails"] = {
            "serviceId": task.task_details.service_id,
            "actionName": task.task_details.action_name,
        }
    return info


def previous_stage_responses(status: TaskflowStatus, stage_index: int) -> list[dict[str, Any]]:
    if stage_index == 0:
        return []
    previous: StageStatus = status.stages[stage_index - 1]
    return [{"taskName": t.name, "response": _response_of(t)} for t in previous.tasks]


def _response_of(task: TaskStatus) -> Any:
    if task.response_ref:
        return {"responseRef": task.response_ref}
    if task.response is None:
        return None
    return {"success": True, "data": task.response}


def execution_context(
    *,
    uid: str,
    status: TaskflowStatus,
    stage_index: int,
    task: Task,
    state: TaskStatus,
    options: EffectiveOptions,
    parent_context: dict[str, Any] | None,
) -> dict[str, Any]:
    """The header's value: ``{"previousStageRes": [...], "taskflow": {...}}``.

    ``parent_context`` is the parent task's own execution context (nested flows); it goes in
    ``taskInfo.meta.taskflowExecutionContext`` as in the seed's third example.
    """
    stage = status.stages[stage_index]
    meta = {CONTEXT_HEADER: parent_context} if parent_context else {}
    context: dict[str, Any] = {
        "taskflow": {
            "id": uid,
            "stageId": stage.id,
            "createdAt": status.created_at,
            "taskId": state.id,
            "taskInfo": task_info(task=task, state=state, options=options, meta=meta),
        }
    }
    if stage_index > 0:
        context = {"previousStageRes": previous_stage_responses(status, stage_index), **context}
    return context
