"""Heartbeats, the engine's half by table: a heartbeat moves the attempt's deadline, its progress
is kept and published at most once a second, and silence ends the attempt (reason Heartbeat)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from taskflow.api.spec import TaskflowSpec
from taskflow.api.status import ErrorReason, Status, TaskflowStatus
from taskflow.engine import Decision, Emit, Heartbeat, Reply, decide, parse_iso
from taskflow.wire.replies import MAX_PROGRESS_BYTES, read_heartbeat
from taskflow.wire.subjects import Subjects

UID = "00000000-0000-0000-0000-0000000000c0"
T0 = 1_700_000_000_000
SPEC = TaskflowSpec.model_validate(
    {
        "options": {"timeout": "1h", "heartbeatTimeout": "10s"},
        "stages": [
            {
                "name": "s",
                "tasks": [{"name": "t", "taskDetails": {"serviceId": "svc", "actionName": "do"}}],
            }
        ],
    }
)


def step(status: TaskflowStatus, now: int, *inputs: Any) -> Decision:
    return decide(
        spec=SPEC,
        status=status,
        now=now,
        uid=UID,
        generation=1,
        event_subject="e",
        inputs=list(inputs),
    )


def beat(progress: Any = None, attempt: int = 0) -> Heartbeat:
    return Heartbeat(stage="s", task="t", attempt=attempt, progress=progress)


def test_a_dispatch_sets_the_heartbeat_deadline_and_each_heartbeat_moves_it() -> None:
    first = step(TaskflowStatus(), T0)
    task = first.status.stages[0].tasks[0]
    assert task.heartbeat_deadline is not None
    assert parse_iso(task.heartbeat_deadline) == T0 + 10_000
    assert first.wake_at == T0 + 10_000  # before the hour-long timeout
    later = step(first.status, T0 + 8_000, beat())
    assert parse_iso(later.status.stages[0].tasks[0].heartbeat_deadline or "") == T0 + 18_000
    alive = step(later.status, T0 + 15_000)
    assert alive.status.stages[0].tasks[0].status == Status.RUNNING


def test_no_heartbeat_in_time_times_the_attempt_out() -> None:
    first = step(TaskflowStatus(), T0)
    done = step(first.status, T0 + 10_000)
    task = done.status.stages[0].tasks[0]
    assert task.status == Status.TIMED_OUT
    assert task.error is not None and task.error.reason == ErrorReason.HEARTBEAT
    assert "heartbeatTimeout of 10000 ms" in task.error.message
    assert task.heartbeat_deadline is None


def test_progress_is_kept_and_published_at_most_once_a_second() -> None:
    first = step(TaskflowStatus(), T0)
    one = step(first.status, T0 + 100, beat({"done": 1}))
    events = [e for e in one.effects if isinstance(e, Emit)]
    assert [(e.status, e.progress) for e in events] == [("RUNNING", {"done": 1})]
    two = step(one.status, T0 + 300, beat({"done": 2}))  # kept, not published yet
    assert two.status.stages[0].tasks[0].progress == {"done": 2}
    assert not [e for e in two.effects if isinstance(e, Emit)]
    three = step(two.status, T0 + 1_200, beat({"done": 3}))
    assert [e.progress for e in three.effects if isinstance(e, Emit)] == [{"done": 3}]
    same = step(three.status, T0 + 3_000, beat({"done": 3}))  # unchanged: no event
    assert not [e for e in same.effects if isinstance(e, Emit)]


def test_a_heartbeat_of_another_attempt_or_after_the_reply_changes_nothing() -> None:
    first = step(TaskflowStatus(), T0)
    stale = step(first.status, T0 + 9_000, beat(attempt=7))
    assert stale.status.stages[0].tasks[0].heartbeat_deadline == (
        first.status.stages[0].tasks[0].heartbeat_deadline
    )
    done = step(first.status, T0 + 100, Reply(stage="s", task="t", attempt=0, ok=True))
    after = step(done.status, T0 + 200, beat({"late": True}))
    assert after.status.stages[0].tasks[0].progress is None


def test_the_heartbeat_subject_is_signed_and_is_not_a_reply_subject() -> None:
    subjects = Subjects(key=b"k" * 32)
    subject = subjects.heartbeat(UID, "s", "t", 3)
    assert subjects.parse_heartbeat(subject) == (UID, "s", "t", 3)
    assert subjects.parse_reply(subject.replace("heartbeat", "reply", 1)) is None
    assert (
        subjects.parse_heartbeat(subjects.reply(UID, "s", "t", 3).replace("reply", "heartbeat", 1))
        is None
    )
    assert subjects.parse_heartbeat(subject[:-1] + "0") is None


@pytest.mark.parametrize(
    ("data", "progress"),
    [
        (b"", None),
        (b'{"progress": {"pct": 50}}', {"pct": 50}),
        (b"42", 42),
        (b"not json", None),
        (b"[" * 100 + b"]" * 100, None),
        (json.dumps({"progress": "x" * MAX_PROGRESS_BYTES}).encode(), None),
    ],
)
def test_any_heartbeat_body_is_a_heartbeat(data: bytes, progress: Any) -> None:
    assert read_heartbeat(stage="s", task="t", attempt=0, data=data).progress == progress


# -- on the real servers -------------------------------------------------------------------------
