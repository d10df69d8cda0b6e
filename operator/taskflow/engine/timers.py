"""The engine's timers: what happens when a deadline passes, and when to be asked next.

Every timer is a time in status (``deadline``: an attempt's timeout; ``notBefore``: a retry
delay or redelivery; ``expiresAt``: first dispatch + maxAge), so a restarted operator re-arms
them all from status alone. ``expire_timers`` ends what is overdue at the decision's ``now``,
``expire`` ends a task whose maxAge passed before it could start again, and ``wake_at`` is the
earliest time the current stage wants a new decision. Kept apart from ``engine.py`` so the
rules that read deadlines are in one place. Pure: ``now`` comes with the decision.
"""

from __future__ import annotations

from typing import Protocol

from taskflow.api.status import (
    TERMINAL_FLOW_PHASES,
    ErrorReason,
    StageStatus,
    Status,
    TaskError,
    TaskflowStatus,
    TaskStatus,
    WaitingReason,
)
from taskflow.engine.clock import parse_iso
from taskflow.engine.effects import CancelChild, Effect
from taskflow.engine.options import EffectiveOptions


class TimedStep(Protocol):
    """What the timers need of the decision being made (``engine._Step``)."""

    status: TaskflowStatus
    now: int
    effects: list[Effect]

    def opts(self, stage: str, task: str) -> EffectiveOptions: ...

    def current_index(self) -> int | None: ...

    def record_attempt(
        self, task: TaskStatus, outcome: Status, error: TaskError | None
    ) -> None: ...

    def end_attempt(
        self, stage: StageStatus, task: TaskStatus, outcome: Status, error: TaskError | None
    ) -> None: ...

    def end_task(
        self, stage: StageStatus, task: TaskStatus, outcome: Status, error: TaskError | None
    ) -> None: ...


def expire_timers(step: TimedStep) -> None:
    """End what is overdue in the current stage: a waiting task past its maxAge, a wait for
    child flows past it, an attempt past its timeout."""
    index = step.current_index()
    if index is None:
        return
    stage = step.status.stages[index]
    for task in stage.tasks:
        if task.status not in (Status.RUNNING, Status.WAITING):
            continue
        opts = step.opts(stage.name, task.name)
        if (
            task.expires_at
            and parse_iso(task.expires_at) <= step.now
            and (task.status == Status.WAITING)
        ):
            expire(step, stage, task, opts)
        elif (
            task.expires_at
            and parse_iso(task.expires_at) <= step.now
            and task.waiting_reason == WaitingReason.CHILDREN
        ):
            # The task's whole budget bounds the wait for child flows a service started
            # (the attempt's timeout covered its reply only): they are cancelled.
            for child in task.nested_active_running_taskflow_ids:
                step.effects.append(CancelChild(child=child))
            task.nested_active_running_taskflow_ids = []
            step.end_attempt(
                stage,
                task,
                Status.FAILED,
                TaskError(
                    message=f"expired: maxAge of {opts.max_age_ms} ms passed while waiting "
                    "for its child flows",
                    reason=ErrorReason.EXPIRED,
                ),
            )
        elif (
            task.heartbeat_deadline
            and parse_iso(task.heartbeat_deadline) <= step.now
            and task.status == Status.RUNNING
            and task.waiting_reason is None
        ):
            step.end_attempt(
                stage,
                task,
                Status.TIMED_OUT,
                TaskError(
                    message=f"no heartbeat within the heartbeatTimeout of "
                    f"{opts.heartbeat_timeout_ms} ms",
                    reason=ErrorReason.HEARTBEAT,
                ),
            )
        elif (
            task.deadline
            and parse_iso(task.deadline) <= step.now
            and (
                task.status == Status.RUNNING or task.waiting_reason == WaitingReason.NO_RESPONDERS
            )
        ):
            nobody = task.waiting_reason == WaitingReason.NO_RESPONDERS
            message = (
                f"no service was listening within the timeout of {opts.timeout_ms} ms"
                if nobody
                else f"no reply within the timeout of {opts.timeout_ms} ms"
            )
            step.end_attempt(
                stage,
                task,
                Status.TIMED_OUT,
                TaskError(message=message, reason=ErrorReason.TIMEOUT),
            )


def expire(step: TimedStep, stage: StageStatus, task: TaskStatus, opts: EffectiveOptions) -> None:
    """Fail a waiting task whose maxAge passed: no attempt starts after it."""
    nobody = task.waiting_reason == WaitingReason.NO_RESPONDERS
    why = "no service was listening" if nobody else "retries left"
    error = TaskError(
        message=f"expired: maxAge of {opts.max_age_ms} ms passed ({why})",
        reason=ErrorReason.EXPIRED,
    )
    if task.dispatch_time and nobody:
        step.record_attempt(task, Status.FAILED, error)
    step.end_task(stage, task, Status.FAILED, error)


def wake_at(step: TimedStep) -> int | None:
    """The earliest deadline, notBefore or expiresAt that matters in the current stage; None
    when the flow ended or nothing in it is timed."""
    if step.status.phase in TERMINAL_FLOW_PHASES:
        return None
    index = step.current_index()
    if index is None:
        return None
    times: list[int] = []
    for task in step.status.stages[index].tasks:
        if task.status == Status.RUNNING and task.deadline:
            times.append(parse_iso(task.deadline))
            if task.heartbeat_deadline and task.waiting_reason is None:
                times.append(parse_iso(task.heartbeat_deadline))
        elif task.waiting_reason == WaitingReason.CHILDREN and task.expires_at:
            times.append(parse_iso(task.expires_at))
        elif task.status == Status.WAITING:
            # Suspended: a retry delay that ends changes nothing until the flow resumes.
            held = step.status.suspended_at is not None
            for value in (None if held else task.not_before, task.expires_at):
                if value:
                    times.append(parse_iso(value))
            if task.deadline and task.waiting_reason == WaitingReason.NO_RESPONDERS:
                times.append(parse_iso(task.deadline))
    return min(times) if times else None
