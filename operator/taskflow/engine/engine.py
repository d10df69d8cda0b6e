"""The state machine of a taskflow.

``decide`` takes the spec, the last status, the time and what happened since, and returns the
next status and the effects to perform. It never performs I/O and never reads the clock, so the
same call always gives the same answer (and a restarted operator re-arms every deadline from
status alone).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

from pydantic import BaseModel

from taskflow.api.spec import RetryRequest, Task, TaskflowSpec, TaskType
from taskflow.api.status import (
    FAILED_TASK_STATUSES,
    TERMINAL_FLOW_PHASES,
    TERMINAL_TASK_STATUSES,
    AttemptRecord,
    Condition,
    FlowPhase,
    RetryAck,
    StageStatus,
    Status,
    TaskError,
    TaskflowStatus,
    TaskStatus,
)
from taskflow.engine.clock import iso, parse_iso
from taskflow.engine.effects import (
    CancelChild,
    CancelNotice,
    CreateChild,
    Decision,
    Dispatch,
    Emit,
    Record,
)
from taskflow.engine.inputs import ChildFinished, Input, NoResponders, Reply
from taskflow.engine.options import EffectiveOptions, effective_options

# How long to wait before redelivering an attempt nobody was listening for.
REDELIVERY_INTERVAL_MS = 500
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
) -> Decision:
    """Advance the flow as far as it can go at ``now``. ``refuse`` says why a service's
    action may not be called from this flow (its namespace's policy), or None when it may."""
    return _Step(spec, _clone(status), now, uid, refuse).run(
        inputs=inputs, generation=generation, event_subject=event_subject
    )


# (serviceId, actionName) -> why it may not be called, or None. Supplied by the shell from the
# namespace's TaskflowPolicy; the engine only applies it, before every dispatch.
Refusal = Callable[[str, str], str | None]
# The error reason of a task its namespace's policy does not allow: not retried (it would be
# refused again), a flow retry runs it once the policy allows it.
POLICY_DENIED = "PolicyDenied"

_M = TypeVar("_M")
_CONTAINERS = (BaseModel, list, dict)


def _clone(value: _M) -> _M:
    """A deep copy of status for one decision to mutate: models, lists and dicts are copied,
    everything else (str, int, bool, enums, None) is immutable and shared. Same result as
    ``model_copy(deep=True)`` at about half the cost (no memo, no per-leaf dispatch), which
    matters because every decision copies the flow's whole status."""
    if isinstance(value, BaseModel):
        new = value.__copy__()  # a model's own shallow copy: __dict__, fields set, extras
        fields: dict[str, Any] = new.__dict__
        for key, item in fields.items():
            if isinstance(item, _CONTAINERS):
                fields[key] = _clone(item)
        return new
    if isinstance(value, list):
        return [_clone(v) if isinstance(v, _CONTAINERS) else v for v in value]  # type: ignore[return-value]
    if isinstance(value, dict):
        return {k: _clone(v) if isinstance(v, _CONTAINERS) else v  # type: ignore[return-value]
                for k, v in value.items()}
    return value


def task_id(uid: str, stage: str, task: str | None = None) -> str:
    """Stable ids for stages and tasks, derived from the flow's uid and the names."""
    return str(uuid.uuid5(uuid.UUID(uid), stage if task is None else f"{stage}/{task}"))


class _Step:
    """One decision. Mutates its own deep copy of status and collects effects."""

    def __init__(self, spec: TaskflowSpec, status: TaskflowStatus, now: int, uid: str,
                 refuse: Refusal | None = None) -> None:
        self.spec = spec
        self.refuse = refuse
        self.status = status
        self.now = now
        self.uid = uid
        self.effects: list[Dispatch | CancelNotice | CreateChild | CancelChild | Emit | Record] = []
        self.changed = False
        self.durable = False
        self._specs = {
            (stage.name, task.name): task for stage in spec.stages for task in stage.tasks
        }
        self._opts: dict[tuple[str, str], EffectiveOptions] = {}

    # -- helpers -----------------------------------------------------------------------------

    def opts(self, stage: str, task: str) -> EffectiveOptions:
        key = (stage, task)
        if key not in self._opts:
            self._opts[key] = effective_options(self.spec.options, self._specs[key].options)
        return self._opts[key]

    def task_spec(self, stage: str, task: str) -> Task:
        return self._specs[(stage, task)]

    def emit(
        self,
        kind: str,
        value: str,
        stage: StageStatus | None = None,
        task: TaskStatus | None = None,
    ) -> None:
        self.status.last_event_seq += 1
        self.effects.append(
            Emit(
                kind=kind,  # type: ignore[arg-type]
                seq=self.status.last_event_seq,
                status=value,
                stage=stage.name if stage else None,
                task=task.name if task else None,
                attempt=task.attempt if task else None,
                response=task.response if task else None,
                error=task.error if task else None,
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
        self.handle_retry()
        if status.phase not in TERMINAL_FLOW_PHASES:
            self.expire_timers()
            self.advance()
        self.summarize()
        return Decision(
            status=status,
            effects=self.effects,
            wake_at=self.wake_at(),
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
        error = TaskError(message="cancelled", reason="Cancelled")
        for child in task.nested_active_running_taskflow_ids:
            self.effects.append(CancelChild(child=child))  # cancel cascades to children
        awaiting_reply = task.status == Status.RUNNING and task.waiting_reason != "Children"
        is_action = self.task_spec(stage.name, task.name).type == TaskType.ACTION
        if awaiting_reply and is_action:
            self.effects.append(
                CancelNotice(stage=stage.name, task=task.name, attempt=task.attempt)
            )
        if task.status == Status.RUNNING or task.waiting_reason == "NoResponders":
            self.record_attempt(task, Status.CANCELLED, error)  # so a late reply is recorded
        self.end_task(stage, task, Status.CANCELLED, error)

    # -- retry -------------------------------------------------------------------------------

    def handle_retry(self) -> None:
        request = self.spec.retry
        status = self.status
        if request is None or (status.retry is not None and status.retry.id == request.id):
            return
        self.changed = self.durable = True
        refusal = self.retry_refusal(request)
        selection: set[tuple[str, str]] = set()
        if refusal is None:
            selection = self.retry_selection(request)
            if not selection:
                refusal = "nothing to retry: the selection holds no task that may run again"
        if refusal is not None:
            status.retry = RetryAck(
                id=request.id, accepted=False, message=refusal, time=iso(self.now)
            )
            self.condition("RetryAccepted", "False", "Refused", f"retry {request.id}: {refusal}")
            self.effects.append(
                Record(
                    reason="RetryRefused", message=f"retry {request.id}: {refusal}", type="Warning"
                )
            )
            return
        message = f"retry {request.id}: {len(selection)} task(s) to run again"
        status.retry = RetryAck(id=request.id, accepted=True, message=message, time=iso(self.now))
        self.condition("RetryAccepted", "True", "Accepted", message)
        self.effects.append(Record(reason="RetryStarted", message=message))
        for stage in status.stages:
            picked = [t for t in stage.tasks if (stage.name, t.name) in selection]
            if not picked:
                continue
            for task in picked:
                self.reset_task(task)
            stage.status = Status.WAITING
            stage.start_time = stage.end_time = None
        status.phase = FlowPhase.RUNNING
        status.completion_time = None
        status.cancelled_at = None  # a later spec.cancel: true cancels this run
        self.condition("Succeeded", "Unknown", "Running", message)
        self.emit("TASKFLOW", FlowPhase.RUNNING)

    def retry_refusal(self, request: RetryRequest) -> str | None:
        status = self.status
        if status.phase not in TERMINAL_FLOW_PHASES:
            return f"the flow is {status.phase}: only a finished flow can be retried"
        if self.spec.cancel:
            return "spec.cancel is true: set it to false in the same patch as the retry"
        for wanted in request.stages or ():
            stage = next((s for s in status.stages if s.name == wanted.name), None)
            if stage is None:
                return f"unknown stage {wanted.name!r}"
            names = {t.name for t in stage.tasks}
            for name in wanted.tasks or ():
                if name not in names:
                    return f"unknown task {name!r} in stage {wanted.name!r}"
                task = next(t for t in stage.tasks if t.name == name)
                if (
                    task.status == Status.SUCCEEDED
                    and self.opts(stage.name, name).exactly_once_task_execution
                    and not request.failed_only
                ):
                    return (
                        f"task {wanted.name}/{name} SUCCEEDED and exactlyOnceTaskExecution is "
                        "true: it is never dispatched again"
                    )
        return None

    def retry_selection(self, request: RetryRequest) -> set[tuple[str, str]]:
        chosen: set[tuple[str, str]] = set()
        if request.stages:
            for wanted in request.stages:
                stage = next(s for s in self.status.stages if s.name == wanted.name)
                names = set(wanted.tasks) if wanted.tasks else {t.name for t in stage.tasks}
                chosen |= {(stage.name, t.name) for t in stage.tasks if t.name in names}
        else:
            chosen = {(s.name, t.name) for s, t in self.tasks()}
        result: set[tuple[str, str]] = set()
        for stage, task in self.tasks():
            key = (stage.name, task.name)
            if key not in chosen:
                continue
            if request.failed_only and task.status not in FAILED_TASK_STATUSES:
                continue
            if task.status == Status.SUCCEEDED and self.opts(*key).exactly_once_task_execution:
                continue
            result.add(key)
        if not result:
            return result
        # Later stages depended on the re-run work, so they run again too: what did not
        # succeed always; what succeeded only when a plain whole-or-stage retry allows it.
        first = min(
            i for i, s in enumerate(self.status.stages) if any(k[0] == s.name for k in result)
        )
        for stage in self.status.stages[first + 1 :]:
            for task in stage.tasks:
                key = (stage.name, task.name)
                if task.status != Status.SUCCEEDED or (
                    not request.failed_only and not self.opts(*key).exactly_once_task_execution
                ):
                    result.add(key)
        return result

    def reset_task(self, task: TaskStatus) -> None:
        if task.dispatch_time is not None or task.attempts:
            task.attempt += 1
        task.run_start_attempt = task.attempt
        task.status = Status.WAITING
        task.response = task.response_ref = task.error = None
        task.start_time = task.end_time = task.dispatch_time = task.deadline = None
        task.not_before = task.expires_at = task.waiting_reason = None
        task.nested_active_running_taskflow_ids = []

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
            or (task.status == Status.WAITING and task.waiting_reason == "NoResponders")
        )
        if isinstance(item, NoResponders):
            if current and task.status == Status.RUNNING:
                task.status = Status.WAITING
                task.waiting_reason = "NoResponders"
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
                task.waiting_reason = "Children"
                task.deadline = None
                self.changed = True
                return
            self.end_attempt(stage, task, Status.SUCCEEDED, None)
        else:
            self.end_attempt(stage, task, Status.FAILED, item.error)

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
                message=f"nested taskflow {item.child} ended {item.status}", reason="Child"
            )
        if is_flow:
            task.response = item.summary
        if active or not (is_flow or task.waiting_reason == "Children"):
            return
        task.waiting_reason = None
        outcome = Status.FAILED if task.error else Status.SUCCEEDED
        self.end_attempt(stage, task, outcome, task.error)

    # -- timers ------------------------------------------------------------------------------

    def expire_timers(self) -> None:
        index = self.current_index()
        if index is None:
            return
        stage = self.status.stages[index]
        for task in stage.tasks:
            if task.status not in (Status.RUNNING, Status.WAITING):
                continue
            opts = self.opts(stage.name, task.name)
            if (
                task.expires_at
                and parse_iso(task.expires_at) <= self.now
                and (task.status == Status.WAITING)
            ):
                self.expire(stage, task, opts)
            elif (
                task.expires_at
                and parse_iso(task.expires_at) <= self.now
                and task.waiting_reason == "Children"
            ):
                # The task's whole budget bounds the wait for child flows a service started
                # (the attempt's timeout covered its reply only): they are cancelled.
                for child in task.nested_active_running_taskflow_ids:
                    self.effects.append(CancelChild(child=child))
                task.nested_active_running_taskflow_ids = []
                self.end_attempt(stage, task, Status.FAILED, TaskError(
                    message=f"expired: maxAge of {opts.max_age_ms} ms passed while waiting "
                            "for its child flows", reason="Expired"))
            elif (
                task.deadline
                and parse_iso(task.deadline) <= self.now
                and (task.status == Status.RUNNING or task.waiting_reason == "NoResponders")
            ):
                nobody = task.waiting_reason == "NoResponders"
                message = (
                    f"no service was listening within the timeout of {opts.timeout_ms} ms"
                    if nobody
                    else f"no reply within the timeout of {opts.timeout_ms} ms"
                )
                self.end_attempt(
                    stage, task, Status.TIMED_OUT, TaskError(message=message, reason="Timeout")
                )

    def expire(self, stage: StageStatus, task: TaskStatus, opts: EffectiveOptions) -> None:
        why = (
            "no service was listening" if task.waiting_reason == "NoResponders" else "retries left"
        )
        error = TaskError(
            message=f"expired: maxAge of {opts.max_age_ms} ms passed ({why})", reason="Expired"
        )
        if task.dispatch_time and task.waiting_reason == "NoResponders":
            self.record_attempt(task, Status.FAILED, error)
        self.end_task(stage, task, Status.FAILED, error)

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
        retries_left = task.attempt - task.run_start_attempt < opts.max_retries
        if outcome != Status.SUCCEEDED and retries_left and not unknown:
            retry_at = self.now + opts.retry_delay_ms
            if task.expires_at is None or retry_at < parse_iso(task.expires_at):
                # Tell subscribers how this attempt ended, then wait for the next one.
                task.status = outcome
                task.error = error
                self.emit("TASK", outcome, stage, task)
                task.status = Status.WAITING
                task.attempt += 1
                task.not_before = iso(retry_at)
                task.waiting_reason = "RetryDelay"
                task.dispatch_time = task.deadline = None
                self.changed = True
                return
        self.end_task(stage, task, outcome, error)

    def end_task(
        self, stage: StageStatus, task: TaskStatus, outcome: Status, error: TaskError | None
    ) -> None:
        task.status = outcome
        task.error = error
        task.end_time = iso(self.now)
        task.deadline = task.not_before = task.waiting_reason = None
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
            if stage.status == Status.WAITING:
                stage.status = Status.RUNNING
                stage.start_time = iso(self.now)
                self.changed = self.durable = True
                self.emit("STAGE", Status.RUNNING, stage)
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
                self.expire(stage, task, opts)
                continue
            if self.refused(stage, task):
                continue
            redelivery = task.waiting_reason == "NoResponders"
            task.status = Status.RUNNING
            task.not_before = task.waiting_reason = None
            if not redelivery:
                task.error = None
                task.dispatch_time = iso(self.now)
                task.deadline = iso(self.now + opts.timeout_ms)
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
                self.effects.append(
                    Dispatch(stage=stage.name, task=task.name, attempt=task.attempt)
                )

    def refused(self, stage: StageStatus, task: TaskStatus) -> bool:
        """End a task its namespace's policy does not allow, before anything is sent."""
        details = self.task_spec(stage.name, task.name).task_details
        if self.refuse is None or details is None:
            return False
        why = self.refuse(details.service_id, details.action_name)
        if why is None:
            return False
        error = TaskError(message=why[:4096], reason=POLICY_DENIED)
        task.start_time = task.start_time or iso(self.now)
        self.record_attempt(task, Status.FAILED, error)
        self.end_task(stage, task, Status.FAILED, error)
        return True

    def close_stage(self, stage: StageStatus) -> bool:
        """Finish a stage whose tasks all ended; True when the flow stops here."""
        failed = [t for t in stage.tasks if t.status != Status.SUCCEEDED]
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
        elif all(t.status == Status.SUCCEEDED for _, t in self.tasks()):
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

    def wake_at(self) -> int | None:
        if self.status.phase in TERMINAL_FLOW_PHASES:
            return None
        index = self.current_index()
        if index is None:
            return None
        times: list[int] = []
        for task in self.status.stages[index].tasks:
            if task.status == Status.RUNNING and task.deadline:
                times.append(parse_iso(task.deadline))
            elif task.waiting_reason == "Children" and task.expires_at:
                times.append(parse_iso(task.expires_at))
            elif task.status == Status.WAITING:
                for value in (task.not_before, task.expires_at):
                    if value:
                        times.append(parse_iso(value))
                if task.deadline and task.waiting_reason == "NoResponders":
                    times.append(parse_iso(task.deadline))
        return min(times) if times else None
