"""The decision being made: its copy of status, its effects, and the moves every rule uses.

``Step`` is what the parts of the engine share: looking a task up, its options, emitting an
event, setting a condition, and ending an attempt, a task, a stage or the flow. The rules live
in modules named by their job (``intake``: what happened since the last decision; ``gates``:
what holds a waiting task back; ``expansion``: what a stage becomes as it starts; ``retry``,
``timers``) and the order they run in is ``engine.py``'s.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from taskflow.api.spec import Task, TaskflowSpec, base_name
from taskflow.api.status import (
    FAILED_TASK_STATUSES,
    TERMINAL_TASK_STATUSES,
    AttemptRecord,
    Condition,
    FlowPhase,
    StageStatus,
    Status,
    TaskError,
    TaskflowStatus,
    TaskStatus,
    WaitingReason,
)
from taskflow.engine import expressions
from taskflow.engine.clock import iso, parse_iso
from taskflow.engine.effects import (
    Effect,
    Emit,
    EventKind,
    Record,
)
from taskflow.engine.inputs import Ask
from taskflow.engine.options import EffectiveOptions, effective_options

# Finished attempts kept per task; older ones are dropped to keep the object small.
MAX_ATTEMPT_RECORDS = 10

# Whether an attempt may start now under its concurrency key and its service's limits (the
# shell's view of the shared slots and rates; it takes them for real before it sends).
Admission = Callable[[Ask], bool]
# (serviceId, actionName) -> why it may not be called, or None. Supplied by the shell from the
# namespace's TaskflowPolicy; the engine only applies it, before every dispatch.
Refusal = Callable[[str, str], str | None]


def fine(task: TaskStatus) -> bool:
    """SUCCEEDED, or SKIPPED because its (or its stage's) ``when`` was false."""
    return task.status == Status.SUCCEEDED or (
        task.status == Status.SKIPPED and task.skip_reason is not None
    )


def final_error(error: TaskError | None, opts: EffectiveOptions) -> bool:
    """An error no retry can help: the service said so, or its code is listed as such."""
    if error is None:
        return False
    return error.retryable is False or (
        error.code is not None and error.code in opts.non_retryable_codes
    )


def _spread(uid: str, stage: str, task: str, attempt: int) -> float:
    """A number in [0, 1) fixed by the attempt: where its retry falls within the jitter."""
    digest = hashlib.sha256(f"{uid}/{stage}/{task}/{attempt}".encode()).digest()
    return int.from_bytes(digest[:4], "big") / 2**32


def task_id(uid: str, stage: str, task: str | None = None) -> str:
    """Stable ids for stages and tasks, derived from the flow's uid and the names."""
    return str(uuid.uuid5(uuid.UUID(uid), stage if task is None else f"{stage}/{task}"))


class Step:
    """One decision. Mutates its own deep copy of status and collects effects."""

    def __init__(
        self,
        spec: TaskflowSpec,
        status: TaskflowStatus,
        now: int,
        uid: str,
        refuse: Refusal | None = None,
        fetched: Mapping[str, Any] | None = None,
        admit: Admission | None = None,
    ) -> None:
        self.spec = spec
        self.refuse = refuse
        self.fetched = fetched
        self.admit = admit
        self.slots: dict[tuple[str, str], tuple[str, int]] = {}  # this decision's keys
        self.status = status
        self.now = now
        self.uid = uid
        self.effects: list[Effect] = []
        self.changed = False
        self.durable = False
        self._specs = {
            (stage.name, task.name): task for stage in spec.stages for task in stage.tasks
        }
        self._opts: dict[tuple[str, str], EffectiveOptions] = {}

    def opts(self, stage: str, task: str) -> EffectiveOptions:
        key = (stage, base_name(task))  # a fan-out entry has its task's options
        if key not in self._opts:
            self._opts[key] = effective_options(self.spec.options, self._specs[key].options)
        return self._opts[key]

    def task_spec(self, stage: str, task: str) -> Task:
        return self._specs[(stage, base_name(task))]

    def emit(
        self,
        kind: EventKind,
        value: str,
        stage: StageStatus | None = None,
        task: TaskStatus | None = None,
    ) -> None:
        self.status.last_event_seq += 1
        self.effects.append(
            Emit(
                kind=kind,
                seq=self.status.last_event_seq,
                status=value,
                stage=stage.name if stage else None,
                task=task.name if task else None,
                attempt=task.attempt if task else None,
                response=task.response if task else None,
                error=task.error if task else None,
                progress=task.progress if task and value == Status.RUNNING else None,
            )
        )

    def condition(self, type_: str, status: str, reason: str, message: str) -> None:
        for cond in self.status.conditions:
            if cond.type == type_:
                if (cond.status, cond.reason, cond.message) != (status, reason, message):
                    if cond.status != status:
                        cond.last_transition_time = iso(self.now)
                    cond.status, cond.reason, cond.message = status, reason, message
                return
        self.status.conditions.append(
            Condition(
                type=type_,
                status=status,
                reason=reason,
                message=message,
                last_transition_time=iso(self.now),
            )
        )

    def tasks(self) -> Iterator[tuple[StageStatus, TaskStatus]]:
        for stage in self.status.stages:
            for task in stage.tasks:
                yield stage, task

    def find(self, stage_name: str, task_name: str) -> tuple[StageStatus, TaskStatus] | None:
        for stage in self.status.stages:
            if stage.name == stage_name:
                for task in stage.tasks:
                    if task.name == task_name:
                        return stage, task
        return None

    def current_index(self) -> int | None:
        for index, stage in enumerate(self.status.stages):
            if stage.status not in TERMINAL_TASK_STATUSES:
                return index
        return None

    def stage_index(self, stage: StageStatus) -> int:
        return next(i for i, s in enumerate(self.status.stages) if s is stage)

    def values(self, stage: StageStatus, task: TaskStatus) -> dict[str, Any]:
        """What the expressions of one task (or fan-out entry) see."""
        values = expressions.variables(
            self.spec, self.status, self.stage_index(stage), self.fetched
        )
        spec = self.task_spec(stage.name, task.name)
        if task.index is not None and spec.for_each is not None:
            values = {**values, spec.for_each.as_: task.item, "index": task.index}
        return values

    def record_attempt(self, task: TaskStatus, outcome: Status, error: TaskError | None) -> None:
        if error is not None and error.data is not None:
            # A record keeps the message, code and reason; the data (up to the reply limit)
            # stays on task.error and in the attempt's event only, or MAX_ATTEMPT_RECORDS
            # failures of every task would each keep a copy of it in the object.
            error = error.model_copy(update={"data": None})
        task.attempts.append(
            AttemptRecord(
                attempt=task.attempt,
                status=outcome,
                startTime=task.dispatch_time,
                endTime=iso(self.now),
                error=error,
            )
        )
        del task.attempts[:-MAX_ATTEMPT_RECORDS]

    def end_attempt(
        self, stage: StageStatus, task: TaskStatus, outcome: Status, error: TaskError | None
    ) -> None:
        """An attempt ended: finish the task, or schedule the next attempt."""
        self.record_attempt(task, outcome, error)
        opts = self.opts(stage.name, task.name)
        # Under exactlyOnceTaskExecution a timed-out attempt's outcome is unknown: the service
        # may have done the work, so it is never re-sent on its own (a flow retry can).
        unknown = outcome == Status.TIMED_OUT and opts.exactly_once_task_execution
        retries = task.attempt - task.run_start_attempt
        if (
            outcome != Status.SUCCEEDED
            and retries < opts.max_retries
            and not unknown
            and (not final_error(error, opts))
        ):
            spread = _spread(self.uid, stage.name, task.name, task.attempt) if opts.jitter else 0.0
            retry_at = self.now + opts.retry_delay(retries=retries, spread=spread)
            if task.expires_at is None or retry_at < parse_iso(task.expires_at):
                # Tell subscribers how this attempt ended, then wait for the next one.
                task.status = outcome
                task.error = error
                self.emit("TASK", outcome, stage, task)
                task.status = Status.WAITING
                task.attempt += 1
                task.not_before = iso(retry_at)
                task.waiting_reason = WaitingReason.RETRY_DELAY
                task.dispatch_time = task.deadline = task.heartbeat_deadline = None
                self.changed = True
                return
        self.end_task(stage, task, outcome, error)

    def end_task(
        self, stage: StageStatus, task: TaskStatus, outcome: Status, error: TaskError | None
    ) -> None:
        task.status = outcome
        task.error = error
        task.end_time = iso(self.now)
        task.deadline = task.not_before = task.waiting_reason = task.heartbeat_deadline = None
        self.changed = True
        self.emit("TASK", outcome, stage, task)

    def finish_stage(self, stage: StageStatus, outcome: Status) -> None:
        stage.status = outcome
        stage.end_time = iso(self.now)
        self.changed = self.durable = True
        self.emit("STAGE", outcome, stage)

    def skip_stage(self, stage: StageStatus) -> None:
        for task in stage.tasks:
            if task.status not in TERMINAL_TASK_STATUSES:
                task.status = Status.SKIPPED
                task.not_before = task.waiting_reason = None
        stage.status = Status.SKIPPED
        self.changed = self.durable = True
        self.emit("STAGE", Status.SKIPPED, stage)

    def finish(self) -> None:
        blocking = any(
            t.status in FAILED_TASK_STATUSES
            and not self.opts(s.name, t.name).continue_on_task_failure
            for s, t in self.tasks()
        )
        if blocking:
            self.finish_flow(FlowPhase.FAILED, "Failed", "a task failed")
        elif all(fine(t) for _, t in self.tasks()):
            self.finish_flow(FlowPhase.SUCCEEDED, "Succeeded", "every task succeeded")
        else:
            self.finish_flow(
                FlowPhase.COMPLETED_WITH_FAILURES,
                "CompletedWithFailures",
                "finished; some tasks failed (continueOnTaskFailure)",
            )

    def finish_flow(self, phase: FlowPhase, reason: str, message: str) -> None:
        status = self.status
        status.phase = phase
        status.completion_time = iso(self.now)
        self.changed = self.durable = True
        ok = "True" if phase == FlowPhase.SUCCEEDED else "False"
        self.condition("Succeeded", ok, reason, message)
        self.emit("TASKFLOW", phase)
        self.effects.append(
            Record(
                reason=reason,
                message=f"taskflow {phase}: {message}",
                type="Normal" if phase == FlowPhase.SUCCEEDED else "Warning",
            )
        )
