"""What the client writes in ``spec.retry``: the seed's retry selection, in the CRD's shape.

The seed's ``retryTaskflow(taskflowId, stagesInfo?, tasksInfo?)`` names stages and tasks by
id or name, in several shapes; the CRD wants stage names, each with its task names (or none,
for the whole stage). The engine then decides which tasks that selection runs again (its
own ``retry_selection``); this module only translates, and says which reference it cannot
resolve.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from taskflow.client.envelope import TaskflowError

_RETRY_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


def _names(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    return [str(v) for v in value]


def retry_stages(
    body: Mapping[str, Any], stages: Sequence[Any] | None, tasks: Sequence[Any] | None
) -> list[dict[str, Any]] | None:
    """``spec.retry.stages`` from the seed's stagesInfo/tasksInfo; stage and task ids (from
    status) or names both work. None means the whole flow."""
    spec_stages = (body.get("spec") or {}).get("stages") or []
    status_stages = {s.get("name"): s for s in (body.get("status") or {}).get("stages") or []}

    def stage_name(ref: str) -> str:
        for stage in spec_stages:
            if stage.get("name") == ref:
                return str(ref)
        for name, stage in status_stages.items():
            if stage.get("id") == ref:
                return str(name)
        raise TaskflowError(f"unknown stage {ref!r}", "UnknownStage")

    def task_name(stage: str, ref: str) -> str:
        spec_tasks = next(s for s in spec_stages if s.get("name") == stage).get("tasks") or []
        if any(t.get("name") == ref for t in spec_tasks):
            return ref
        for task in (status_stages.get(stage) or {}).get("tasks") or []:
            if task.get("id") == ref:
                return str(task.get("name"))
        raise TaskflowError(f"unknown task {ref!r} in stage {stage!r}", "UnknownTask")

    chosen: dict[str, set[str] | None] = {}

    def add(stage_ref: str, task_refs: list[str] | None) -> None:
        stage = stage_name(stage_ref)
        if not task_refs:
            chosen[stage] = None
        elif stage not in chosen or chosen[stage] is not None:
            current = chosen.setdefault(stage, set())
            assert current is not None
            current.update(task_name(stage, t) for t in task_refs)

    for item in list(stages or []) + list(tasks or []):
        if isinstance(item, str) and "/" in item:
            stage_ref, _, task_ref = item.partition("/")
            add(stage_ref, [task_ref])
        elif isinstance(item, str):
            add(item, None)
        elif isinstance(item, tuple | list) and len(item) == 2:
            add(str(item[0]), _names(item[1]))
        elif isinstance(item, Mapping):
            ref = item.get("stageId") or item.get("stage") or item.get("name")
            if not ref:
                raise TaskflowError(f"a retry entry names no stage: {dict(item)!r}", "BadRequest")
            refs = _names(
                item.get("taskIds") or item.get("tasks") or item.get("taskId") or item.get("task")
            )
            add(str(ref), refs or None)
        else:
            raise TaskflowError(f"cannot read a retry entry: {item!r}", "BadRequest")
    if not chosen:
        return None
    order = [s.get("name") for s in spec_stages]
    out: list[dict[str, Any]] = []
    for stage in sorted(chosen, key=order.index):
        names = chosen[stage]
        out.append({"name": stage} if names is None else {"name": stage, "tasks": sorted(names)})
    return out


def retry_request(
    body: Mapping[str, Any],
    stages: Sequence[Any] | None,
    tasks: Sequence[Any] | None,
    *,
    failed_only: bool,
    retry_id: str | None,
) -> dict[str, Any]:
    """The whole ``spec.retry``: a fresh id (or ``retry_id``, checked), the selection and
    ``failedOnly``."""
    selection = retry_stages(body, stages, tasks)
    rid = retry_id or f"r-{uuid.uuid4().hex[:12]}"
    if not _RETRY_ID_RE.match(rid) or len(rid) > 63:
        raise TaskflowError(f"retry id {rid!r} is not a valid name", "BadRequest")
    return {
        "id": rid,
        # A merge patch keeps what it does not mention: say "no stages" explicitly.
        "stages": selection,
        "failedOnly": bool(failed_only),
    }
