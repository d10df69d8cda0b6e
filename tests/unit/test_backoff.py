"""Retries that back off, and errors no retry can help: the options and the decisions by table."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from taskflow.api.spec import Options, TaskflowSpec
from taskflow.api.status import ErrorReason, Status, TaskError, TaskflowStatus
from taskflow.engine import Decision, Dispatch, Reply, decide, effective_options, parse_iso

UID = "00000000-0000-0000-0000-0000000000b0"
T0 = 1_700_000_000_000


def opts(**options: Any) -> Any:
    return effective_options(Options.model_validate(options), None)


def test_without_backoff_every_retry_waits_retry_delay() -> None:
    o = opts(retryDelay=500)
    assert [o.retry_delay(retries=n, spread=0.0) for n in range(4)] == [500] * 4


def test_backoff_multiplies_each_wait_up_to_max_delay() -> None:
    o = opts(retryDelay="1s", retryBackoff={"factor": 3, "maxDelay": "20s"})
    assert [o.retry_delay(retries=n, spread=0.0) for n in range(5)] == [
        1000,
        3000,
        9000,
        20000,
        20000,
    ]


def test_backoff_defaults_are_a_factor_of_two_and_five_minutes() -> None:
    o = opts(retryDelay="1m", retryBackoff={})
    assert [o.retry_delay(retries=n, spread=0.0) for n in range(4)] == [
        60_000,
        120_000,
        240_000,
        300_000,
    ]
    assert o.retry_delay(retries=100, spread=0.0) == 300_000  # no overflow, however many


def test_jitter_takes_off_at_most_its_fraction() -> None:
    o = opts(retryDelay="10s", retryBackoff={"factor": 1, "jitter": 0.5})
    assert o.retry_delay(retries=0, spread=0.0) == 10_000
    assert 5_000 <= o.retry_delay(retries=0, spread=0.999) <= 5_010
    assert o.retry_delay(retries=0, spread=0.5) == 7_500


def test_a_tasks_backoff_replaces_the_flows() -> None:
    o = effective_options(
        Options.model_validate({"retryBackoff": {"factor": 4}, "nonRetryableCodes": ["A"]}),
        Options.model_validate({"retryBackoff": {"factor": 1.5}}),
    )
    assert o.backoff_factor == 1.5 and o.non_retryable_codes == frozenset({"A"})


@pytest.mark.parametrize(
    "bad",
    [
        {"retryBackoff": {"factor": 0.5}},
        {"retryBackoff": {"factor": 11}},
        {"retryBackoff": {"jitter": 1.5}},
        {"retryBackoff": {"maxDelay": "8d"}},
        {"retryBackoff": {"other": 1}},
        {"nonRetryableCodes": [""]},
        {"nonRetryableCodes": ["x"] * 65},
    ],
)
def test_bad_backoff_options_are_refused(bad: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        Options.model_validate(bad)


def one_task(**options: Any) -> TaskflowSpec:
    return TaskflowSpec.model_validate(
        {
            "options": options,
            "stages": [
                {
                    "name": "s",
                    "tasks": [
                        {"name": "t", "taskDetails": {"serviceId": "svc", "actionName": "do"}}
                    ],
                }
            ],
        }
    )


def fail(spec: TaskflowSpec, decision: Decision, now: int, error: TaskError) -> Decision:
    task = decision.status.stages[0].tasks[0]
    return decide(
        spec=spec,
        status=decision.status,
        now=now,
        uid=UID,
        generation=1,
        event_subject="e",
        inputs=[Reply(stage="s", task="t", attempt=task.attempt, ok=False, error=error)],
    )


def run_failures(spec: TaskflowSpec, error: TaskError, times: int) -> list[int]:
    """Fail each attempt as soon as it is sent; the waits the engine chose, in ms."""
    now = T0
    decision = decide(
        spec=spec, status=TaskflowStatus(), now=now, uid=UID, generation=1, event_subject="e"
    )
    waits = []
    for _ in range(times):
        decision = fail(spec, decision, now, error)
        task = decision.status.stages[0].tasks[0]
        if task.status != Status.WAITING:
            break
        assert task.not_before is not None
        waits.append(parse_iso(task.not_before) - now)
        now = parse_iso(task.not_before)
        decision = decide(
            spec=spec, status=decision.status, now=now, uid=UID, generation=1, event_subject="e"
        )
        assert [e for e in decision.effects if isinstance(e, Dispatch)]
    return waits


def test_the_engine_waits_longer_before_each_retry() -> None:
    spec = one_task(maxRetries=4, retryDelay=100, retryBackoff={"factor": 2, "maxDelay": 500})
    assert run_failures(spec, TaskError(message="down", reason="Service"), 10) == [
        100,
        200,
        400,
        500,
    ]


def test_jittered_waits_are_within_bounds_and_the_same_when_decided_again() -> None:
    spec = one_task(maxRetries=5, retryDelay=1000, retryBackoff={"factor": 1, "jitter": 0.8})
    error = TaskError(message="down", reason="Service")
    waits = run_failures(spec, error, 10)
    assert len(waits) == 5 and all(200 <= w <= 1000 for w in waits)
    assert len(set(waits)) > 1  # spread out
    assert run_failures(spec, error, 10) == waits  # deterministic


@pytest.mark.parametrize(
    ("error", "options"),
    [
        (TaskError(message="bad request", code="INVALID", reason="Service", retryable=False), {}),
        (
            TaskError(message="no such device", code="NOT_FOUND", reason="Service"),
            {"nonRetryableCodes": ["NOT_FOUND"]},
        ),
    ],
)
def test_an_error_no_retry_can_help_fails_the_task_at_once(
    error: TaskError, options: dict[str, Any]
) -> None:
    spec = one_task(maxRetries=5, retryDelay=10, **options)
    assert run_failures(spec, error, 10) == []
    decision = decide(
        spec=spec, status=TaskflowStatus(), now=T0, uid=UID, generation=1, event_subject="e"
    )
    done = fail(spec, decision, T0, error)
    task = done.status.stages[0].tasks[0]
    assert task.status == Status.FAILED and task.attempt == 0
    assert task.error is not None and task.error.reason == ErrorReason.SERVICE


def test_other_codes_and_timeouts_are_still_retried() -> None:
    spec = one_task(maxRetries=2, retryDelay=10, nonRetryableCodes=["NOT_FOUND"])
    assert len(run_failures(spec, TaskError(message="x", code="BUSY", reason="Service"), 5)) == 2


def test_when_no_service_fail_ends_the_attempt_at_once_and_retries_per_max_retries() -> None:
    from taskflow.engine import NoResponders

    spec = one_task(maxRetries=1, retryDelay=10, whenNoService="fail")
    first = decide(
        spec=spec, status=TaskflowStatus(), now=T0, uid=UID, generation=1, event_subject="e"
    )
    gone = decide(
        spec=spec,
        status=first.status,
        now=T0 + 1,
        uid=UID,
        generation=1,
        event_subject="e",
        inputs=[NoResponders(stage="s", task="t", attempt=0)],
    )
    task = gone.status.stages[0].tasks[0]
    assert task.status == Status.WAITING and task.attempt == 1  # the retry
    assert task.attempts[0].error is not None
    assert task.attempts[0].error.reason == ErrorReason.NO_SERVICE
    waiting = decide(
        spec=one_task(maxRetries=1),
        status=first.status,
        now=T0 + 1,
        uid=UID,
        generation=1,
        event_subject="e",
        inputs=[NoResponders(stage="s", task="t", attempt=0)],
    )
    assert waiting.status.stages[0].tasks[0].waiting_reason == "NoResponders"  # the default
