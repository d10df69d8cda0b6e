"""Acting on ``spec.retry``: a finished flow runs again, in whole or in part.

A retry is the one transition that rewinds status (tasks back to WAITING, stages reopened, the
phase RUNNING again), and most of its rules say no: a flow still running, a cancel still set,
names that do not exist, a SUCCEEDED task under exactlyOnceTaskExecution, a selection that
leaves nothing to run. Those rules live here, apart from the forward-moving state machine in
``engine.py``: which request is refused (``retry_refusal``) and which tasks run again
(``retry_selection``) are pure functions of status and the request, tested by table
(``tests/unit/test_engine_retry.py``); ``handle_retry`` applies the answer to the decision being
made. Pure like the rest of the engine: no I/O, no clock (``now`` comes with the decision).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Protocol

from taskflow.api.spec import RetryRequest, TaskflowSpec, base_name
from taskflow.api.status import (
    FAILED_TASK_STATUSES,
    TERMINAL_FLOW_PHASES,
    FlowPhase,
    RetryAck,
    StageStatus,
    Status,
    TaskflowStatus,
    TaskStatus,
)
from taskflow.engine.clock import iso
from taskflow.engine.effects import Effect, EventKind, Record
from taskflow.engine.options import EffectiveOptions

# (stage, task) -> the task's effective options.
OptionsOf = Callable[[str, str], EffectiveOptions]
# The tasks a retry runs again, as (stage, task) names.
Selection = set[tuple[str, str]]


class RetryingStep(Protocol):
    """What acting on a retry needs of the decision being made (``engine._Step``)."""

    spec: TaskflowSpec
    status: TaskflowStatus
    now: int
    effects: list[Effect]
    changed: bool
    durable: bool

    def opts(self, stage: str, task: str) -> EffectiveOptions: ...

    def condition(self, type_: str, status: str, reason: str, message: str) -> None: ...

    def emit(
        self,
        kind: EventKind,
        value: str,
        stage: StageStatus | None = None,
        task: TaskStatus | None = None,
    ) -> None: ...


def handle_retry(step: RetryingStep) -> None:
    """Act once on a ``spec.retry`` whose id status has not acknowledged: refuse it (a
    condition, a Warning Event, nothing else changes) or reset the selected tasks to run."""
    request = step.spec.retry
    status = step.status
    if request is None or (status.retry is not None and status.retry.id == request.id):
        return
    step.changed = step.durable = True
    refusal = retry_refusal(
        request=request, status=status, cancel=bool(step.spec.cancel), opts=step.opts
    )
    selection: Selection = set()
    if refusal is None:
        selection = retry_selection(request=request, status=status, opts=step.opts)
        if not selection:
            refusal = "nothing to retry: the selection holds no task that may run again"
    if refusal is not None:
        status.retry = RetryAck(id=request.id, accepted=False, message=refusal, time=iso(step.now))
        step.condition("RetryAccepted", "False", "Refused", f"retry {request.id}: {refusal}")
        step.effects.append(
            Record(reason="RetryRefused", message=f"retry {request.id}: {refusal}", type="Warning")
        )
        return
    message = f"retry {request.id}: {len(selection)} task(s) to run again"
    status.retry = RetryAck(id=request.id, accepted=True, message=message, time=iso(step.now))
    step.condition("RetryAccepted", "True", "Accepted", message)
    step.effects.append(Record(reason="RetryStarted", message=message))
    for stage in status.stages:
        picked = [t for t in stage.tasks if (stage.name, t.name) in selection]
        if not picked:
            continue
        for task in picked:
            reset_task(task)
        stage.status = Status.WAITING
        stage.start_time = stage.end_time = stage.skip_reason = None
    status.phase = FlowPhase.RUNNING
    status.completion_time = None
    status.cancelled_at = None  # a later spec.cancel: true cancels this run
    step.condition("Succeeded", "Unknown", "Running", message)
    step.emit("TASKFLOW", FlowPhase.RUNNING)


def retry_refusal(
    *, request: RetryRequest, status: TaskflowStatus, cancel: bool, opts: OptionsOf
) -> str | None:
    """Why ``request`` cannot be acted on (``cancel``: the spec's), or None when it can."""
    if status.phase not in TERMINAL_FLOW_PHASES:
        return f"the flow is {status.phase}: only a finished flow can be retried"
    if cancel:
        return "spec.cancel is true: set it to false in the same patch as the retry"
    for wanted in request.stages or ():
        stage = next((s for s in status.stages if s.name == wanted.name), None)
        if stage is None:
            return f"unknown stage {wanted.name!r}"
        for name in wanted.tasks or ():
            # A task, a fan-out entry ("add[3]"), or a fan-out task: all of its entries.
            named = [t for t in stage.tasks if name in (t.name, base_name(t.name))]
            if not named:
                return f"unknown task {name!r} in stage {wanted.name!r}"
            for task in named:
                if (
                    task.status == Status.SUCCEEDED
                    and opts(stage.name, task.name).exactly_once_task_execution
                    and not request.failed_only
                ):
                    return (
                        f"task {wanted.name}/{task.name} SUCCEEDED and exactlyOnceTaskExecution "
                        "is true: it is never dispatched again"
                    )
    return None


def retry_selection(*, request: RetryRequest, status: TaskflowStatus, opts: OptionsOf) -> Selection:
    """The tasks an accepted ``request`` runs again; empty when none may. Only for a request
    ``retry_refusal`` accepted (every stage it names exists)."""
    chosen: Selection = set()
    if request.stages:
        for wanted in request.stages:
            stage = next(s for s in status.stages if s.name == wanted.name)
            names = set(wanted.tasks) if wanted.tasks else {t.name for t in stage.tasks}
            chosen |= {
                (stage.name, t.name)
                for t in stage.tasks
                if t.name in names or base_name(t.name) in names
            }
    else:
        chosen = {(s.name, t.name) for s, t in _tasks(status)}
    result: Selection = set()
    for stage, task in _tasks(status):
        key = (stage.name, task.name)
        if key not in chosen:
            continue
        if request.failed_only and task.status not in FAILED_TASK_STATUSES:
            continue
        if task.status == Status.SUCCEEDED and opts(*key).exactly_once_task_execution:
            continue
        result.add(key)
    if not result:
        return result
    # Later stages depended on the re-run work, so they run again too: what did not
    # succeed always; what succeeded only when a plain whole-or-stage retry allows it.
    first = min(i for i, s in enumerate(status.stages) if any(k[0] == s.name for k in result))
    for stage in status.stages[first + 1 :]:
        for task in stage.tasks:
            key = (stage.name, task.name)
            if task.status != Status.SUCCEEDED or (
                not request.failed_only and not opts(*key).exactly_once_task_execution
            ):
                result.add(key)
    return result


def reset_task(task: TaskStatus) -> None:
    """A task selected by a retry, back to WAITING for a new run: its attempt number moves on
    (if the last one was sent) and its attempt records stay."""
    if task.dispatch_time is not None or task.attempts:
        task.attempt += 1
    task.run_start_attempt = task.attempt
    task.status = Status.WAITING
    task.response = task.response_ref = task.error = None
    task.start_time = task.end_time = task.dispatch_time = task.deadline = None
    task.heartbeat_deadline = task.progress = task.progress_time = None
    task.params = task.skip_reason = None
    task.not_before = task.expires_at = task.waiting_reason = None
    task.nested_active_running_taskflow_ids = []


def _tasks(status: TaskflowStatus) -> Iterator[tuple[StageStatus, TaskStatus]]:
    for stage in status.stages:
        for task in stage.tasks:
            yield stage, task
