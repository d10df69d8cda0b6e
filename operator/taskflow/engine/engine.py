"""The state machine of a taskflow.

``decide`` takes the spec, the last status, the time and what happened since, and returns the
next status and the effects to perform. It never performs I/O and never reads the clock, so the
same call always gives the same answer (and a restarted operator re-arms every deadline from
status alone).

Two parts of it have modules of their own, called by the decision being made: acting on
``spec.retry`` (``retry.py``) and the timers (``timers.py``: deadlines, maxAge, ``wake_at``);
the copy of status each decision mutates is made by ``clone.py``.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from taskflow.api.spec import MAX_FAN_OUT, Task, TaskflowSpec, TaskType, base_name
from taskflow.api.status import (
    FAILED_TASK_STATUSES,
    TERMINAL_FLOW_PHASES,
    TERMINAL_TASK_STATUSES,
    AttemptRecord,
    Condition,
    ErrorReason,
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
from taskflow.engine.clone import clone
from taskflow.engine.effects import (
    CancelChild,
    CancelNotice,
    CreateChild,
    Decision,
    Dispatch,
    Effect,
    Emit,
    EventKind,
    Record,
)
from taskflow.engine.inputs import (
    ChildFinished,
    Heartbeat,
    Input,
    NoResponders,
    Reply,
    Throttled,
)
from taskflow.engine.options import EffectiveOptions, effective_options
from taskflow.engine.retry import handle_retry
from taskflow.engine.timers import expire, expire_timers, wake_at

# How long to wait before redelivering an attempt nobody was listening for.
REDELIVERY_INTERVAL_MS = 500
# A task's progress (from heartbeats) is published at most this often.
PROGRESS_INTERVAL_MS = 1000
# Finished attempts kept per task; older ones are dropped to keep the object small.
MAX_ATTEMPT_RECORDS = 10


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


# (key, limit, holder) -> whether an attempt may start under its concurrency key now (the
# shell's view of the shared slots; it takes the slot for real before it sends).
Admission = Callable[[str, int, str], bool]
# (serviceId, actionName) -> why it may not be called, or None. Supplied by the shell from the
# namespace's TaskflowPolicy; the engine only applies it, before every dispatch.
Refusal = Callable[[str, str], str | None]
# The error reason of a task its namespace's policy does not allow (kept for importers).
POLICY_DENIED = ErrorReason.POLICY_DENIED


def _fine(task: TaskStatus) -> bool:
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


class _Step:
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
        self._slots: dict[tuple[str, str], tuple[str, int]] = {}  # this decision's keys
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

    # -- helpers -----------------------------------------------------------------------------

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

    # -- the decision ------------------------------------------------------------------------

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
            self.apply(item)
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

    # -- suspend -----------------------------------------------------------------------------

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

    # -- cancel ------------------------------------------------------------------------------

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

    # -- inputs ------------------------------------------------------------------------------

    def apply(self, item: Input) -> None:
        found = self.find(item.stage, item.task)
        if found is None:
            return  # a reply for a task this flow does not have: ignore
        stage, task = found
        if isinstance(item, ChildFinished):
            self.apply_child(stage, task, item)
            return
        current = task.attempt == item.attempt and (
            task.status == Status.RUNNING
            or (
                task.status == Status.WAITING and task.waiting_reason == WaitingReason.NO_RESPONDERS
            )
        )
        if isinstance(item, Throttled):
            if current and task.status == Status.RUNNING:
                task.status = Status.WAITING
                task.waiting_reason = WaitingReason.THROTTLED
                task.dispatch_time = task.deadline = task.heartbeat_deadline = None
                self.changed = True
            return
        if isinstance(item, Heartbeat):
            if current and task.status == Status.RUNNING and task.waiting_reason is None:
                self.heartbeat(stage, task, item)
            return
        if isinstance(item, NoResponders):
            if (
                current
                and task.status == Status.RUNNING
                and (self.opts(stage.name, task.name).when_no_service == "fail")
            ):
                error = TaskError(
                    message="no service instance serves this task's subject (whenNoService: fail)",
                    reason=ErrorReason.NO_SERVICE,
                )
                self.end_attempt(stage, task, Status.FAILED, error)
            elif current and task.status == Status.RUNNING:
                task.status = Status.WAITING
                task.waiting_reason = WaitingReason.NO_RESPONDERS
                task.not_before = iso(self.now + REDELIVERY_INTERVAL_MS)
                self.changed = True
            return
        if not current:
            self.note_late_reply(task, item)
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
                self.changed = True
                return
            self.end_attempt(stage, task, Status.SUCCEEDED, None)
        else:
            self.end_attempt(stage, task, Status.FAILED, item.error)

    def heartbeat(self, stage: StageStatus, task: TaskStatus, item: Heartbeat) -> None:
        """The attempt lives on: its heartbeat deadline moves, and new progress is kept and
        published, at most once per PROGRESS_INTERVAL_MS (a chatty service costs no more)."""
        opts = self.opts(stage.name, task.name)
        if opts.heartbeat_timeout_ms is not None:
            task.heartbeat_deadline = iso(self.now + opts.heartbeat_timeout_ms)
            self.changed = True
        if item.progress is None or item.progress == task.progress:
            return
        task.progress = item.progress
        self.changed = True
        last = parse_iso(task.progress_time) if task.progress_time else None
        if last is None or self.now - last >= PROGRESS_INTERVAL_MS:
            task.progress_time = iso(self.now)
            self.emit("TASK", Status.RUNNING, stage, task)

    def note_late_reply(self, task: TaskStatus, reply: Reply) -> None:
        for record in task.attempts:
            if record.attempt == reply.attempt and not record.late_reply:
                record.late_reply = True
                self.changed = True
                return

    def apply_child(self, stage: StageStatus, task: TaskStatus, item: ChildFinished) -> None:
        if item.attempt is not None and item.attempt != task.attempt:
            return  # a child of an earlier attempt: kept for history, changes nothing
        first_seen = item.child not in task.nested_taskflows
        if first_seen:
            task.nested_taskflows.append(item.child)
            self.changed = True
        active = task.nested_active_running_taskflow_ids
        if item.status not in TERMINAL_TASK_STATUSES:
            if task.status == Status.RUNNING and item.child not in active:
                active.append(item.child)
                self.changed = True
            elif first_seen and task.status in FAILED_TASK_STATUSES:
                # Created just as its task ended (e.g. cancelled): nothing waits for it.
                self.effects.append(CancelChild(child=item.child))
            return
        is_flow = self.task_spec(stage.name, task.name).type == TaskType.TASKFLOW
        # A TASKFLOW task's child may be seen only once it ended (e.g. after a restart).
        if task.status != Status.RUNNING or (item.child not in active and not is_flow):
            return
        if item.child in active:
            active.remove(item.child)
        self.changed = True
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
        self.end_attempt(stage, task, outcome, task.error)

    # -- attempts ----------------------------------------------------------------------------

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

    # -- advancing ---------------------------------------------------------------------------

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
            if stage.status == Status.WAITING and self.stage_skipped(index, stage):
                continue
            if stage.status == Status.WAITING:
                stage.status = Status.RUNNING
                stage.start_time = iso(self.now)
                self.changed = self.durable = True
                self.emit("STAGE", Status.RUNNING, stage)
                self.fan_out(index, stage)
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
            if self.refused(stage, task):
                continue
            redelivery = task.waiting_reason == WaitingReason.NO_RESPONDERS
            if not redelivery and self.at_parallel_limit(stage, task):
                continue
            if not redelivery and not self.resolved(stage, task):
                continue
            if not redelivery and self.throttled(stage, task):
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
                slot = self._slots.pop((stage.name, task.name), None)
                self.effects.append(
                    Dispatch(
                        stage=stage.name,
                        task=task.name,
                        attempt=task.attempt,
                        slot=slot[0] if slot else None,
                        slot_limit=slot[1] if slot else 1,
                    )
                )

    # -- expressions -------------------------------------------------------------------------

    def stage_index(self, stage: StageStatus) -> int:
        return next(i for i, s in enumerate(self.status.stages) if s is stage)

    def stage_skipped(self, index: int, stage: StageStatus) -> bool:
        """A stage whose ``when`` is false is SKIPPED (its tasks too), and the flow goes on;
        one whose ``when`` cannot be evaluated fails its tasks (reason Expression)."""
        when = self.spec.stages[index].when
        if when is None:
            return False
        try:
            if expressions.holds(
                when, expressions.variables(self.spec, self.status, index, self.fetched)
            ):
                return False
        except expressions.ExpressionError as exc:
            error = TaskError(message=str(exc)[:4096], reason=ErrorReason.EXPRESSION)
            stage.status = Status.RUNNING
            stage.start_time = iso(self.now)
            for task in stage.tasks:
                task.error = error
                self.end_task(stage, task, Status.FAILED, error)
            return False  # (closed as a failed stage by advance)
        stage.skip_reason = f"when is false: {when}"[:1024]
        for task in stage.tasks:
            task.skip_reason = stage.skip_reason
        self.skip_stage(stage)
        return True

    def fan_out(self, index: int, stage: StageStatus) -> None:
        """As a stage starts, each forEach task becomes its entries ``<task>[<i>]``, one per
        item (kept in status, so a restart or a retry sees the same items)."""
        for spec in self.spec.stages[index].tasks:
            if spec.for_each is None:
                continue
            position = next((i for i, t in enumerate(stage.tasks) if t.name == spec.name), None)
            if position is None:
                continue  # expanded before (a retry of the stage)
            task = stage.tasks[position]
            try:
                items = spec.for_each.items
                if isinstance(items, str):
                    values = expressions.variables(self.spec, self.status, index, self.fetched)
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
                task.start_time = iso(self.now)
                self.end_task(stage, task, Status.FAILED, error)
                continue
            if not items:
                task.status = Status.SKIPPED
                task.skip_reason = "forEach over no items"
                task.end_time = iso(self.now)
                self.emit("TASK", Status.SKIPPED, stage, task)
                continue
            stage.tasks[position : position + 1] = [
                TaskStatus(
                    name=f"{spec.name}[{i}]",
                    id=task_id(self.uid, stage.name, f"{spec.name}[{i}]"),
                    item=item,
                    index=i,
                )
                for i, item in enumerate(items)
            ]
            self.changed = self.durable = True

    def at_parallel_limit(self, stage: StageStatus, task: TaskStatus) -> bool:
        """A fan-out entry waits while its task's maxParallel entries run."""
        spec = self.task_spec(stage.name, task.name)
        if task.index is None or spec.for_each is None or spec.for_each.max_parallel is None:
            return False
        base = base_name(task.name)
        running = sum(
            1
            for t in stage.tasks
            if t.status == Status.RUNNING and t.index is not None and base_name(t.name) == base
        )
        return running >= spec.for_each.max_parallel

    def values(self, stage: StageStatus, task: TaskStatus) -> dict[str, Any]:
        """What the expressions of one task (or fan-out entry) see."""
        values = expressions.variables(
            self.spec, self.status, self.stage_index(stage), self.fetched
        )
        spec = self.task_spec(stage.name, task.name)
        if task.index is not None and spec.for_each is not None:
            values = {**values, spec.for_each.as_: task.item, "index": task.index}
        return values

    def concurrency_key(self, stage: StageStatus, task: TaskStatus) -> str | None:
        """The task's concurrency key as it resolves for this entry, or None."""
        spec = self.task_spec(stage.name, task.name)
        if spec.concurrency is None:
            return None
        key = expressions.resolve(spec.concurrency.key, self.values(stage, task))
        return key if isinstance(key, str) else json.dumps(key, sort_keys=True)

    def throttled(self, stage: StageStatus, task: TaskStatus) -> bool:
        """Wait (THROTTLED, nothing sent) while the task's key has its limit running."""
        spec = self.task_spec(stage.name, task.name)
        if spec.concurrency is None or self.admit is None:
            return False
        try:
            key = self.concurrency_key(stage, task)
        except expressions.ExpressionError as exc:
            error = TaskError(message=str(exc)[:4096], reason=ErrorReason.EXPRESSION)
            self.record_attempt(task, Status.FAILED, error)
            self.end_task(stage, task, Status.FAILED, error)
            return True
        holder = f"{self.uid}/{stage.name}/{task.name}/{task.attempt}"
        if key is None:
            return False
        if self.admit(key, spec.concurrency.limit, holder):
            self._slots[(stage.name, task.name)] = (key, spec.concurrency.limit)
            return False
        if task.waiting_reason != WaitingReason.THROTTLED:
            task.waiting_reason = WaitingReason.THROTTLED
            task.not_before = None
            self.changed = True
        return True

    def resolved(self, stage: StageStatus, task: TaskStatus) -> bool:
        """Before an attempt is sent: its task's ``when`` (at the run's first attempt) and its
        params' expressions. False: the task ended here (SKIPPED, or FAILED with reason
        Expression: the values it needs are not what it expects, which no retry changes)."""
        spec = self.task_spec(stage.name, task.name)
        templated = expressions.has_expressions(spec.params)
        if spec.when is None and not templated:
            return True
        values = self.values(stage, task)
        try:
            first = task.attempt == task.run_start_attempt
            if spec.when is not None and first and not expressions.holds(spec.when, values):
                task.status = Status.SKIPPED
                task.skip_reason = f"when is false: {spec.when}"[:1024]
                task.not_before = task.waiting_reason = None
                task.end_time = iso(self.now)
                self.changed = True
                self.emit("TASK", Status.SKIPPED, stage, task)
                return False
            if templated:
                task.params = expressions.resolve_params(spec.params, values)
        except expressions.ExpressionError as exc:
            error = TaskError(message=str(exc)[:4096], reason=ErrorReason.EXPRESSION)
            task.start_time = task.start_time or iso(self.now)
            self.record_attempt(task, Status.FAILED, error)
            self.end_task(stage, task, Status.FAILED, error)
            return False
        return True

    def refused(self, stage: StageStatus, task: TaskStatus) -> bool:
        """End a task its namespace's policy does not allow, before anything is sent."""
        details = self.task_spec(stage.name, task.name).task_details
        if self.refuse is None or details is None:
            return False
        why = self.refuse(details.service_id, details.action_name)
        if why is None:
            return False
        error = TaskError(message=why[:4096], reason=ErrorReason.POLICY_DENIED)
        task.start_time = task.start_time or iso(self.now)
        self.record_attempt(task, Status.FAILED, error)
        self.end_task(stage, task, Status.FAILED, error)
        return True

    def close_stage(self, stage: StageStatus) -> bool:
        """Finish a stage whose tasks all ended; True when the flow stops here."""
        failed = [t for t in stage.tasks if not _fine(t)]
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
        elif all(_fine(t) for _, t in self.tasks()):
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

    # -- summary -----------------------------------------------------------------------------

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
