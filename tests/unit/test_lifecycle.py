"""Run lifecycle, the engine's half by table: suspend holds dispatches back, resume goes on, and
the TTL rules say when a finished flow goes."""

from __future__ import annotations

import json
from typing import Any

from taskflow.api.spec import TaskflowSpec
from taskflow.api.status import FlowPhase, Status, TaskflowStatus
from taskflow.engine import Decision, Dispatch, Emit, Reply, decide
from taskflow.shell.reaper import TtlDefaults, response_refs, summary, ttl_ms

UID = "00000000-0000-0000-0000-0000000000f0"
T0 = 1_700_000_000_000


def two_stages(**extra: Any) -> TaskflowSpec:
    return TaskflowSpec.model_validate(
        {
            "options": {"maxRetries": 1, "retryDelay": 100},
            "stages": [
                {
                    "name": "a",
                    "tasks": [{"name": "x", "taskDetails": {"serviceId": "s", "actionName": "x"}}],
                },
                {
                    "name": "b",
                    "tasks": [{"name": "y", "taskDetails": {"serviceId": "s", "actionName": "y"}}],
                },
            ],
            **extra,
        }
    )


def step(spec: TaskflowSpec, status: TaskflowStatus, now: int, *inputs: Any) -> Decision:
    return decide(
        spec=spec,
        status=status,
        now=now,
        uid=UID,
        generation=1,
        event_subject="e",
        inputs=list(inputs),
    )


def sent(decision: Decision) -> list[str]:
    return [e.task for e in decision.effects if isinstance(e, Dispatch)]


def test_a_suspended_flow_sends_nothing_new_and_resumes_where_it_was() -> None:
    running = step(two_stages(), TaskflowStatus(), T0)
    assert sent(running) == ["x"]
    held = two_stages(suspend=True)
    paused = step(held, running.status, T0 + 1)
    assert paused.status.suspended_at is not None
    cond = next(c for c in paused.status.conditions if c.type == "Suspended")
    assert cond.status == "True"
    assert [e.status for e in paused.effects if isinstance(e, Emit)] == ["SUSPENDED"]
    # The attempt in flight finishes and is recorded; the next stage does not start.
    done_x = step(held, paused.status, T0 + 2, Reply(stage="a", task="x", attempt=0, ok=True))
    assert done_x.status.stages[0].tasks[0].status == Status.SUCCEEDED
    assert sent(done_x) == [] and done_x.status.stages[1].status == Status.WAITING
    assert done_x.wake_at is None  # nothing to wake for while held
    resumed = step(two_stages(suspend=False), done_x.status, T0 + 3)
    assert sent(resumed) == ["y"] and resumed.status.suspended_at is None


def test_a_retry_delay_ends_while_suspended_and_waits_for_the_resume() -> None:
    running = step(two_stages(), TaskflowStatus(), T0)
    failed = step(
        two_stages(suspend=True),
        running.status,
        T0 + 1,
        Reply(stage="a", task="x", attempt=0, ok=False),
    )
    later = step(two_stages(suspend=True), failed.status, T0 + 10_000)
    assert sent(later) == [] and later.status.stages[0].tasks[0].status == Status.WAITING
    assert later.wake_at is None  # no busy loop on a passed notBefore
    assert sent(step(two_stages(), later.status, T0 + 10_001)) == ["x"]


def test_a_flow_may_be_created_suspended() -> None:
    created = step(two_stages(suspend=True), TaskflowStatus(), T0)
    assert sent(created) == [] and created.status.phase == FlowPhase.RUNNING
    assert created.status.suspended_at is not None


def body(phase: str, ttl: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "metadata": {"name": "f", "namespace": "n", "uid": "u", "generation": 1},
        "spec": {"ttl": ttl} if ttl else {"stages": []},
        "status": {
            "phase": phase,
            "observedGeneration": 1,
            "completionTime": "2026-01-01T00:00:00.000Z",
        },
    }


def test_the_ttl_of_each_outcome_and_the_operators_defaults() -> None:
    defaults = TtlDefaults(succeeded=1000, failed=None, cancelled=5)
    assert ttl_ms(body("SUCCEEDED"), defaults) == 1000
    assert ttl_ms(body("FAILED"), defaults) is None
    assert ttl_ms(body("COMPLETED_WITH_FAILURES", {"afterFailed": "2s"}), defaults) == 2000
    assert ttl_ms(body("CANCELLED", {"afterSucceeded": "1s"}), defaults) == 5
    assert ttl_ms(body("RUNNING", {"afterSucceeded": "1s"}), defaults) is None


def test_the_history_keeps_outcomes_not_responses() -> None:
    flow_body = {
        "metadata": {"name": "f", "namespace": "n", "uid": "u"},
        "spec": {
            "stages": [
                {
                    "name": "s",
                    "tasks": [
                        {"name": "t", "taskDetails": {"serviceId": "svc", "actionName": "do"}}
                    ],
                }
            ]
        },
        "status": {
            "phase": "SUCCEEDED",
            "stages": [
                {
                    "name": "s",
                    "status": "SUCCEEDED",
                    "tasks": [
                        {
                            "name": "t",
                            "status": "SUCCEEDED",
                            "attempt": 0,
                            "response": {"secret": 1},
                            "responseRef": "nats-object://taskflow-responses/u/s/t/0",
                        }
                    ],
                }
            ],
        },
    }
    kept = summary(flow_body)
    assert kept["stages"][0]["tasks"][0]["serviceId"] == "svc"
    assert "secret" not in json.dumps(kept)
    assert response_refs(flow_body) == ["u/s/t/0"]


# -- on the real servers -------------------------------------------------------------------------
