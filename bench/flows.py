"""The flows the benchmark runs, and the payloads its ceilings use.

- ``single``: one stage of one task.
- ``seed``: the seed's shape: ``createGroup`` (1 task), then ``addApplianceToGroups``
  (10 parallel tasks).
- ``wide``: one stage of N parallel tasks (200, 1,000).

Every task calls ``bench.echo`` (answers at once) unless told otherwise; ``bench.slow`` holds
its reply (the scale run). The ceilings use exactly what the operator would write and send
for a seed-shaped flow, computed by the pure engine (no servers involved).
"""

from __future__ import annotations

import json
import uuid
from typing import Any

SERVICE = "bench"
KIND = {"apiVersion": "taskflow.dev/v1alpha1", "kind": "Taskflow"}


def task(name: str, params: dict[str, Any], action: str = "echo") -> dict[str, Any]:
    return {
        "name": name,
        "params": params,
        "taskDetails": {"serviceId": SERVICE, "actionName": action},
    }


def seed_spec(
    group: str, *, first_action: str = "echo", options: dict[str, Any] | None = None
) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "stages": [
            {
                "name": "createGroup",
                "tasks": [
                    task("createGroup", {"groupId": group, "name": f"Room {group}"}, first_action)
                ],
            },
            {
                "name": "addApplianceToGroups",
                "tasks": [
                    task(f"addAppliance{i}", {"groupId": group, "applianceId": f"appl-{i:04d}x"})
                    for i in range(10)
                ],
            },
        ]
    }
    if options:
        spec["options"] = options
    return spec


def single_spec(group: str) -> dict[str, Any]:
    return {
        "stages": [
            {
                "name": "createGroup",
                "tasks": [task("createGroup", {"groupId": group, "name": f"Room {group}"})],
            }
        ]
    }


def wide_spec(group: str, width: int) -> dict[str, Any]:
    return {
        "stages": [
            {
                "name": "addApplianceToGroups",
                "tasks": [
                    task(f"addAppliance{i}", {"groupId": group, "applianceId": f"appl-{i:04d}x"})
                    for i in range(width)
                ],
            }
        ]
    }


SHAPES = {
    "single": (single_spec, 1, 1),  # builder, tasks per flow, stages
    "seed": (seed_spec, 11, 2),
}


def body(name: str, spec: dict[str, Any]) -> bytes:
    return json.dumps(
        {**KIND, "metadata": {"name": name}, "spec": spec}, separators=(",", ":")
    ).encode()


def seed_payloads() -> dict[str, Any]:
    """A finished seed-shaped flow's status, and one stage-2 request (params + headers), as
    the operator makes them: the engine runs the flow with every reply a success."""
    from taskflow.api.spec import TaskflowSpec
    from taskflow.engine import Dispatch, Reply, decide, effective_options
    from taskflow.wire.context import execution_context
    from taskflow.wire.request import AttemptKey, ExecutionContext, RequestHeaders

    uid = str(uuid.uuid4())
    spec = TaskflowSpec.model_validate(seed_spec("g-000001"))
    now = 1_700_000_000_000
    kwargs = {"spec": spec, "uid": uid, "generation": 1, "event_subject": f"taskflow.events.{uid}"}
    decision = decide(status=_empty_status(), now=now, **kwargs)  # type: ignore[arg-type]
    request: dict[str, Any] = {}
    while decision.effects:
        dispatches = [e for e in decision.effects if isinstance(e, Dispatch)]
        if not dispatches:
            break
        status = decision.status
        if dispatches[0].stage == "addApplianceToGroups" and not request:
            d = dispatches[0]
            index = 1
            t_spec = spec.stages[index].tasks[0]
            state = status.stages[index].tasks[0]
            context = execution_context(
                uid=uid,
                status=status,
                stage_index=index,
                task=t_spec,
                state=state,
                options=effective_options(spec.options, t_spec.options),
                parent_context=None,
            )
            request = {
                "params": json.dumps(t_spec.params).encode(),
                "headers": RequestHeaders(
                    context=ExecutionContext(context),
                    key=AttemptKey(uid, d.stage, d.task, d.attempt).encode(),
                ).encode(),
            }
        now += 5
        replies = []
        for d in dispatches:
            t_spec = next(
                t for s in spec.stages if s.name == d.stage for t in s.tasks if t.name == d.task
            )
            replies.append(
                Reply(stage=d.stage, task=d.task, attempt=d.attempt, ok=True, data=t_spec.params)
            )
        decision = decide(status=status, now=now, inputs=replies, **kwargs)  # type: ignore[arg-type]
    final = decision.status.model_dump(by_alias=True, exclude_none=True, mode="json")
    return {"status": final, "request": request}


def _empty_status() -> Any:
    from taskflow.api.status import TaskflowStatus

    return TaskflowStatus()
