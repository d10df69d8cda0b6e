"""What a stage becomes as it starts: skipped by its ``when``, and its forEach tasks
expanded into entries ``<task>[<i>]`` (kept in status, so a restart or a retry sees the same
items)."""

from __future__ import annotations

from taskflow.api.spec import MAX_FAN_OUT
from taskflow.api.status import (
    ErrorReason,
    StageStatus,
    Status,
    TaskError,
    TaskStatus,
)
from taskflow.engine import expressions
from taskflow.engine.clock import iso
from taskflow.engine.step import Step, task_id


def stage_skipped(step: Step, index: int, stage: StageStatus) -> bool:
    """A stage whose ``when`` is false is SKIPPED (its tasks too), and the flow goes on;
    one whose ``when`` cannot be evaluated fails its tasks (reason Expression)."""
    when = step.spec.stages[index].when
    if when is None:
        return False
    try:
        if expressions.holds(
            when, expressions.variables(step.spec, step.status, index, step.fetched)
        ):
            return False
    except expressions.ExpressionError as exc:
        error = TaskError(message=str(exc)[:4096], reason=ErrorReason.EXPRESSION)
        stage.status = Status.RUNNING
        stage.start_time = iso(step.now)
        for task in stage.tasks:
            task.error = error
            step.end_task(stage, task, Status.FAILED, error)
        return False  # (closed as a failed stage by advance)
    stage.skip_reason = f"when is false: {when}"[:1024]
    for task in stage.tasks:
        task.skip_reason = stage.skip_reason
    step.skip_stage(stage)
    return True


def fan_out(step: Step, index: int, stage: StageStatus) -> None:
    """As a stage starts, each forEach task becomes its entries ``<task>[<i>]``, one per
    item (kept in status, so a restart or a retry sees the same items)."""
    for spec in step.spec.stages[index].tasks:
        if spec.for_each is None:
            continue
        position = next((i for i, t in enumerate(stage.tasks) if t.name == spec.name), None)
        if position is None:
            continue  # expanded before (a retry of the stage)
        task = stage.tasks[position]
        try:
            items = spec.for_each.items
            if isinstance(items, str):
                values = expressions.variables(step.spec, step.status, index, step.fetched)
                items = expressions.resolve(items, values)
            if not isinstance(items, list):
                raise expressions.ExpressionError(
                    f"forEach.items is {type(items).__name__}, not a list"
                )
            if len(items) > MAX_FAN_OUT:
                raise expressions.ExpressionError(
                    f"forEach.items has {len(items)} items, over the limit of {MAX_FAN_OUT}"
                )
        except expressions.ExpressionError as exc:
            error = TaskError(message=str(exc)[:4096], reason=ErrorReason.EXPRESSION)
            task.start_time = iso(step.now)
            step.end_task(stage, task, Status.FAILED, error)
            continue
        if not items:
            task.status = Status.SKIPPED
            task.skip_reason = "forEach over no items"
            task.end_time = iso(step.now)
            step.emit("TASK", Status.SKIPPED, stage, task)
            continue
        stage.tasks[position : position + 1] = [
            TaskStatus(
                name=f"{spec.name}[{i}]",
                id=task_id(step.uid, stage.name, f"{spec.name}[{i}]"),
                item=item,
                index=i,
            )
            for i, item in enumerate(items)
        ]
        step.changed = step.durable = True
