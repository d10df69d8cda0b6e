"""The state machine of a taskflow.

``decide`` takes the spec, the last status, the time and what happened since, and returns the
next status and the effects to perform. It never performs I/O and never reads the clock, so the
same call always gives the same answer (and a restarted operator re-arms every deadline from
status alone).

This module holds the order of a decision (inputs, cancel, retry, suspend, timers, advancing
the current stage) and the moves that start and close stages. The rules it calls live by job:
``intake`` (replies and other inputs), ``retry`` (``spec.retry``), ``timers`` (deadlines,
maxAge, ``wake_at``), ``expansion`` (``when`` and forEach as a stage starts), ``gates`` (what
holds a task back before it is sent); the moves they share are ``step.Step``'s, and the copy
of status each decision mutates is made by ``clone.py``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from taskflow.api.spec import TaskflowSpec, TaskType
from taskflow.api.status import (
    TERMINAL_FLOW_PHASES,
    TERMINAL_TASK_STATUSES,
    ErrorReason,
    FlowPhase,
    StageStatus,
    Status,
    TaskError,
    TaskflowStatus,
    TaskStatus,
    WaitingReason,
)
from taskflow.engine import expansion, expressions, gates, intake
from taskflow.engine.clock import iso, parse_iso
from taskflow.engine.clone import clone
from taskflow.engine.effects import (
    CancelChild,
    CancelNotice,
    CreateChild,
    Decision,
    Dispatch,
    Record,
)
from taskflow.engine.inputs import (
    Ask,
    Input,
)
from taskflow.engine.intake import REDELIVERY_INTERVAL_MS as REDELIVERY_INTERVAL_MS
from taskflow.engine.retry import handle_retry
from taskflow.engine.step import Admission, Refusal, Step, fine, task_id
from taskflow.engine.timers import expire, expire_timers, wake_at

# The error reason of a task its namespace's policy does not allow (kept for importers).
POLICY_DENIED = ErrorReason.POLICY_DENIED


def decide(
    *,
    spec: TaskflowSpec,
    status: TaskflowStatus,
    now: int,
    inputs: Sequence[Input] = (),
    uid: str,
    generation: int,
    event_subject: str,
    refuse: Refusal | None = None,
    fetched: Mapping[str, Any] | None = None,
    admit: Admission | None = None,
) -> Decision:
    """Advance the flow as far as it can go at ``now``. ``refuse`` says why a service's
    action may not be called from this flow (its namespace's policy), or None when it may."""
    return _Step(spec, clone(status), now, uid, refuse, fetched, admit).run(
        inputs=inputs, generation=generation, event_subject=event_subject
    )


def running_asks(
    *, spec: TaskflowSpec, status: TaskflowStatus, uid: str, fetched: Mapping[str, Any] | None
) -> list[Ask]:
    """What flow control must hold for the attempts now in their services (read only)."""
    return gates.running(Step(spec, status, 0, uid, None, fetched, None))


class _Step(Step):
    """One decision, in order; see the module's docstring for where each rule lives."""

    def run(self, *, inputs: Sequence[Input], generation: int, event_subject: str) -> Decision:
        status = self.status
        if not status.stages:
            self.initialize(event_subject)
        if status.observed_generation != generation:
            status.observed_generation = generation
            self.changed = True
        # Inputs arrived before this decision saw the spec: apply them first, so that a cancel
        # also reaches a child whose creation was just reported.
        for item in inputs:
            intake.apply(self, item)
        self.handle_cancel()
        handle_retry(self)
        self.handle_suspend()
        if status.phase not in TERMINAL_FLOW_PHASES:
            expire_timers(self)
            self.advance()
        self.summarize()
        return Decision(
            status=status,
            effects=self.effects,
            wake_at=wake_at(self),
            changed=self.changed or bool(self.effects),
            durable=self.durable,
        )

    def initialize(self, event_subject: str) -> None:
        status = self.status
        status.taskflow_id = self.uid
        status.event_subscription = event_subject
        status.created_at = self.now
        status.start_time = iso(self.now)
        status.stages = [
            StageStatus(
                name=stage.name,
                id=task_id(self.uid, stage.name),
                tasks=[
                    TaskStatus(name=task.name, id=task_id(self.uid, stage.name, task.name))
                    for task in stage.tasks
                ],
            )
            for stage in self.spec.stages
        ]
        status.phase = FlowPhase.RUNNING
        self.changed = self.durable = True
        self.condition("Succeeded", "Unknown", "Running", "the flow is running")
        self.emit("TASKFLOW", FlowPhase.RUNNING)
        self.effects.append(Record(reason="Started", message="taskflow started"))
        found = expressions.problems(self.spec)
        if found:  # nothing is dispatched: every expression is checked first
            for stage in status.stages:
                self.skip_stage(stage)
            self.finish_flow(FlowPhase.FAILED, "InvalidExpression", "; ".join(found)[:2000])

    def handle_suspend(self) -> None:
        """``spec.suspend`` holds new dispatches back (attempts in flight finish and are
        recorded, their timeouts and maxAge run on); false again resumes."""
        status = self.status
        wanted = bool(self.spec.suspend) and status.phase not in TERMINAL_FLOW_PHASES
        if wanted == (status.suspended_at is not None):
            return
        self.changed = self.durable = True
        if wanted:
            status.suspended_at = iso(self.now)
            self.condition(
                "Suspended", "True", "Suspended", "spec.suspend is true: nothing new is dispatched"
            )
            self.emit("TASKFLOW", "SUSPENDED")
            self.effects.append(Record(reason="Suspended", message="taskflow suspended"))
        else:
            status.suspended_at = None
            self.condition("Suspended", "False", "Resumed", "spec.suspend is false")
            self.emit("TASKFLOW", FlowPhase.RUNNING)
            self.effects.append(Record(reason="Resumed", message="taskflow resumed"))

    def handle_cancel(self) -> None:
        status = self.status
        if not self.spec.cancel or status.cancelled_at is not None:
            return
        status.cancelled_at = iso(self.now)
        self.changed = self.durable = True
        if status.phase in TERMINAL_FLOW_PHASES:
            self.condition(
                "Cancelled",
                "False",
                "AlreadyFinished",
                f"the flow had already ended {status.phase}",
            )
            return
        for stage in status.stages:
            if stage.status == Status.RUNNING:
                for task in stage.tasks:
                    if task.status in (Status.RUNNING, Status.WAITING):
                        self.cancel_task(stage, task)
                self.finish_stage(stage, Status.CANCELLED)
            elif stage.status == Status.WAITING:
                self.skip_stage(stage)
        self.finish_flow(FlowPhase.CANCELLED, "Cancelled", "cancelled by spec.cancel")
        self.condition("Cancelled", "True", "Cancelled", "cancelled by spec.cancel")

    def cancel_task(self, stage: StageStatus, task: TaskStatus) -> None:
        error = TaskError(message="cancelled", reason=ErrorReason.CANCELLED)
        for child in task.nested_active_running_taskflow_ids:
            self.effects.append(CancelChild(child=child))  # cancel cascades to children
        awaiting_reply = (
            task.status == Status.RUNNING and task.waiting_reason != WaitingReason.CHILDREN
        )
        is_action = self.task_spec(stage.name, task.name).type == TaskType.ACTION
        if awaiting_reply and is_action:
            self.effects.append(
                CancelNotice(stage=stage.name, task=task.name, attempt=task.attempt)
            )
        if task.status == Status.RUNNING or task.waiting_reason == WaitingReason.NO_RESPONDERS:
            self.record_attempt(task, Status.CANCELLED, error)  # so a late reply is recorded
        self.end_task(stage, task, Status.CANCELLED, error)

    def advance(self) -> None:
        while True:
            index = self.current_index()
            if index is None:
                self.finish()
                return
            stage = self.status.stages[index]
            if self.status.suspended_at is not None and any(
                t.status == Status.WAITING for t in stage.tasks
            ):
                return  # suspended: no stage starts, no task is sent
            if stage.status == Status.WAITING and expansion.stage_skipped(self, index, stage):
                continue
            if stage.status == Status.WAITING:
                stage.status = Status.RUNNING
                stage.start_time = iso(self.now)
                self.changed = self.durable = True
                self.emit("STAGE", Status.RUNNING, stage)
                expansion.fan_out(self, index, stage)
            self.dispatch_ready(stage)
            if any(t.status not in TERMINAL_TASK_STATUSES for t in stage.tasks):
                return
            if self.close_stage(stage):
                return

    def dispatch_ready(self, stage: StageStatus) -> None:
        for task in stage.tasks:
            if task.status != Status.WAITING:
                continue
            if task.not_before and parse_iso(task.not_before) > self.now:
                continue
            opts = self.opts(stage.name, task.name)
            if task.expires_at and parse_iso(task.expires_at) <= self.now:
                expire(self, stage, task, opts)
                continue
            if gates.refused(self, stage, task):
                continue
            redelivery = task.waiting_reason == WaitingReason.NO_RESPONDERS
            if not redelivery and gates.at_parallel_limit(self, stage, task):
                continue
            if not redelivery and not gates.resolved(self, stage, task):
                continue
            if not redelivery and gates.throttled(self, stage, task):
                continue
            task.status = Status.RUNNING
            task.not_before = task.waiting_reason = None
            if not redelivery:
                task.error = None
                task.dispatch_time = iso(self.now)
                task.deadline = iso(self.now + opts.timeout_ms)
                if opts.heartbeat_timeout_ms is not None:
                    task.heartbeat_deadline = iso(self.now + opts.heartbeat_timeout_ms)
                if task.start_time is None:
                    task.start_time = iso(self.now)
                if task.expires_at is None and opts.max_age_ms is not None:
                    task.expires_at = iso(self.now + opts.max_age_ms)
                self.emit("TASK", Status.RUNNING, stage, task)
            self.changed = self.durable = True
            if self.task_spec(stage.name, task.name).type == TaskType.TASKFLOW:
                self.effects.append(
                    CreateChild(stage=stage.name, task=task.name, attempt=task.attempt)
                )
            else:
                slot = self.slots.pop((stage.name, task.name), None)
                self.effects.append(
                    Dispatch(
                        stage=stage.name,
                        task=task.name,
                        attempt=task.attempt,
                        slot=slot[0] if slot else None,
                        slot_limit=slot[1] if slot else 1,
                    )
                )

    def close_stage(self, stage: StageStatus) -> bool:
        """Finish a stage whose tasks all ended; True when the flow stops here."""
        failed = [t for t in stage.tasks if not fine(t)]
        blocking = [t for t in failed if not self.opts(stage.name, t.name).continue_on_task_failure]
        self.finish_stage(stage, Status.FAILED if failed else Status.SUCCEEDED)
        if failed:
            first = failed[0]
            # The reason code only: a service's error text stays in status (Events are often
            # readable more widely, and a service may put anything in its message).
            detail = f"{first.name}: {first.error.reason}" if first.error else first.name
            self.effects.append(
                Record(
                    reason="StageFailed",
                    message=f"stage {stage.name}: {len(failed)} task(s) failed ({detail})",
                    type="Warning",
                )
            )
        if not blocking:
            return False
        for later in self.status.stages:
            if later.status == Status.WAITING:
                self.skip_stage(later)
        self.finish()
        return True

    def summarize(self) -> None:
        status = self.status
        total = sum(len(s.tasks) for s in status.stages)
        done = sum(1 for _, t in self.tasks() if t.status in TERMINAL_TASK_STATUSES)
        index = self.current_index()
        if index is None:
            ran = [i for i, s in enumerate(status.stages) if s.status != Status.SKIPPED]
            index = ran[-1] if ran else len(status.stages) - 1
        current = f"{index + 1}/{len(status.stages)} {status.stages[index].name}"
        progress = f"{done}/{total}"
        if (status.current_stage, status.progress) != (current, progress):
            status.current_stage, status.progress = current, progress
            self.changed = True
