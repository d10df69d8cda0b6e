"""Event payloads on ``status.eventSubscription``, in the seed's shapes.

``taskflowObject`` is a summary of the flow (not the whole object: a stage of 1,000 tasks
would make every event megabytes); ``get_details`` returns the whole tree.
"""

from __future__ import annotations

from typing import Any

from taskflow.api.status import Status, TaskflowStatus
from taskflow.engine.effects import Emit


def flow_summary(*, name: str, namespace: str, status: TaskflowStatus) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": namespace,
        "taskflowId": status.taskflow_id,
        "status": str(status.phase),
        "currentStage": status.current_stage,
        "progress": status.progress,
        "stages": [{"id": s.id, "name": s.name, "status": str(s.status)} for s in status.stages],
    }


def event_payload(
    emit: Emit, *, name: str, namespace: str, status: TaskflowStatus, time_ms: int
) -> dict[str, Any]:
    uid = status.taskflow_id
    data: dict[str, Any] = {"taskflowId": uid}
    if emit.kind == "TASK":
        stage = next(s for s in status.stages if s.name == emit.stage)
        task = next(t for t in stage.tasks if t.name == emit.task)
        data |= {
            "attempt": emit.attempt,
            "stageId": stage.id,
            "stageName": stage.name,
            "taskId": task.id,
            "taskName": task.name,
            "taskStatus": emit.status,
            "taskResponse": emit.response if emit.status == Status.SUCCEEDED else None,
        }
        if emit.progress is not None:
            data["taskProgress"] = emit.progress
        if emit.error is not None and emit.status not in (Status.SUCCEEDED, Status.RUNNING):
            data["taskError"] = emit.error.model_dump(exclude_none=True)
    elif emit.kind == "STAGE":
        stage = next(s for s in status.stages if s.name == emit.stage)
        data |= {"stageId": stage.id, "stageName": stage.name, "stageStatus": emit.status}
    else:
        data["taskflowStatus"] = emit.status
    data["taskflowObject"] = flow_summary(name=name, namespace=namespace, status=status)
    return {"eventType": emit.kind, "seq": emit.seq, "time": time_ms, "data": data}
