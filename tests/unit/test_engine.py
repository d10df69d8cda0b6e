"""The pure engine, table-driven: (spec, status, now, inputs) -> status + effects. No I/O.

Every test builds a spec from a small dict, starts from an empty status with ``decide`` at
``T0`` and feeds replies, timers and spec patches (cancel, retry) as later decisions.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from typing import Any

import pytest
import yaml

from taskflow.api.spec import Options, TaskflowSpec
from taskflow.api.status import FlowPhase, Status, TaskError, TaskflowStatus, TaskStatus
from taskflow.engine import (
    CancelChild,
    CancelNotice,
    ChildFinished,
    CreateChild,
    Decision,
    Dispatch,
    Emit,
    Input,
    NoResponders,
    Record,
    Reply,
    decide,
    effective_options,
    iso,
    parse_iso,
)
from taskflow.engine.engine import REDELIVERY_INTERVAL_MS, task_id
from taskflow.engine.options import DEFAULT_RETRY_DELAY_MS, DEFAULT_TIMEOUT_MS

UID = "00000000-0000-0000-0000-000000000001"
SUBJECT = f"taskflow.events.{UID}"
T0 = 1_700_000_000_000

# -- helpers ------------------------------------------------------------------------------------


def make_spec(doc: str | dict[str, Any], **patch: Any) -> TaskflowSpec:
    """A spec from YAML or a dict; a stage may be written ``{"s1": ["a", "b"]}``-style:

    ``stages`` as a mapping of stage name to task names (or task dicts) gives ACTION tasks
    on service ``svc``, action = task name; ``task_options`` maps "stage/task" to options.
    """
    body = yaml.safe_load(doc) if isinstance(doc, str) else dict(doc)
    stages = body.get("stages")
    task_options = body.pop("task_options", {})
    if isinstance(stages, dict):
        body["stages"] = [
            {
                "name": stage,
                "tasks": [
                    t
                    if isinstance(t, dict)
                    else {"name": t, "taskDetails": {"serviceId": "svc", "actionName": t}}
                    for t in tasks
                ],
            }
            for stage, tasks in stages.items()
        ]
    for stage in body["stages"]:
        for task in stage["tasks"]:
            key = f"{stage['name']}/{task['name']}"
            if key in task_options:
                task["options"] = task_options[key]
    body.update(patch)
    return TaskflowSpec.model_validate(body)


def with_(spec: TaskflowSpec, **patch: Any) -> TaskflowSpec:
    """The same spec after a ``kubectl patch`` of e.g. ``cancel`` or ``retry``."""
    body = spec.model_dump(by_alias=True, exclude_none=True)
    body.update(patch)
    return TaskflowSpec.model_validate(body)


def step(
    spec: TaskflowSpec,
    status: TaskflowStatus | None = None,
    now: int = T0,
    inputs: Sequence[Input] = (),
    generation: int = 1,
) -> Decision:
    return decide(
        spec=spec,
        status=status or TaskflowStatus(),
        now=now,
        inputs=inputs,
        uid=UID,
        generation=generation,
        event_subject=SUBJECT,
    )


def task(status: TaskflowStatus, stage: str, name: str) -> TaskStatus:
    for s in status.stages:
        if s.name == stage:
            for t in s.tasks:
                if t.name == name:
                    return t
    raise KeyError(f"{stage}/{name}")


def stage_status(status: TaskflowStatus, stage: str) -> Status:
    return next(s.status for s in status.stages if s.name == stage)


def of(effects: Iterable[object], kind: type) -> list[Any]:
    return [e for e in effects if isinstance(e, kind)]


def dispatched(decision: Decision) -> list[tuple[str, str, int]]:
    return [(d.stage, d.task, d.attempt) for d in of(decision.effects, Dispatch)]


def emits(decision: Decision) -> list[tuple[str, str, str | None, str | None]]:
    return [(e.kind, str(e.status), e.stage, e.task) for e in of(decision.effects, Emit)]


def ok(stage: str, name: str, attempt: int = 0, data: Any = None) -> Reply:
    return Reply(stage=stage, task=name, attempt=attempt, ok=True, data=data)


def fail(stage: str, name: str, attempt: int = 0, message: str = "boom") -> Reply:
    return Reply(
        stage=stage,
        task=name,
        attempt=attempt,
        ok=False,
        error=TaskError(message=message, code="E1", reason="Service"),
    )


def condition(status: TaskflowStatus, type_: str) -> tuple[str, str]:
    cond = next(c for c in status.conditions if c.type == type_)
    return cond.status, cond.reason


def assert_seq_contiguous(decisions: Iterable[Decision]) -> None:
    seqs = [e.seq for d in decisions for e in of(d.effects, Emit)]
    assert seqs == list(range(1, len(seqs) + 1))


TWO_STAGES = {"stages": {"s1": ["a", "b"], "s2": ["c"]}}


def run_flow(spec: TaskflowSpec, outcome: dict[str, bool], now: int = T0) -> Decision:
    """Run a flow to its end, answering every dispatch with ``outcome[task]`` (True = ok)."""
    decision = step(spec, now=now)
    for _ in range(100):
        if decision.status.phase in (
            FlowPhase.SUCCEEDED,
            FlowPhase.FAILED,
            FlowPhase.COMPLETED_WITH_FAILURES,
            FlowPhase.CANCELLED,
        ):
            return decision
        now += 10
        replies: list[Input] = [
            ok(s, t, a, data=f"{t}#{a}") if outcome[t] else fail(s, t, a)
            for s, t, a in dispatched(decision)
        ]
        decision = step(spec, decision.status, now, replies)
    raise AssertionError("the flow did not finish")


# -- init ---------------------------------------------------------------------------------------


def test_init_dispatches_stage_one_with_ordered_events() -> None:
    spec = make_spec(TWO_STAGES)
    d = step(spec)
    st = d.status
    assert st.phase == FlowPhase.RUNNING
    assert st.taskflow_id == UID
    assert st.event_subscription == SUBJECT
    assert st.created_at == T0
    assert st.start_time == iso(T0)
    assert st.observed_generation == 1
    assert [s.name for s in st.stages] == ["s1", "s2"]
    assert st.stages[0].id == task_id(UID, "s1") == str(uuid.uuid5(uuid.UUID(UID), "s1"))
    assert task(st, "s1", "a").id == str(uuid.uuid5(uuid.UUID(UID), "s1/a"))
    assert stage_status(st, "s1") == Status.RUNNING
    assert stage_status(st, "s2") == Status.WAITING
    assert task(st, "s2", "c").status == Status.WAITING
    for name in ("a", "b"):
        t = task(st, "s1", name)
        assert t.status == Status.RUNNING
        assert t.attempt == 0
        assert t.dispatch_time == t.start_time == iso(T0)
        assert t.deadline == iso(T0 + DEFAULT_TIMEOUT_MS)
        assert t.expires_at is None
    assert dispatched(d) == [("s1", "a", 0), ("s1", "b", 0)]
    assert emits(d) == [
        ("TASKFLOW", "RUNNING", None, None),
        ("STAGE", "RUNNING", "s1", None),
        ("TASK", "RUNNING", "s1", "a"),
        ("TASK", "RUNNING", "s1", "b"),
    ]
    assert [e.seq for e in of(d.effects, Emit)] == [1, 2, 3, 4]
    assert st.last_event_seq == 4
    assert d.durable is True
    assert d.changed is True
    assert d.wake_at == T0 + DEFAULT_TIMEOUT_MS
    assert [r.reason for r in of(d.effects, Record)] == ["Started"]
    assert condition(st, "Succeeded") == ("Unknown", "Running")
    assert st.progress == "0/3"
    assert st.current_stage == "1/2 s1"


def test_decide_does_not_mutate_its_input_and_is_deterministic() -> None:
    spec = make_spec(TWO_STAGES)
    first = step(spec)
    before = first.status.model_dump()
    again = step(spec, first.status, T0 + 5, [ok("s1", "a")])
    assert first.status.model_dump() == before
    same = step(spec, first.status, T0 + 5, [ok("s1", "a")])
    assert same.status.model_dump() == again.status.model_dump()
    assert same.effects == again.effects


def test_nothing_happened_is_no_change() -> None:
    spec = make_spec(TWO_STAGES)
    d = step(spec)
    idle = step(spec, d.status, T0 + 1000)
    assert idle.changed is False
    assert idle.durable is False
    assert idle.effects == []
    assert idle.status.model_dump() == d.status.model_dump()
    assert idle.wake_at == T0 + DEFAULT_TIMEOUT_MS


def test_new_generation_is_observed() -> None:
    spec = make_spec(TWO_STAGES)
    d = step(spec)
    d2 = step(spec, d.status, T0 + 1, generation=2)
    assert d2.status.observed_generation == 2
    assert d2.changed is True


# -- success ------------------------------------------------------------------------------------


def test_one_reply_alone_is_not_durable_and_stage_waits() -> None:
    spec = make_spec(TWO_STAGES)
    d1 = step(spec)
    d2 = step(spec, d1.status, T0 + 100, [ok("s1", "a", data={"x": 1})])
    a = task(d2.status, "s1", "a")
    assert a.status == Status.SUCCEEDED
    assert a.response == {"x": 1}
    assert a.end_time == iso(T0 + 100)
    assert [(r.attempt, r.status) for r in a.attempts] == [(0, Status.SUCCEEDED)]
    assert stage_status(d2.status, "s1") == Status.RUNNING
    assert dispatched(d2) == []
    assert emits(d2) == [("TASK", "SUCCEEDED", "s1", "a")]
    assert d2.changed is True
    assert d2.durable is False  # the reply stays in the durable stream until written
    assert d2.status.progress == "1/3"


def test_success_advances_to_next_stage_in_one_decision() -> None:
    spec = make_spec(TWO_STAGES)
    d1 = step(spec)
    d2 = step(spec, d1.status, T0 + 100, [ok("s1", "a", data=1), ok("s1", "b", data=2)])
    st = d2.status
    assert stage_status(st, "s1") == Status.SUCCEEDED
    assert st.stages[0].end_time == iso(T0 + 100)
    assert stage_status(st, "s2") == Status.RUNNING
    assert task(st, "s2", "c").status == Status.RUNNING
    assert dispatched(d2) == [("s2", "c", 0)]
    assert emits(d2) == [
        ("TASK", "SUCCEEDED", "s1", "a"),
        ("TASK", "SUCCEEDED", "s1", "b"),
        ("STAGE", "SUCCEEDED", "s1", None),
        ("STAGE", "RUNNING", "s2", None),
        ("TASK", "RUNNING", "s2", "c"),
    ]
    assert d2.durable is True
    assert st.current_stage == "2/2 s2"
    assert st.progress == "2/3"
    assert d2.wake_at == T0 + 100 + DEFAULT_TIMEOUT_MS

    d3 = step(spec, st, T0 + 200, [ok("s2", "c", data=3)])
    st = d3.status
    assert st.phase == FlowPhase.SUCCEEDED
    assert st.completion_time == iso(T0 + 200)
    assert condition(st, "Succeeded") == ("True", "Succeeded")
    assert emits(d3)[-2:] == [
        ("STAGE", "SUCCEEDED", "s2", None),
        ("TASKFLOW", "SUCCEEDED", None, None),
    ]
    assert [(r.reason, r.type) for r in of(d3.effects, Record)] == [("Succeeded", "Normal")]
    assert d3.wake_at is None
    assert d3.durable is True
    assert st.progress == "3/3"
    assert st.current_stage == "2/2 s2"
    assert_seq_contiguous([d1, d2, d3])

    # A finished flow stays finished.
    d4 = step(spec, st, T0 + 10_000_000)
    assert d4.changed is False and d4.effects == []


# -- failures and retries -----------------------------------------------------------------------


def test_failure_with_max_retries_waits_retry_delay_then_redispatches() -> None:
    spec = make_spec({"stages": {"s1": ["a"]}, "options": {"maxRetries": 2, "retryDelay": "5s"}})
    d = step(spec)
    d = step(spec, d.status, T0 + 100, [fail("s1", "a", 0, "first")])
    a = task(d.status, "s1", "a")
    assert a.status == Status.WAITING
    assert a.attempt == 1
    assert a.not_before == iso(T0 + 5100)
    assert a.waiting_reason == "RetryDelay"
    assert a.dispatch_time is None and a.deadline is None
    assert a.error is not None and a.error.message == "first"
    assert [(r.attempt, r.status, r.error.message if r.error else None) for r in a.attempts] == [
        (0, Status.FAILED, "first")
    ]
    assert a.attempts[0].start_time == iso(T0)
    assert a.attempts[0].end_time == iso(T0 + 100)
    # Subscribers see how attempt 0 ended.
    assert [(e.kind, e.status, e.attempt) for e in of(d.effects, Emit)] == [("TASK", "FAILED", 0)]
    assert dispatched(d) == []
    assert d.wake_at == T0 + 5100
    assert d.status.phase == FlowPhase.RUNNING

    early = step(spec, d.status, T0 + 5099)
    assert dispatched(early) == [] and early.changed is False

    d = step(spec, d.status, T0 + 5100)
    assert dispatched(d) == [("s1", "a", 1)]
    a = task(d.status, "s1", "a")
    assert a.status == Status.RUNNING
    assert a.dispatch_time == iso(T0 + 5100)
    assert a.deadline == iso(T0 + 5100 + DEFAULT_TIMEOUT_MS)
    assert a.start_time == iso(T0)  # the task's start, not the attempt's
    assert d.durable is True

    d = step(spec, d.status, T0 + 5200, [fail("s1", "a", 1, "second")])
    d = step(spec, d.status, T0 + 10_200)
    assert dispatched(d) == [("s1", "a", 2)]
    d = step(spec, d.status, T0 + 10_300, [fail("s1", "a", 2, "third")])
    a = task(d.status, "s1", "a")
    assert a.status == Status.FAILED
    assert a.attempt == 2
    assert a.error is not None and a.error.message == "third"
    assert [r.attempt for r in a.attempts] == [0, 1, 2]
    assert d.status.phase == FlowPhase.FAILED
    assert condition(d.status, "Succeeded") == ("False", "Failed")
    assert d.wake_at is None


def test_success_on_a_retry() -> None:
    spec = make_spec({"stages": {"s1": ["a"]}, "options": {"maxRetries": 3, "retryDelay": 0}})
    d = step(spec)
    d = step(spec, d.status, T0 + 100, [fail("s1", "a", 0)])
    assert dispatched(d) == [("s1", "a", 1)]  # no delay: redispatched in the same decision
    d = step(spec, d.status, T0 + 200, [ok("s1", "a", 1, data="yes")])
    a = task(d.status, "s1", "a")
    assert (a.status, a.attempt, a.response, a.error) == (Status.SUCCEEDED, 1, "yes", None)
    assert [r.status for r in a.attempts] == [Status.FAILED, Status.SUCCEEDED]
    assert d.status.phase == FlowPhase.SUCCEEDED


def test_default_is_no_retry() -> None:
    spec = make_spec({"stages": {"s1": ["a"]}})
    d = step(spec)
    d = step(spec, d.status, T0 + 1, [fail("s1", "a")])
    assert task(d.status, "s1", "a").status == Status.FAILED
    assert d.status.phase == FlowPhase.FAILED


# -- timeout ------------------------------------------------------------------------------------


def test_timeout_ends_attempt_at_deadline() -> None:
    spec = make_spec({"stages": {"s1": ["a"]}, "options": {"timeout": "2s"}})
    d = step(spec)
    assert d.wake_at == T0 + 2000
    before = step(spec, d.status, T0 + 1999)
    assert task(before.status, "s1", "a").status == Status.RUNNING
    d = step(spec, d.status, T0 + 2000)
    a = task(d.status, "s1", "a")
    assert a.status == Status.TIMED_OUT
    assert a.error is not None and a.error.reason == "Timeout"
    assert "2000 ms" in a.error.message
    assert [(r.attempt, r.status) for r in a.attempts] == [(0, Status.TIMED_OUT)]
    assert d.status.phase == FlowPhase.FAILED
    assert emits(d)[0] == ("TASK", "TIMED_OUT", "s1", "a")


def test_timeout_then_retry() -> None:
    spec = make_spec(
        {"stages": {"s1": ["a"]}, "options": {"timeout": 1000, "maxRetries": 1, "retryDelay": 500}}
    )
    d = step(spec)
    d = step(spec, d.status, T0 + 1000)
    a = task(d.status, "s1", "a")
    assert (a.status, a.attempt, a.not_before) == (Status.WAITING, 1, iso(T0 + 1500))
    d = step(spec, d.status, T0 + 1500)
    assert dispatched(d) == [("s1", "a", 1)]
    d = step(spec, d.status, T0 + 2500)
    assert task(d.status, "s1", "a").status == Status.TIMED_OUT
    assert d.status.phase == FlowPhase.FAILED


# -- maxAge and no responders -------------------------------------------------------------------


def test_no_responders_redelivers_same_attempt_then_expires_at_max_age() -> None:
    spec = make_spec({"stages": {"s1": ["a"]}, "options": {"maxAge": "3s", "timeout": "10s"}})
    d = step(spec)
    a = task(d.status, "s1", "a")
    assert a.expires_at == iso(T0 + 3000)
    # maxAge fails a task only while it waits: a RUNNING attempt is bounded by its deadline.
    assert d.wake_at == T0 + 10_000
    d = step(spec, d.status, T0 + 100, [NoResponders("s1", "a", 0)])
    a = task(d.status, "s1", "a")
    assert (a.status, a.attempt, a.waiting_reason) == (Status.WAITING, 0, "NoResponders")
    assert a.not_before == iso(T0 + 100 + REDELIVERY_INTERVAL_MS)
    assert a.dispatch_time == iso(T0)  # the attempt stands
    assert a.attempts == []
    assert d.wake_at == T0 + 100 + REDELIVERY_INTERVAL_MS

    d = step(spec, d.status, T0 + 600)
    assert dispatched(d) == [("s1", "a", 0)]  # redelivery keeps the attempt number
    assert emits(d) == []  # still the same attempt: no new RUNNING event
    a = task(d.status, "s1", "a")
    assert (a.status, a.dispatch_time, a.deadline) == (Status.RUNNING, iso(T0), iso(T0 + 10_000))

    d = step(spec, d.status, T0 + 2800, [NoResponders("s1", "a", 0)])
    assert task(d.status, "s1", "a").status == Status.WAITING
    assert d.wake_at == T0 + 3000  # expiresAt comes before the next redelivery (3300)

    d = step(spec, d.status, T0 + 3000)
    a = task(d.status, "s1", "a")
    assert a.status == Status.FAILED
    assert a.error is not None and a.error.reason == "Expired"
    assert "no service was listening" in a.error.message
    assert [(r.attempt, r.status, r.error.reason if r.error else None) for r in a.attempts] == [
        (0, Status.FAILED, "Expired")
    ]
    assert dispatched(d) == []
    assert d.status.phase == FlowPhase.FAILED


def test_no_responders_until_timeout_times_out() -> None:
    spec = make_spec({"stages": {"s1": ["a"]}, "options": {"timeout": "1s"}})
    d = step(spec)
    d = step(spec, d.status, T0 + 900, [NoResponders("s1", "a", 0)])
    assert d.wake_at == T0 + 1000  # the deadline, before the redelivery at 1400
    d = step(spec, d.status, T0 + 1000)
    a = task(d.status, "s1", "a")
    assert a.status == Status.TIMED_OUT
    assert a.error is not None and "no service was listening" in a.error.message


def test_no_retry_starts_after_max_age() -> None:
    spec = make_spec(
        {"stages": {"s1": ["a"]}, "options": {"maxAge": "3s", "maxRetries": 5, "retryDelay": "2s"}}
    )
    d = step(spec)
    d = step(spec, d.status, T0 + 500, [fail("s1", "a", 0)])
    assert task(d.status, "s1", "a").status == Status.WAITING  # retry at 2500 < 3000
    d = step(spec, d.status, T0 + 2500)
    assert dispatched(d) == [("s1", "a", 1)]
    assert task(d.status, "s1", "a").expires_at == iso(T0 + 3000)  # from the first dispatch
    d = step(spec, d.status, T0 + 2600, [fail("s1", "a", 1)])
    a = task(d.status, "s1", "a")
    assert a.status == Status.FAILED  # a retry at 4600 would start after maxAge
    assert a.attempt == 1
    assert d.status.phase == FlowPhase.FAILED


def test_waiting_retry_expires_when_woken_late() -> None:
    spec = make_spec(
        {"stages": {"s1": ["a"]}, "options": {"maxAge": "3s", "maxRetries": 5, "retryDelay": "2s"}}
    )
    d = step(spec)
    d = step(spec, d.status, T0 + 500, [fail("s1", "a", 0)])
    # The operator was down past maxAge: the waiting retry expires instead of starting.
    d = step(spec, d.status, T0 + 9000)
    a = task(d.status, "s1", "a")
    assert a.status == Status.FAILED
    assert a.error is not None and a.error.reason == "Expired"
    assert dispatched(d) == []


# -- continueOnTaskFailure ----------------------------------------------------------------------


def test_continue_on_task_failure_true_runs_later_stages() -> None:
    spec = make_spec({**TWO_STAGES, "options": {"continueOnTaskFailure": True}})
    d = step(spec)
    d = step(spec, d.status, T0 + 10, [fail("s1", "a"), ok("s1", "b")])
    assert stage_status(d.status, "s1") == Status.FAILED
    assert dispatched(d) == [("s2", "c", 0)]
    assert [r.reason for r in of(d.effects, Record)] == ["StageFailed"]
    d = step(spec, d.status, T0 + 20, [ok("s2", "c")])
    st = d.status
    assert st.phase == FlowPhase.COMPLETED_WITH_FAILURES
    assert condition(st, "Succeeded") == ("False", "CompletedWithFailures")
    assert stage_status(st, "s2") == Status.SUCCEEDED
    assert emits(d)[-1] == ("TASKFLOW", "COMPLETED_WITH_FAILURES", None, None)


def test_continue_on_task_failure_false_finishes_stage_then_skips_the_rest() -> None:
    spec = make_spec(
        {
            "stages": {"s1": ["a", "b"], "s2": ["c"], "s3": ["d"]},
            "options": {"continueOnTaskFailure": False},
        }
    )
    d = step(spec)
    d = step(spec, d.status, T0 + 10, [fail("s1", "a")])
    assert task(d.status, "s1", "a").status == Status.FAILED
    assert task(d.status, "s1", "b").status == Status.RUNNING  # still finishes
    assert stage_status(d.status, "s1") == Status.RUNNING
    assert d.status.phase == FlowPhase.RUNNING
    assert dispatched(d) == []
    d = step(spec, d.status, T0 + 20, [ok("s1", "b", data="done")])
    st = d.status
    assert task(st, "s1", "b").status == Status.SUCCEEDED
    assert task(st, "s1", "b").response == "done"
    assert stage_status(st, "s1") == Status.FAILED
    for name, t in (("s2", "c"), ("s3", "d")):
        assert stage_status(st, name) == Status.SKIPPED
        assert task(st, name, t).status == Status.SKIPPED
    assert st.phase == FlowPhase.FAILED
    assert dispatched(d) == []
    assert emits(d) == [
        ("TASK", "SUCCEEDED", "s1", "b"),
        ("STAGE", "FAILED", "s1", None),
        ("STAGE", "SKIPPED", "s2", None),
        ("STAGE", "SKIPPED", "s3", None),
        ("TASKFLOW", "FAILED", None, None),
    ]
    assert st.progress == "4/4"
    assert st.current_stage == "1/3 s1"  # the last stage that ran


# -- options ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flow", "task_", "expected"),
    [
        (None, None, (DEFAULT_TIMEOUT_MS, 0, DEFAULT_RETRY_DELAY_MS, None, False, False)),
        (
            {
                "timeout": "10s",
                "maxRetries": 2,
                "retryDelay": 100,
                "maxAge": "1m",
                "continueOnTaskFailure": True,
                "exactlyOnceTaskExecution": True,
            },
            None,
            (10_000, 2, 100, 60_000, True, True),
        ),
        (
            {"timeout": "10s", "maxRetries": 2},
            {"timeout": 1000},
            (1000, 2, DEFAULT_RETRY_DELAY_MS, None, False, False),
        ),
        (
            {"maxRetries": 3, "continueOnTaskFailure": True, "exactlyOnceTaskExecution": True},
            {"maxRetries": 0, "continueOnTaskFailure": False, "exactlyOnceTaskExecution": False},
            (DEFAULT_TIMEOUT_MS, 0, DEFAULT_RETRY_DELAY_MS, None, False, False),
        ),
        (
            {"retryDelay": "1s"},
            {"retryDelay": 0, "maxAge": "1h30m"},
            (DEFAULT_TIMEOUT_MS, 0, 0, 5_400_000, False, False),
        ),
    ],
    ids=["defaults", "flow-only", "task-timeout", "task-falsy-overrides", "task-delay-zero"],
)
def test_effective_options_task_over_flow_per_field(
    flow: dict[str, Any] | None, task_: dict[str, Any] | None, expected: tuple[Any, ...]
) -> None:
    opts = effective_options(
        Options.model_validate(flow) if flow is not None else None,
        Options.model_validate(task_) if task_ is not None else None,
    )
    assert (
        opts.timeout_ms,
        opts.max_retries,
        opts.retry_delay_ms,
        opts.max_age_ms,
        opts.continue_on_task_failure,
        opts.exactly_once_task_execution,
    ) == expected
    wire = opts.as_wire()
    assert wire["timeout"] == expected[0] and wire["maxRetries"] == expected[1]
    assert ("maxAge" in wire) == (expected[3] is not None)


def test_task_options_override_flow_options_in_the_engine() -> None:
    spec = make_spec(
        {
            "stages": {"s1": ["a", "b"], "s2": ["c"]},
            "options": {"timeout": "10s", "maxRetries": 1, "retryDelay": "1s"},
            "task_options": {
                "s1/a": {"timeout": "1s", "continueOnTaskFailure": True},
                "s1/b": {"retryDelay": "3s"},
            },
        }
    )
    d = step(spec)
    assert task(d.status, "s1", "a").deadline == iso(T0 + 1000)
    assert task(d.status, "s1", "b").deadline == iso(T0 + 10_000)
    assert d.wake_at == T0 + 1000
    d = step(spec, d.status, T0 + 100, [fail("s1", "b")])
    assert task(d.status, "s1", "b").not_before == iso(T0 + 3100)  # task's retryDelay
    d = step(spec, d.status, T0 + 1000)  # a times out; maxRetries 1 inherited from the flow
    a = task(d.status, "s1", "a")
    assert (a.status, a.attempt, a.not_before) == (Status.WAITING, 1, iso(T0 + 2000))
    d = step(spec, d.status, T0 + 2000)
    assert dispatched(d) == [("s1", "a", 1)]
    d = step(spec, d.status, T0 + 3000)  # a times out again: out of retries
    assert task(d.status, "s1", "a").status == Status.TIMED_OUT
    d = step(spec, d.status, T0 + 3100)
    d = step(spec, d.status, T0 + 3200, [ok("s1", "b", 1)])
    # a failed, but its own continueOnTaskFailure lets the flow go on.
    assert dispatched(d) == [("s2", "c", 0)]
    d = step(spec, d.status, T0 + 3300, [ok("s2", "c")])
    assert d.status.phase == FlowPhase.COMPLETED_WITH_FAILURES


# -- late and stale replies ---------------------------------------------------------------------


def test_late_reply_after_timeout_is_marked_and_changes_nothing() -> None:
    spec = make_spec({**TWO_STAGES, "options": {"timeout": "1s"}})
    d = step(spec)
    d = step(spec, d.status, T0 + 500, [ok("s1", "b")])
    d = step(spec, d.status, T0 + 1000)
    assert task(d.status, "s1", "a").status == Status.TIMED_OUT
    assert d.status.phase == FlowPhase.FAILED
    late = step(spec, d.status, T0 + 1500, [ok("s1", "a", 0, data="late")])
    a = task(late.status, "s1", "a")
    assert a.status == Status.TIMED_OUT
    assert a.response is None
    assert a.attempts[0].late_reply is True
    assert late.status.phase == FlowPhase.FAILED
    assert late.effects == []
    assert late.changed is True
    again = step(spec, late.status, T0 + 1600, [ok("s1", "a", 0, data="late")])
    assert again.changed is False


def test_stale_reply_for_an_old_attempt_is_ignored() -> None:
    spec = make_spec(
        {"stages": {"s1": ["a"]}, "options": {"maxRetries": 2, "retryDelay": 0, "timeout": "1s"}}
    )
    d = step(spec)
    d = step(spec, d.status, T0 + 1000)  # attempt 0 timed out, attempt 1 dispatched
    assert dispatched(d) == [("s1", "a", 1)]
    stale = step(spec, d.status, T0 + 1100, [ok("s1", "a", 0, data="old"), fail("s1", "a", 0)])
    a = task(stale.status, "s1", "a")
    assert (a.status, a.attempt, a.response) == (Status.RUNNING, 1, None)
    assert stale.effects == []
    assert stale.status.phase == FlowPhase.RUNNING
    # A reply for an attempt that was never sent, or for an unknown task, is ignored too.
    odd = step(
        spec,
        stale.status,
        T0 + 1200,
        [ok("s1", "a", 7), ok("s1", "nope"), NoResponders("s1", "a", 0)],
    )
    assert task(odd.status, "s1", "a").status == Status.RUNNING
    assert odd.effects == []


# -- cancel -------------------------------------------------------------------------------------


def test_cancel_cancels_running_tasks_and_skips_later_stages() -> None:
    spec = make_spec(
        {
            "stages": {"s1": ["a", "b", "w"], "s2": ["c"]},
            "task_options": {"s1/w": {"maxRetries": 1, "retryDelay": "10s"}},
        }
    )
    d = step(spec)
    d = step(spec, d.status, T0 + 10, [ok("s1", "a"), fail("s1", "w")])
    assert task(d.status, "s1", "w").waiting_reason == "RetryDelay"
    d = step(with_(spec, cancel=True), d.status, T0 + 20)
    st = d.status
    assert st.phase == FlowPhase.CANCELLED
    assert st.cancelled_at == iso(T0 + 20)
    assert task(st, "s1", "a").status == Status.SUCCEEDED  # finished work stays
    for name in ("b", "w"):
        t = task(st, "s1", name)
        assert t.status == Status.CANCELLED
        assert t.error is not None and t.error.reason == "Cancelled"
    assert stage_status(st, "s1") == Status.CANCELLED
    assert stage_status(st, "s2") == Status.SKIPPED
    assert task(st, "s2", "c").status == Status.SKIPPED
    # Only the attempt in flight gets a notice; the one waiting for its retry had none.
    assert of(d.effects, CancelNotice) == [CancelNotice(stage="s1", task="b", attempt=0)]
    assert dispatched(d) == []
    assert emits(d) == [
        ("TASK", "CANCELLED", "s1", "b"),
        ("TASK", "CANCELLED", "s1", "w"),
        ("STAGE", "CANCELLED", "s1", None),
        ("STAGE", "SKIPPED", "s2", None),
        ("TASKFLOW", "CANCELLED", None, None),
    ]
    assert condition(st, "Cancelled") == ("True", "Cancelled")
    assert condition(st, "Succeeded") == ("False", "Cancelled")
    assert d.durable is True
    assert d.wake_at is None
    # The cancel is acted on once.
    again = step(with_(spec, cancel=True), st, T0 + 30)
    assert again.changed is False and again.effects == []


def test_reply_that_arrived_before_the_cancel_was_seen_is_recorded() -> None:
    """Inputs queued before the decision that sees spec.cancel happened first: the reply is
    recorded, nothing new is dispatched, and the flow still ends CANCELLED."""
    spec = make_spec(TWO_STAGES)
    d = step(spec)
    d = step(with_(spec, cancel=True), d.status, T0 + 20, [ok("s1", "a", data="x")])
    assert task(d.status, "s1", "a").status == Status.SUCCEEDED
    assert task(d.status, "s1", "a").response == "x"
    assert d.status.phase == FlowPhase.CANCELLED
    assert dispatched(d) == []


def test_late_reply_after_cancel_is_recorded() -> None:
    spec = make_spec(TWO_STAGES)
    d = step(spec)
    d = step(with_(spec, cancel=True), d.status, T0 + 20)
    late = step(with_(spec, cancel=True), d.status, T0 + 30, [ok("s1", "a", 0, data="late")])
    a = task(late.status, "s1", "a")
    assert a.status == Status.CANCELLED
    assert [(r.attempt, r.status, r.late_reply) for r in a.attempts] == [
        (0, Status.CANCELLED, True)
    ]


def test_cancel_before_the_first_decision_skips_everything() -> None:
    spec = make_spec(TWO_STAGES, cancel=True)
    d = step(spec)
    assert d.status.phase == FlowPhase.CANCELLED
    assert dispatched(d) == []
    assert {s.status for s in d.status.stages} == {Status.SKIPPED}


def test_cancel_of_a_finished_flow_is_a_recorded_no_op() -> None:
    spec = make_spec({"stages": {"s1": ["a"]}})
    done = run_flow(spec, {"a": True})
    assert done.status.phase == FlowPhase.SUCCEEDED
    d = step(with_(spec, cancel=True), done.status, T0 + 1000)
    st = d.status
    assert st.phase == FlowPhase.SUCCEEDED
    assert task(st, "s1", "a").status == Status.SUCCEEDED
    assert st.cancelled_at == iso(T0 + 1000)
    cond = next(c for c in st.conditions if c.type == "Cancelled")
    assert (cond.status, cond.reason) == ("False", "AlreadyFinished")
    assert "SUCCEEDED" in cond.message
    assert d.changed is True
    assert of(d.effects, Emit) == [] and of(d.effects, CancelNotice) == []
    again = step(with_(spec, cancel=True), st, T0 + 2000)
    assert again.changed is False


def test_cancel_works_again_after_a_retry_of_a_cancelled_flow() -> None:
    spec = make_spec({"stages": {"s1": ["a"]}})
    d = step(spec)
    d = step(with_(spec, cancel=True), d.status, T0 + 10)
    assert d.status.phase == FlowPhase.CANCELLED
    d = step(with_(spec, cancel=False, retry={"id": "r1"}), d.status, T0 + 20)
    assert d.status.phase == FlowPhase.RUNNING
    assert dispatched(d) == [("s1", "a", 1)]
    d = step(with_(spec, cancel=True, retry={"id": "r1"}), d.status, T0 + 30)
    assert d.status.phase == FlowPhase.CANCELLED


# -- retry --------------------------------------------------------------------------------------


MIXED = {"stages": {"s1": ["a", "b"], "s2": ["c", "d"]}}
MIXED_OUTCOME = {"a": True, "b": False, "c": True, "d": False}


def finished(exactly_once: bool, *, cont: bool = True) -> tuple[TaskflowSpec, TaskflowStatus]:
    """A finished flow: s1 a ok, b failed; s2 c ok, d failed (continueOnTaskFailure)."""
    spec = make_spec(
        {
            **MIXED,
            "options": {"continueOnTaskFailure": cont, "exactlyOnceTaskExecution": exactly_once},
        }
    )
    done = run_flow(spec, MIXED_OUTCOME)
    return spec, done.status


def test_retry_whole_flow_exactly_once_keeps_succeeded_tasks() -> None:
    spec, st = finished(exactly_once=True)
    assert st.phase == FlowPhase.COMPLETED_WITH_FAILURES
    d = step(with_(spec, retry={"id": "r1"}), st, T0 + 1000)
    s = d.status
    assert s.phase == FlowPhase.RUNNING
    assert s.retry is not None and (s.retry.id, s.retry.accepted) == ("r1", True)
    assert condition(s, "RetryAccepted") == ("True", "Accepted")
    assert dispatched(d) == [("s1", "b", 1)]
    assert task(s, "s1", "a").status == Status.SUCCEEDED
    assert task(s, "s1", "a").response == "a#0"
    assert task(s, "s2", "c").status == Status.SUCCEEDED
    assert task(s, "s2", "d").status == Status.WAITING
    assert task(s, "s1", "b").run_start_attempt == 1
    assert [r.reason for r in of(d.effects, Record)] == ["RetryStarted"]
    assert emits(d)[0] == ("TASKFLOW", "RUNNING", None, None)
    assert d.durable is True
    d = step(with_(spec, retry={"id": "r1"}), s, T0 + 1100, [ok("s1", "b", 1)])
    assert dispatched(d) == [("s2", "d", 1)]  # c is never dispatched again
    d = step(with_(spec, retry={"id": "r1"}), d.status, T0 + 1200, [ok("s2", "d", 1)])
    assert d.status.phase == FlowPhase.SUCCEEDED
    b = task(d.status, "s1", "b")
    assert [(r.attempt, r.status) for r in b.attempts] == [
        (0, Status.FAILED),
        (1, Status.SUCCEEDED),
    ]


def test_retry_whole_flow_without_exactly_once_reruns_every_task() -> None:
    spec, st = finished(exactly_once=False)
    d = step(with_(spec, retry={"id": "r1"}), st, T0 + 1000)
    assert dispatched(d) == [("s1", "a", 1), ("s1", "b", 1)]
    s = d.status
    assert task(s, "s1", "a").response is None
    assert task(s, "s2", "c").status == Status.WAITING
    assert task(s, "s2", "d").status == Status.WAITING
    assert stage_status(s, "s2") == Status.WAITING
    assert s.retry is not None and "4 task(s)" in s.retry.message
    assert s.progress == "0/4"
    assert s.completion_time is None


def test_retry_failed_only() -> None:
    spec, st = finished(exactly_once=False)
    d = step(with_(spec, retry={"id": "r1", "failedOnly": True}), st, T0 + 1000)
    assert dispatched(d) == [("s1", "b", 1)]
    s = d.status
    assert task(s, "s1", "a").status == Status.SUCCEEDED
    assert task(s, "s2", "c").status == Status.SUCCEEDED
    assert task(s, "s2", "d").status == Status.WAITING
    assert s.progress == "2/4"


def test_retry_given_stages() -> None:
    spec, st = finished(exactly_once=False)
    d = step(with_(spec, retry={"id": "r1", "stages": [{"name": "s2"}]}), st, T0 + 1000)
    assert dispatched(d) == [("s2", "c", 1), ("s2", "d", 1)]
    s = d.status
    assert stage_status(s, "s1") == Status.FAILED  # untouched
    assert task(s, "s1", "b").status == Status.FAILED
    assert task(s, "s1", "a").attempt == 0
    assert s.current_stage == "2/2 s2"


def test_retry_given_tasks() -> None:
    spec, st = finished(exactly_once=False)
    retry = {"id": "r1", "stages": [{"name": "s2", "tasks": ["d"]}]}
    d = step(with_(spec, retry=retry), st, T0 + 1000)
    assert dispatched(d) == [("s2", "d", 1)]
    s = d.status
    assert task(s, "s2", "c").status == Status.SUCCEEDED
    assert task(s, "s2", "c").attempt == 0
    assert task(s, "s1", "b").status == Status.FAILED
    d = step(with_(spec, retry=retry), s, T0 + 1100, [ok("s2", "d", 1)])
    # b still failed, under continueOnTaskFailure.
    assert d.status.phase == FlowPhase.COMPLETED_WITH_FAILURES
    assert task(d.status, "s2", "d").status == Status.SUCCEEDED


def test_retry_of_a_task_in_an_earlier_stage_reruns_later_stages() -> None:
    spec, st = finished(exactly_once=False, cont=False)
    assert st.phase == FlowPhase.FAILED
    assert stage_status(st, "s2") == Status.SKIPPED
    retry = {"id": "r1", "stages": [{"name": "s1", "tasks": ["b"]}]}
    d = step(with_(spec, retry=retry), st, T0 + 1000)
    assert dispatched(d) == [("s1", "b", 1)]
    assert task(d.status, "s1", "a").status == Status.SUCCEEDED
    assert task(d.status, "s2", "c").status == Status.WAITING  # was SKIPPED
    d = step(with_(spec, retry=retry), d.status, T0 + 1100, [ok("s1", "b", 1)])
    assert dispatched(d) == [("s2", "c", 0), ("s2", "d", 0)]  # never ran before: attempt 0


@pytest.mark.parametrize(
    ("retry", "fragment"),
    [
        ({"id": "r1", "stages": [{"name": "nope"}]}, "unknown stage 'nope'"),
        ({"id": "r1", "stages": [{"name": "s1", "tasks": ["zz"]}]}, "unknown task 'zz'"),
        ({"id": "r1", "stages": [{"name": "s1", "tasks": ["a"]}]}, "exactlyOnceTaskExecution"),
        (
            {"id": "r1", "stages": [{"name": "s1", "tasks": ["a"]}], "failedOnly": True},
            "nothing to retry",
        ),
    ],
    ids=["unknown-stage", "unknown-task", "succeeded-exactly-once", "empty-selection"],
)
def test_retry_refusals_are_reported(retry: dict[str, Any], fragment: str) -> None:
    spec, st = finished(exactly_once=True)
    d = step(with_(spec, retry=retry), st, T0 + 1000)
    s = d.status
    assert s.phase == FlowPhase.COMPLETED_WITH_FAILURES
    assert s.retry is not None
    assert (s.retry.id, s.retry.accepted) == ("r1", False)
    assert fragment in s.retry.message
    cond = next(c for c in s.conditions if c.type == "RetryAccepted")
    assert (cond.status, cond.reason) == ("False", "Refused")
    assert fragment in cond.message
    assert [(r.reason, r.type) for r in of(d.effects, Record)] == [("RetryRefused", "Warning")]
    assert dispatched(d) == [] and of(d.effects, Emit) == []
    assert [t.status for _, t in ((0, t) for s_ in s.stages for t in s_.tasks)] == [
        t.status for s_ in st.stages for t in s_.tasks
    ]
    assert d.changed and d.durable
    # Refused once, not again for the same id.
    again = step(with_(spec, retry=retry), s, T0 + 2000)
    assert again.changed is False


def test_retry_of_a_running_flow_is_refused() -> None:
    spec = make_spec(TWO_STAGES)
    d = step(spec)
    d = step(with_(spec, retry={"id": "r1"}), d.status, T0 + 10)
    s = d.status
    assert s.phase == FlowPhase.RUNNING
    assert s.retry is not None and not s.retry.accepted
    assert "RUNNING" in s.retry.message
    assert condition(s, "RetryAccepted") == ("False", "Refused")
    assert task(s, "s1", "a").attempt == 0
    assert dispatched(d) == []


def test_retry_with_cancel_still_true_is_refused() -> None:
    spec = make_spec({"stages": {"s1": ["a"]}})
    d = step(spec)
    d = step(with_(spec, cancel=True), d.status, T0 + 10)
    d = step(with_(spec, cancel=True, retry={"id": "r1"}), d.status, T0 + 20)
    assert d.status.phase == FlowPhase.CANCELLED
    assert d.status.retry is not None and not d.status.retry.accepted
    assert "spec.cancel" in d.status.retry.message


def test_same_retry_id_acts_once() -> None:
    spec, st = finished(exactly_once=False)
    retried = with_(spec, retry={"id": "r1", "failedOnly": True})
    d = step(retried, st, T0 + 1000)
    assert dispatched(d) == [("s1", "b", 1)]
    d = step(retried, d.status, T0 + 1100, [fail("s1", "b", 1)])
    d = step(retried, d.status, T0 + 1200, [fail("s2", "d", 1)])
    assert d.status.phase == FlowPhase.COMPLETED_WITH_FAILURES
    # The same manifest again (e.g. re-applied): nothing happens.
    same = step(retried, d.status, T0 + 5000)
    assert same.changed is False and same.effects == []
    # A new id is a new request.
    d = step(with_(spec, retry={"id": "r2", "failedOnly": True}), d.status, T0 + 6000)
    assert dispatched(d) == [("s1", "b", 2)]
    assert d.status.retry is not None and d.status.retry.id == "r2"


def test_retry_counts_max_retries_per_run() -> None:
    spec = make_spec({"stages": {"s1": ["a"]}, "options": {"maxRetries": 1, "retryDelay": 0}})
    d = step(spec)
    d = step(spec, d.status, T0 + 1, [fail("s1", "a", 0)])
    d = step(spec, d.status, T0 + 2, [fail("s1", "a", 1)])
    assert d.status.phase == FlowPhase.FAILED
    retried = with_(spec, retry={"id": "r1"})
    d = step(retried, d.status, T0 + 10)
    assert dispatched(d) == [("s1", "a", 2)]
    d = step(retried, d.status, T0 + 11, [fail("s1", "a", 2)])
    assert dispatched(d) == [("s1", "a", 3)]  # the new run has its own maxRetries
    d = step(retried, d.status, T0 + 12, [fail("s1", "a", 3)])
    assert d.status.phase == FlowPhase.FAILED
    assert [r.attempt for r in task(d.status, "s1", "a").attempts] == [0, 1, 2, 3]


# -- wake_at, progress, current stage -----------------------------------------------------------


def test_wake_at_is_the_earliest_deadline_or_not_before() -> None:
    spec = make_spec(
        {
            "stages": {"s1": ["a", "b", "c"]},
            "task_options": {
                "s1/a": {"timeout": "5s"},
                "s1/b": {"timeout": "2s"},
                "s1/c": {"timeout": "9s", "maxRetries": 1, "retryDelay": 300},
            },
        }
    )
    d = step(spec)
    assert d.wake_at == T0 + 2000
    d = step(spec, d.status, T0 + 100, [ok("s1", "b"), fail("s1", "c")])
    assert d.wake_at == T0 + 400  # c's notBefore
    d = step(spec, d.status, T0 + 400)
    assert d.wake_at == T0 + 5000  # a's deadline; c's new deadline is T0+9400
    d = step(spec, d.status, T0 + 500, [ok("s1", "a")])
    assert d.wake_at == T0 + 9400


def test_progress_and_current_stage_strings() -> None:
    spec = make_spec(
        {
            "stages": {
                "createGroup": ["g"],
                "addApplianceToGroups": [f"t{i}" for i in range(8)],
                "notify": ["n1", "n2"],
            }
        }
    )
    d = step(spec)
    assert (d.status.current_stage, d.status.progress) == ("1/3 createGroup", "0/11")
    d = step(spec, d.status, T0 + 1, [ok("createGroup", "g")])
    d = step(spec, d.status, T0 + 2, [ok("addApplianceToGroups", f"t{i}") for i in range(6)])
    assert d.status.current_stage == "2/3 addApplianceToGroups"
    assert d.status.progress == "7/11"
    d = step(
        spec, d.status, T0 + 3, [ok("addApplianceToGroups", "t6"), ok("addApplianceToGroups", "t7")]
    )
    assert (d.status.current_stage, d.status.progress) == ("3/3 notify", "9/11")
    d = step(spec, d.status, T0 + 4, [ok("notify", "n1"), ok("notify", "n2")])
    assert (d.status.current_stage, d.status.progress) == ("3/3 notify", "11/11")
    assert d.status.phase == FlowPhase.SUCCEEDED


def test_event_sequence_is_contiguous_across_a_whole_run() -> None:
    spec = make_spec({**MIXED, "options": {"continueOnTaskFailure": True}})
    decisions = [step(spec)]
    now = T0
    while decisions[-1].status.phase == FlowPhase.RUNNING:
        now += 10
        replies: list[Input] = [
            ok(s, t, a) if MIXED_OUTCOME[t] else fail(s, t, a)
            for s, t, a in dispatched(decisions[-1])
        ]
        decisions.append(step(spec, decisions[-1].status, now, replies))
    assert_seq_contiguous(decisions)
    assert decisions[-1].status.last_event_seq == sum(len(of(d.effects, Emit)) for d in decisions)


# -- nested TASKFLOW tasks ----------------------------------------------------------------------


NESTED = {
    "stages": [
        {
            "name": "s1",
            "tasks": [
                {
                    "name": "child",
                    "type": "TASKFLOW",
                    "taskflow": {
                        "stages": [
                            {
                                "name": "x",
                                "tasks": [
                                    {
                                        "name": "y",
                                        "taskDetails": {"serviceId": "svc", "actionName": "y"},
                                    }
                                ],
                            }
                        ]
                    },
                },
            ],
        },
    ]
}


def test_taskflow_task_creates_a_child_and_finishes_with_it() -> None:
    spec = make_spec(NESTED)
    d = step(spec)
    assert of(d.effects, CreateChild) == [CreateChild(stage="s1", task="child", attempt=0)]
    assert dispatched(d) == []
    d = step(
        spec, d.status, T0 + 10, [ChildFinished("s1", "child", "ns/c1", Status.RUNNING, attempt=0)]
    )
    t = task(d.status, "s1", "child")
    assert t.nested_taskflows == ["ns/c1"]
    assert t.nested_active_running_taskflow_ids == ["ns/c1"]
    assert t.status == Status.RUNNING
    d = step(
        spec,
        d.status,
        T0 + 20,
        [ChildFinished("s1", "child", "ns/c1", Status.SUCCEEDED, summary={"ok": 1}, attempt=0)],
    )
    t = task(d.status, "s1", "child")
    assert (t.status, t.response, t.nested_active_running_taskflow_ids) == (
        Status.SUCCEEDED,
        {"ok": 1},
        [],
    )
    assert d.status.phase == FlowPhase.SUCCEEDED


def test_cancel_cascades_to_running_children() -> None:
    spec = make_spec(NESTED)
    d = step(spec)
    d = step(
        spec, d.status, T0 + 10, [ChildFinished("s1", "child", "ns/c1", Status.RUNNING, attempt=0)]
    )
    d = step(with_(spec, cancel=True), d.status, T0 + 20)
    assert of(d.effects, CancelChild) == [CancelChild(child="ns/c1")]
    assert of(d.effects, CancelNotice) == []
    assert d.status.phase == FlowPhase.CANCELLED


def test_failed_child_fails_the_task() -> None:
    spec = make_spec(NESTED)
    d = step(spec)
    # The shell reports a child RUNNING as soon as it created it, then its end.
    d = step(
        spec,
        d.status,
        T0 + 10,
        [
            ChildFinished("s1", "child", "ns/c1", Status.RUNNING, attempt=0),
            ChildFinished("s1", "child", "ns/c1", Status.FAILED, attempt=0),
        ],
    )
    t = task(d.status, "s1", "child")
    assert t.status == Status.FAILED
    assert t.error is not None and t.error.reason == "Child" and "ns/c1" in t.error.message
    assert d.status.phase == FlowPhase.FAILED


# -- the helper itself --------------------------------------------------------------------------


def test_make_spec_from_yaml() -> None:
    spec = make_spec("""
        options: {timeout: 1m30s}
        stages:
          - name: s1
            tasks:
              - name: a
                taskDetails: {serviceId: svc, actionName: a}
    """)
    assert spec.stages[0].tasks[0].task_details is not None
    assert effective_options(spec.options, None).timeout_ms == 90_000
    d = step(spec)
    assert task(d.status, "s1", "a").deadline == iso(T0 + 90_000)
    assert parse_iso(iso(T0 + 1)) == T0 + 1


def test_child_of_an_earlier_attempt_changes_nothing() -> None:
    spec = make_spec(NESTED)
    d = step(spec)
    d = step(
        spec,
        d.status,
        T0 + 10,
        [ChildFinished("s1", "child", "ns/old", Status.SUCCEEDED, attempt=5)],
    )
    t = task(d.status, "s1", "child")
    assert (t.status, t.nested_taskflows) == (Status.RUNNING, [])


def test_action_whose_service_started_children_ends_with_them() -> None:
    spec = make_spec({"stages": {"s1": ["a"], "s2": ["b"]}, "options": {"timeout": "1s"}})
    d = step(spec)
    reply = Reply(
        stage="s1", task="a", attempt=0, ok=True, data={"started": 2}, children=("ns/k1", "ns/k2")
    )
    d = step(spec, d.status, T0 + 100, [reply])
    a = task(d.status, "s1", "a")
    assert (a.status, a.waiting_reason, a.deadline) == (Status.RUNNING, "Children", None)
    assert a.nested_active_running_taskflow_ids == ["ns/k1", "ns/k2"]
    assert a.response == {"started": 2}
    d = step(spec, d.status, T0 + 5000)  # the reply came: the timeout no longer applies
    assert task(d.status, "s1", "a").status == Status.RUNNING
    d = step(
        spec, d.status, T0 + 6000, [ChildFinished("s1", "a", "ns/k1", Status.SUCCEEDED, attempt=0)]
    )
    a = task(d.status, "s1", "a")
    assert (a.status, a.nested_active_running_taskflow_ids) == (Status.RUNNING, ["ns/k2"])
    d = step(
        spec, d.status, T0 + 7000, [ChildFinished("s1", "a", "ns/k2", Status.SUCCEEDED, attempt=0)]
    )
    a = task(d.status, "s1", "a")
    assert (a.status, a.response) == (Status.SUCCEEDED, {"started": 2})
    assert a.nested_taskflows == ["ns/k1", "ns/k2"]
    assert dispatched(d) == [("s2", "b", 0)]


def test_waiting_for_a_services_children_is_bounded_by_max_age() -> None:
    spec = make_spec({"stages": {"s1": ["a"]}, "options": {"timeout": "1s", "maxAge": "10s"}})
    d = step(spec)
    reply = Reply(stage="s1", task="a", attempt=0, ok=True, children=("ns/k1", "ns/k2"))
    d = step(spec, d.status, T0 + 100, [reply])
    d = step(
        spec, d.status, T0 + 200, [ChildFinished("s1", "a", "ns/k1", Status.SUCCEEDED, attempt=0)]
    )
    assert d.wake_at == T0 + 10_000  # the end of the budget, not the reply's timeout
    d = step(spec, d.status, T0 + 9_999)
    assert task(d.status, "s1", "a").status == Status.RUNNING
    d = step(spec, d.status, T0 + 10_000)
    a = task(d.status, "s1", "a")
    assert (a.status, a.error.reason if a.error else None) == (Status.FAILED, "Expired")
    assert "while waiting for its child flows" in (a.error.message if a.error else "")
    assert of(d.effects, CancelChild) == [CancelChild(child="ns/k2")]
    assert d.status.phase == FlowPhase.FAILED


def test_cancel_cascades_to_children_started_by_a_service() -> None:
    spec = make_spec({"stages": {"s1": ["a"]}})
    d = step(spec)
    reply = Reply(stage="s1", task="a", attempt=0, ok=True, children=("ns/k1",))
    d = step(spec, d.status, T0 + 100, [reply])
    d = step(with_(spec, cancel=True), d.status, T0 + 200)
    assert task(d.status, "s1", "a").status == Status.CANCELLED
    assert of(d.effects, CancelChild) == [CancelChild(child="ns/k1")]


def test_exactly_once_never_resends_a_timed_out_attempt_on_its_own() -> None:
    """The outcome of a timed-out attempt is unknown: under exactlyOnceTaskExecution it is not
    retried automatically (the service may have done the work); a flow retry can."""
    from taskflow.api import TaskflowSpec, TaskflowStatus
    from taskflow.engine import Dispatch, decide

    spec = TaskflowSpec.model_validate(
        {
            "options": {
                "timeout": 100,
                "maxRetries": 3,
                "retryDelay": 0,
                "exactlyOnceTaskExecution": True,
            },
            "stages": [
                {
                    "name": "s",
                    "tasks": [{"name": "t", "taskDetails": {"serviceId": "a", "actionName": "b"}}],
                }
            ],
        }
    )
    uid = "00000000-0000-0000-0000-000000000001"
    first = decide(
        spec=spec, status=TaskflowStatus(), now=0, uid=uid, generation=1, event_subject="e"
    )
    later = decide(
        spec=spec, status=first.status, now=100, uid=uid, generation=1, event_subject="e"
    )
    task = later.status.stages[0].tasks[0]
    assert task.status == "TIMED_OUT"
    assert not [e for e in later.effects if isinstance(e, Dispatch)]
    assert later.status.phase == "FAILED"
