"""``spec.retry`` by table: which requests are refused, and which tasks run again. No I/O.

``retry_refusal`` and ``retry_selection`` are pure functions of status, the request and the
tasks' options, so each row states a flow (the status of every task), a request and the
answer; every row is also run through ``decide``, which must act on exactly that answer.
"""

from __future__ import annotations

from typing import Any

import pytest

from taskflow.api.spec import Options, RetryRequest, TaskflowSpec
from taskflow.api.status import (
    TERMINAL_TASK_STATUSES,
    AttemptRecord,
    FlowPhase,
    StageStatus,
    Status,
    TaskflowStatus,
    TaskStatus,
)
from taskflow.engine import decide, effective_options, iso
from taskflow.engine.engine import task_id
from taskflow.engine.retry import OptionsOf, reset_task, retry_refusal, retry_selection

UID = "00000000-0000-0000-0000-000000000002"
T0 = 1_700_000_000_000

OK, FAIL, TIMEOUT = Status.SUCCEEDED, Status.FAILED, Status.TIMED_OUT
CANCEL, SKIP = Status.CANCELLED, Status.SKIPPED

# Finished flows, as {stage: {task: status}} and the phase they ended in.
Layout = dict[str, dict[str, Status]]
MIXED: Layout = {"s1": {"a": OK, "b": FAIL}, "s2": {"c": OK, "d": FAIL}}  # continued
STOPPED: Layout = {"s1": {"a": OK, "b": FAIL}, "s2": {"c": SKIP, "d": SKIP}}
CANCELLED: Layout = {"s1": {"a": OK, "b": CANCEL}, "s2": {"c": SKIP}}
TIMED_OUT: Layout = {"s1": {"a": TIMEOUT}, "s2": {"c": SKIP}}
ALL_OK: Layout = {"s1": {"a": OK}, "s2": {"c": OK}}
PHASES = {
    id(MIXED): FlowPhase.COMPLETED_WITH_FAILURES,
    id(STOPPED): FlowPhase.FAILED,
    id(CANCELLED): FlowPhase.CANCELLED,
    id(TIMED_OUT): FlowPhase.FAILED,
    id(ALL_OK): FlowPhase.SUCCEEDED,
}


def status_of(layout: Layout, phase: FlowPhase | None = None) -> TaskflowStatus:
    """A finished flow's status: every task ran once (attempt 0) unless it was SKIPPED."""
    stages = []
    for stage, tasks in layout.items():
        statuses = set(tasks.values())
        stage_status = (
            OK
            if statuses == {OK}
            else SKIP
            if statuses == {SKIP}
            else CANCEL
            if CANCEL in statuses
            else FAIL
        )
        stages.append(
            StageStatus(
                name=stage,
                id=task_id(UID, stage),
                status=stage_status,
                tasks=[_task(stage, name, outcome) for name, outcome in tasks.items()],
            )
        )
    return TaskflowStatus(
        phase=phase or PHASES[id(layout)],
        taskflowId=UID,
        eventSubscription="events",
        observedGeneration=1,
        createdAt=T0,
        startTime=iso(T0),
        completionTime=iso(T0 + 100),
        stages=stages,
        lastEventSeq=10,
        cancelledAt=iso(T0 + 50) if layout is CANCELLED else None,
    )


def _task(stage: str, name: str, outcome: Status) -> TaskStatus:
    task = TaskStatus(name=name, id=task_id(UID, stage, name), status=outcome)
    if outcome != SKIP:
        task.start_time = task.dispatch_time = iso(T0)
        task.end_time = iso(T0 + 10)
        task.attempts = [
            AttemptRecord(attempt=0, status=outcome, startTime=iso(T0), endTime=iso(T0 + 10))
        ]
    return task


def spec_of(
    layout: Layout, retry: dict[str, Any], *, exactly_once: bool, cancel: bool = False
) -> TaskflowSpec:
    return TaskflowSpec.model_validate(
        {
            "stages": [
                {
                    "name": stage,
                    "tasks": [
                        {"name": t, "taskDetails": {"serviceId": "svc", "actionName": t}}
                        for t in tasks
                    ],
                }
                for stage, tasks in layout.items()
            ],
            "options": {
                "continueOnTaskFailure": layout is MIXED,
                "exactlyOnceTaskExecution": exactly_once,
            },
            "retry": retry,
            "cancel": cancel,
        }
    )


def options(exactly_once: bool) -> OptionsOf:
    """Every task's options: the flow's, with or without exactlyOnceTaskExecution."""
    opts = effective_options(
        Options.model_validate({"exactlyOnceTaskExecution": exactly_once}), None
    )
    return lambda stage, task: opts


def request(retry: dict[str, Any]) -> RetryRequest:
    return RetryRequest.model_validate(retry)


def keys(*names: str) -> set[tuple[str, str]]:
    return {(n.split("/")[0], n.split("/")[1]) for n in names}


# -- refusals -----------------------------------------------------------------------------------

WHOLE = {"id": "r1"}

# (layout, phase override, retry, exactlyOnce, cancel, refusal: None or a fragment of it)
REFUSALS: dict[str, tuple[Layout, FlowPhase | None, dict[str, Any], bool, bool, str | None]] = {
    "running": (
        MIXED,
        FlowPhase.RUNNING,
        WHOLE,
        False,
        False,
        "the flow is RUNNING: only a finished flow can be retried",
    ),
    "pending": (MIXED, FlowPhase.PENDING, WHOLE, False, False, "the flow is PENDING"),
    "cancel-still-true": (
        CANCELLED,
        None,
        WHOLE,
        False,
        True,
        "spec.cancel is true: set it to false in the same patch as the retry",
    ),
    "unknown-stage": (
        MIXED,
        None,
        {"id": "r1", "stages": [{"name": "nope"}]},
        False,
        False,
        "unknown stage 'nope'",
    ),
    "unknown-stage-after-a-known-one": (
        MIXED,
        None,
        {"id": "r1", "stages": [{"name": "s1"}, {"name": "zz"}]},
        False,
        False,
        "unknown stage 'zz'",
    ),
    "unknown-task": (
        MIXED,
        None,
        {"id": "r1", "stages": [{"name": "s2", "tasks": ["zz"]}]},
        False,
        False,
        "unknown task 'zz' in stage 's2'",
    ),
    "succeeded-exactly-once-named": (
        MIXED,
        None,
        {"id": "r1", "stages": [{"name": "s1", "tasks": ["a"]}]},
        True,
        False,
        "task s1/a SUCCEEDED and exactlyOnceTaskExecution is true: it is never dispatched again",
    ),
    # Accepted by the refusal rules (the selection may still be empty: see below).
    "succeeded-exactly-once-named-failed-only": (
        MIXED,
        None,
        {"id": "r1", "stages": [{"name": "s1", "tasks": ["a"]}], "failedOnly": True},
        True,
        False,
        None,
    ),
    "succeeded-exactly-once-by-stage": (
        MIXED,
        None,
        {"id": "r1", "stages": [{"name": "s1"}]},
        True,
        False,
        None,
    ),
    "succeeded-named-without-exactly-once": (
        MIXED,
        None,
        {"id": "r1", "stages": [{"name": "s1", "tasks": ["a"]}]},
        False,
        False,
        None,
    ),
    "whole-flow": (MIXED, None, WHOLE, True, False, None),
    "succeeded-flow": (ALL_OK, None, WHOLE, False, False, None),
    "cancelled-flow-cancel-false": (CANCELLED, None, WHOLE, False, False, None),
}


@pytest.mark.parametrize("row", REFUSALS.values(), ids=REFUSALS.keys())
def test_retry_refusal(
    row: tuple[Layout, FlowPhase | None, dict[str, Any], bool, bool, str | None],
) -> None:
    layout, phase, retry, exactly_once, cancel, expected = row
    status = status_of(layout, phase)
    refusal = retry_refusal(
        request=request(retry), status=status, cancel=cancel, opts=options(exactly_once)
    )
    if expected is None:
        assert refusal is None
    else:
        assert refusal is not None and expected in refusal
    # decide acts on the same answer: refused with exactly that message, nothing else changed.
    d = decide(
        spec=spec_of(layout, retry, exactly_once=exactly_once, cancel=cancel),
        status=status,
        now=T0 + 1000,
        uid=UID,
        generation=1,
        event_subject="events",
    )
    assert d.status.retry is not None and d.status.retry.id == "r1"
    if refusal is not None:
        assert (d.status.retry.accepted, d.status.retry.message) == (False, refusal)
        assert [t.status for s in d.status.stages for t in s.tasks] == [
            t.status for s in status.stages for t in s.tasks
        ]


# -- selection ----------------------------------------------------------------------------------

# (layout, retry, exactlyOnce, the tasks that run again)
SELECTIONS: dict[str, tuple[Layout, dict[str, Any], bool, set[tuple[str, str]]]] = {
    "whole": (MIXED, WHOLE, False, keys("s1/a", "s1/b", "s2/c", "s2/d")),
    "whole-exactly-once-keeps-succeeded": (MIXED, WHOLE, True, keys("s1/b", "s2/d")),
    "failed-only": (MIXED, {"id": "r1", "failedOnly": True}, False, keys("s1/b", "s2/d")),
    "stage": (MIXED, {"id": "r1", "stages": [{"name": "s2"}]}, False, keys("s2/c", "s2/d")),
    "stage-exactly-once": (
        MIXED,
        {"id": "r1", "stages": [{"name": "s1"}]},
        True,
        keys("s1/b", "s2/d"),
    ),
    "task-of-the-last-stage": (
        MIXED,
        {"id": "r1", "stages": [{"name": "s2", "tasks": ["d"]}]},
        False,
        keys("s2/d"),
    ),
    # Later stages depended on the re-run work: what did not succeed runs again always, what
    # succeeded only under a plain retry without exactlyOnceTaskExecution.
    "earlier-task-reruns-later-stages": (
        MIXED,
        {"id": "r1", "stages": [{"name": "s1", "tasks": ["b"]}]},
        False,
        keys("s1/b", "s2/c", "s2/d"),
    ),
    "earlier-task-exactly-once-keeps-later-succeeded": (
        MIXED,
        {"id": "r1", "stages": [{"name": "s1", "tasks": ["b"]}]},
        True,
        keys("s1/b", "s2/d"),
    ),
    "earlier-task-failed-only-keeps-later-succeeded": (
        MIXED,
        {"id": "r1", "stages": [{"name": "s1", "tasks": ["b"]}], "failedOnly": True},
        False,
        keys("s1/b", "s2/d"),
    ),
    "skipped-stages-run-again": (
        STOPPED,
        {"id": "r1", "stages": [{"name": "s1", "tasks": ["b"]}]},
        True,
        keys("s1/b", "s2/c", "s2/d"),
    ),
    "failed-only-skipped-later-stages-too": (
        STOPPED,
        {"id": "r1", "failedOnly": True},
        False,
        keys("s1/b", "s2/c", "s2/d"),
    ),
    "failed-only-counts-cancelled": (
        CANCELLED,
        {"id": "r1", "failedOnly": True},
        True,
        keys("s1/b", "s2/c"),
    ),
    "failed-only-counts-timed-out": (
        TIMED_OUT,
        {"id": "r1", "failedOnly": True},
        False,
        keys("s1/a", "s2/c"),
    ),
    "failed-only-of-a-succeeded-task-is-empty": (
        MIXED,
        {"id": "r1", "stages": [{"name": "s1", "tasks": ["a"]}], "failedOnly": True},
        True,
        set(),
    ),
    "failed-only-of-a-succeeded-flow-is-empty": (
        ALL_OK,
        {"id": "r1", "failedOnly": True},
        False,
        set(),
    ),
    "succeeded-flow-exactly-once-is-empty": (ALL_OK, WHOLE, True, set()),
    "succeeded-flow": (ALL_OK, WHOLE, False, keys("s1/a", "s2/c")),
}


@pytest.mark.parametrize("row", SELECTIONS.values(), ids=SELECTIONS.keys())
def test_retry_selection(
    row: tuple[Layout, dict[str, Any], bool, set[tuple[str, str]]],
) -> None:
    layout, retry, exactly_once, expected = row
    status = status_of(layout)
    assert (
        retry_refusal(
            request=request(retry), status=status, cancel=False, opts=options(exactly_once)
        )
        is None
    )
    assert (
        retry_selection(request=request(retry), status=status, opts=options(exactly_once))
        == expected
    )
    # decide runs exactly the selection again (and refuses an empty one).
    d = decide(
        spec=spec_of(layout, retry, exactly_once=exactly_once),
        status=status,
        now=T0 + 1000,
        uid=UID,
        generation=1,
        event_subject="events",
    )
    ack = d.status.retry
    assert ack is not None
    if not expected:
        assert not ack.accepted and ack.message.startswith("nothing to retry")
        return
    assert ack.accepted and f"{len(expected)} task(s)" in ack.message
    again = {
        (s.name, t.name)
        for s in d.status.stages
        for t in s.tasks
        if t.status not in TERMINAL_TASK_STATUSES
    }
    assert again == expected
    kept = {
        (s.name, t.name): t.status
        for s in d.status.stages
        for t in s.tasks
        if (s.name, t.name) not in expected
    }
    assert kept == {
        (s, t): v for s, ts in layout.items() for t, v in ts.items() if (s, t) not in expected
    }


# -- reset --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("outcome", "attempt"),
    [(FAIL, 1), (OK, 1), (TIMEOUT, 1), (CANCEL, 1), (SKIP, 0)],
    ids=["failed", "succeeded", "timed-out", "cancelled", "skipped-never-ran"],
)
def test_reset_task_starts_a_new_run(outcome: Status, attempt: int) -> None:
    task = _task("s1", "a", outcome)
    history = list(task.attempts)
    reset_task(task)
    assert (task.status, task.attempt, task.run_start_attempt) == (Status.WAITING, attempt, attempt)
    assert task.attempts == history  # records of earlier runs stay
    assert (task.start_time, task.end_time, task.dispatch_time, task.deadline) == (None,) * 4
    assert (task.error, task.response, task.waiting_reason, task.expires_at) == (None,) * 4
