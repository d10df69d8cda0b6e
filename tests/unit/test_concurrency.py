"""Keyed concurrency, the engine's half by table: an attempt waits while its key is at its limit,
and waits again when the slot is lost just before sending."""

from __future__ import annotations

from taskflow.api.spec import TaskflowSpec
from taskflow.api.status import Status, TaskflowStatus
from taskflow.engine import Ask, Dispatch, Reply, Throttled, decide, running_asks

UID = "00000000-0000-0000-0000-0000000000d0"
T0 = 1_700_000_000_000


def spec(key: str = "${{ item }}", limit: int = 1) -> TaskflowSpec:
    return TaskflowSpec.model_validate(
        {
            "stages": [
                {
                    "name": "s",
                    "tasks": [
                        {
                            "name": "cfg",
                            "forEach": {"items": ["dev-1", "dev-1", "dev-2"]},
                            "concurrency": {"key": key, "limit": limit},
                            "taskDetails": {"serviceId": "svc", "actionName": "configure"},
                        }
                    ],
                }
            ]
        }
    )


def test_an_attempt_waits_while_its_key_is_at_its_limit() -> None:
    held: set[str] = set()

    def admit(ask: Ask) -> bool:
        assert ask.key is not None and ask.service_id == "svc" and ask.action_name == "configure"
        if ask.key in held:
            return False
        held.add(ask.key)  # (the shell's view after it takes the slot)
        return True

    first = decide(
        spec=spec(),
        status=TaskflowStatus(),
        now=T0,
        uid=UID,
        generation=1,
        event_subject="e",
        admit=admit,
    )
    sent = [e for e in first.effects if isinstance(e, Dispatch)]
    assert [(d.task, d.slot, d.slot_limit) for d in sent] == [
        ("cfg[0]", "dev-1", 1),
        ("cfg[2]", "dev-2", 1),
    ]
    waiting = first.status.stages[0].tasks[1]
    assert waiting.status == Status.WAITING and waiting.waiting_reason == "Throttled"
    assert first.wake_at is not None  # (the attempts' deadlines; not a poll of the slot)
    held.discard("dev-1")
    done = decide(
        spec=spec(),
        status=first.status,
        now=T0 + 5,
        uid=UID,
        generation=1,
        event_subject="e",
        admit=admit,
        inputs=[Reply(stage="s", task="cfg[0]", attempt=0, ok=True)],
    )
    assert [e.task for e in done.effects if isinstance(e, Dispatch)] == ["cfg[1]"]


def test_a_slot_lost_just_before_sending_makes_the_attempt_wait_again() -> None:
    first = decide(
        spec=spec(key="one"),
        status=TaskflowStatus(),
        now=T0,
        uid=UID,
        generation=1,
        event_subject="e",
        admit=lambda ask: True,
    )
    again = decide(
        spec=spec(key="one"),
        status=first.status,
        now=T0 + 1,
        uid=UID,
        generation=1,
        event_subject="e",
        admit=lambda ask: False,
        inputs=[Throttled(stage="s", task="cfg[0]", attempt=0)],
    )
    task = again.status.stages[0].tasks[0]
    assert task.status == Status.WAITING and task.waiting_reason == "Throttled"
    assert task.deadline is None and task.attempts == []  # nothing was sent


def test_a_service_limit_holds_back_a_task_without_a_key() -> None:
    """The engine asks for every ACTION attempt (the shell knows the ServiceLimits): a task
    with no concurrency key waits too when its service says no."""
    plain = TaskflowSpec.model_validate(
        {
            "stages": [
                {
                    "name": "s",
                    "tasks": [
                        {
                            "name": "t",
                            "taskDetails": {"serviceId": "svc", "actionName": "configure"},
                        }
                    ],
                }
            ]
        }
    )
    asked: list[Ask] = []
    held = decide(
        spec=plain,
        status=TaskflowStatus(),
        now=T0,
        uid=UID,
        generation=1,
        event_subject="e",
        admit=lambda ask: bool(asked.append(ask)),
    )
    assert asked == [Ask(holder=f"{UID}/s/t/0", service_id="svc", action_name="configure")]
    task = held.status.stages[0].tasks[0]
    assert task.waiting_reason == "Throttled"
    assert not [e for e in held.effects if isinstance(e, Dispatch)]


def test_the_running_attempts_are_what_a_resumed_operator_holds_again() -> None:
    first = decide(
        spec=spec(),
        status=TaskflowStatus(),
        now=T0,
        uid=UID,
        generation=1,
        event_subject="e",
        admit=lambda ask: ask.key != "dev-1" or ask.holder.endswith("cfg[0]/0"),
    )
    asks = running_asks(spec=spec(), status=first.status, uid=UID, fetched=None)
    assert sorted((a.holder, a.key) for a in asks) == [
        (f"{UID}/s/cfg[0]/0", "dev-1"),
        (f"{UID}/s/cfg[2]/0", "dev-2"),
    ]  # (cfg[1] waits: it holds nothing)
