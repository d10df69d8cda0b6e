"""Applying what happened since the last decision: replies, no-responders, heartbeats,
throttled sends and finished children, each to the attempt it names (a late or stray one
changes only the record of its attempt, or nothing)."""

from __future__ import annotations

from taskflow.api.spec import TaskType
from taskflow.api.status import (
    FAILED_TASK_STATUSES,
    TERMINAL_TASK_STATUSES,
    ErrorReason,
    StageStatus,
    Status,
    TaskError,
    TaskStatus,
    WaitingReason,
)
from taskflow.engine.clock import iso, parse_iso
from taskflow.engine.effects import (
    CancelChild,
)
from taskflow.engine.inputs import (
    ChildFinished,
    Heartbeat,
    Input,
    NoResponders,
    Reply,
    Throttled,
)
from taskflow.engine.step import Step

# How long to wait before redelivering an attempt nobody was listening for.
REDELIVERY_INTERVAL_MS = 500
# A task's progress (from heartbeats) is published at most this often.
PROGRESS_INTERVAL_MS = 1000


def apply(step: Step, item: Input) -> None:
    found = step.find(item.stage, item.task)
    if found is None:
        return  # a reply for a task this flow does not have: ignore
    stage, task = found
    if isinstance(item, ChildFinished):
        apply_child(step, stage, task, item)
        return
    current = task.attempt == item.attempt and (
        task.status == Status.RUNNING
        or (task.status == Status.WAITING and task.waiting_reason == WaitingReason.NO_RESPONDERS)
    )
    if isinstance(item, Throttled):
        if current and task.status == Status.RUNNING:
            task.status = Status.WAITING
            task.waiting_reason = WaitingReason.THROTTLED
            task.dispatch_time = task.deadline = task.heartbeat_deadline = None
            step.changed = True
        return
    if isinstance(item, Heartbeat):
        if current and task.status == Status.RUNNING and task.waiting_reason is None:
            heartbeat(step, stage, task, item)
        return
    if isinstance(item, NoResponders):
        if (
            current
            and task.status == Status.RUNNING
            and (step.opts(stage.name, task.name).when_no_service == "fail")
        ):
            error = TaskError(
                message="no service instance serves this task's subject (whenNoService: fail)",
                reason=ErrorReason.NO_SERVICE,
            )
            step.end_attempt(stage, task, Status.FAILED, error)
        elif current and task.status == Status.RUNNING:
            task.status = Status.WAITING
            task.waiting_reason = WaitingReason.NO_RESPONDERS
            task.not_before = iso(step.now + REDELIVERY_INTERVAL_MS)
            step.changed = True
        return
    if not current:
        note_late_reply(step, task, item)
        return
    if item.ok:
        task.response = item.data
        task.response_ref = item.response_ref
        for child in item.children:
            if child not in task.nested_taskflows:
                task.nested_taskflows.append(child)
            # Named children are waited for even if seen before; the shell then reports
            # the ones that had already ended.
            if child not in task.nested_active_running_taskflow_ids:
                task.nested_active_running_taskflow_ids.append(child)
        if task.nested_active_running_taskflow_ids:
            # The service started child flows: the task ends when they do, whatever
            # the attempt's timeout (which covered the reply only).
            task.waiting_reason = WaitingReason.CHILDREN
            task.deadline = task.heartbeat_deadline = None
            step.changed = True
            return
        step.end_attempt(stage, task, Status.SUCCEEDED, None)
    else:
        step.end_attempt(stage, task, Status.FAILED, item.error)


def heartbeat(step: Step, stage: StageStatus, task: TaskStatus, item: Heartbeat) -> None:
    """The attempt lives on: its heartbeat deadline moves, and new progress is kept and
    published, at most once per PROGRESS_INTERVAL_MS (a chatty service costs no more)."""
    opts = step.opts(stage.name, task.name)
    if opts.heartbeat_timeout_ms is not None:
        task.heartbeat_deadline = iso(step.now + opts.heartbeat_timeout_ms)
        step.changed = True
    if item.progress is None or item.progress == task.progress:
        return
    task.progress = item.progress
    step.changed = True
    last = parse_iso(task.progress_time) if task.progress_time else None
    if last is None or step.now - last >= PROGRESS_INTERVAL_MS:
        task.progress_time = iso(step.now)
        step.emit("TASK", Status.RUNNING, stage, task)


def note_late_reply(step: Step, task: TaskStatus, reply: Reply) -> None:
    for record in task.attempts:
        if record.attempt == reply.attempt and not record.late_reply:
            record.late_reply = True
            step.changed = True
            return


def apply_child(step: Step, stage: StageStatus, task: TaskStatus, item: ChildFinished) -> None:
    if item.attempt is not None and item.attempt != task.attempt:
        return  # a child of an earlier attempt: kept for history, changes nothing
    first_seen = item.child not in task.nested_taskflows
    if first_seen:
        task.nested_taskflows.append(item.child)
        step.changed = True
    active = task.nested_active_running_taskflow_ids
    if item.status not in TERMINAL_TASK_STATUSES:
        if task.status == Status.RUNNING and item.child not in active:
            active.append(item.child)
            step.changed = True
        elif first_seen and task.status in FAILED_TASK_STATUSES:
            # Created just as its task ended (e.g. cancelled): nothing waits for it.
            step.effects.append(CancelChild(child=item.child))
        return
    is_flow = step.task_spec(stage.name, task.name).type == TaskType.TASKFLOW
    # A TASKFLOW task's child may be seen only once it ended (e.g. after a restart).
    if task.status != Status.RUNNING or (item.child not in active and not is_flow):
        return
    if item.child in active:
        active.remove(item.child)
    step.changed = True
    if item.status != Status.SUCCEEDED:
        task.error = TaskError(
            message=f"nested taskflow {item.child} ended {item.status}",
            reason=ErrorReason.CHILD,
        )
    if is_flow:
        task.response = item.summary
    if active or not (is_flow or task.waiting_reason == WaitingReason.CHILDREN):
        return
    task.waiting_reason = None
    outcome = Status.FAILED if task.error else Status.SUCCEEDED
    step.end_attempt(stage, task, outcome, task.error)
