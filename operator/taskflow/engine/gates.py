"""What holds a waiting task back just before it is sent, in the order asked.

The namespace's policy (``refused``), a fan-out's ``maxParallel`` (``at_parallel_limit``),
the task's ``when`` and its params' expressions (``resolved``), and its concurrency key
(``throttled``). Each either lets the task go, keeps it waiting, or ends it here with a reason
(a task that cannot be sent as written fails at once: no retry changes its values).
"""

from __future__ import annotations

import json

from taskflow.api.spec import TaskType, base_name
from taskflow.api.status import (
    ErrorReason,
    StageStatus,
    Status,
    TaskError,
    TaskStatus,
    WaitingReason,
)
from taskflow.engine import expressions
from taskflow.engine.clock import iso
from taskflow.engine.inputs import Ask
from taskflow.engine.step import Step


def refused(step: Step, stage: StageStatus, task: TaskStatus) -> bool:
    """End a task its namespace's policy does not allow, before anything is sent."""
    details = step.task_spec(stage.name, task.name).task_details
    if step.refuse is None or details is None:
        return False
    why = step.refuse(details.service_id, details.action_name)
    if why is None:
        return False
    error = TaskError(message=why[:4096], reason=ErrorReason.POLICY_DENIED)
    task.start_time = task.start_time or iso(step.now)
    step.record_attempt(task, Status.FAILED, error)
    step.end_task(stage, task, Status.FAILED, error)
    return True


def at_parallel_limit(step: Step, stage: StageStatus, task: TaskStatus) -> bool:
    """A fan-out entry waits while its task's maxParallel entries run."""
    spec = step.task_spec(stage.name, task.name)
    if task.index is None or spec.for_each is None or spec.for_each.max_parallel is None:
        return False
    base = base_name(task.name)
    running = sum(
        1
        for t in stage.tasks
        if t.status == Status.RUNNING and t.index is not None and base_name(t.name) == base
    )
    return running >= spec.for_each.max_parallel


def resolved(step: Step, stage: StageStatus, task: TaskStatus) -> bool:
    """Before an attempt is sent: its task's ``when`` (at the run's first attempt) and its
    params' expressions. False: the task ended here (SKIPPED, or FAILED with reason
    Expression: the values it needs are not what it expects, which no retry changes)."""
    spec = step.task_spec(stage.name, task.name)
    templated = expressions.has_expressions(spec.params)
    if spec.when is None and not templated:
        return True
    values = step.values(stage, task)
    try:
        first = task.attempt == task.run_start_attempt
        if spec.when is not None and first and not expressions.holds(spec.when, values):
            task.status = Status.SKIPPED
            task.skip_reason = f"when is false: {spec.when}"[:1024]
            task.not_before = task.waiting_reason = None
            task.end_time = iso(step.now)
            step.changed = True
            step.emit("TASK", Status.SKIPPED, stage, task)
            return False
        if templated:
            task.params = expressions.resolve_params(spec.params, values)
    except expressions.ExpressionError as exc:
        error = TaskError(message=str(exc)[:4096], reason=ErrorReason.EXPRESSION)
        task.start_time = task.start_time or iso(step.now)
        step.record_attempt(task, Status.FAILED, error)
        step.end_task(stage, task, Status.FAILED, error)
        return False
    return True


def throttled(step: Step, stage: StageStatus, task: TaskStatus) -> bool:
    """Wait (THROTTLED, nothing sent) while the task's concurrency key, or its service's
    limit or rate, lets no more attempts start; the earliest-ready waiter goes first."""
    if step.admit is None:
        return False
    try:
        key = concurrency_key(step, stage, task)
    except expressions.ExpressionError as exc:
        error = TaskError(message=str(exc)[:4096], reason=ErrorReason.EXPRESSION)
        step.record_attempt(task, Status.FAILED, error)
        step.end_task(stage, task, Status.FAILED, error)
        return True
    ask = ask_of(step, stage, task, key)
    if step.admit(ask):
        if key is not None:
            step.slots[(stage.name, task.name)] = (key, ask.limit)
        return False
    if task.waiting_reason != WaitingReason.THROTTLED:
        task.waiting_reason = WaitingReason.THROTTLED
        task.not_before = None
        step.changed = True
    return True


def ask_of(step: Step, stage: StageStatus, task: TaskStatus, key: str | None) -> Ask:
    """The question to flow control for this attempt (``key``: its concurrency key)."""
    spec = step.task_spec(stage.name, task.name)
    details = spec.task_details
    return Ask(
        holder=f"{step.uid}/{stage.name}/{task.name}/{task.attempt}",
        key=key,
        limit=spec.concurrency.limit if spec.concurrency is not None else 1,
        service_id=details.service_id if details is not None else None,
        action_name=details.action_name if details is not None else None,
    )


def running(step: Step) -> list[Ask]:
    """What the attempts now in their services hold (an operator that resumes them takes it
    again, so a limit holds across a restart)."""
    out = []
    for stage, task in step.tasks():
        spec = step.task_spec(stage.name, task.name)
        if task.status != Status.RUNNING or task.waiting_reason is not None:
            continue
        if spec.type != TaskType.ACTION:
            continue
        try:
            key = concurrency_key(step, stage, task)
        except expressions.ExpressionError:
            key = None  # (it was sent, so it resolved then; nothing to hold if not now)
        out.append(ask_of(step, stage, task, key))
    return out


def concurrency_key(step: Step, stage: StageStatus, task: TaskStatus) -> str | None:
    """The task's concurrency key as it resolves for this entry, or None."""
    spec = step.task_spec(stage.name, task.name)
    if spec.concurrency is None:
        return None
    key = expressions.resolve(spec.concurrency.key, step.values(stage, task))
    return key if isinstance(key, str) else json.dumps(key, sort_keys=True)
