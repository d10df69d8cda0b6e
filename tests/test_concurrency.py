"""Keyed concurrency: at most ``limit`` attempts per key at once, across flows, with slots that
are leases in NATS KV (a killed operator's slots come back). The engine's half by table, then
the real servers."""

from __future__ import annotations

import asyncio
import json
import signal
from typing import Any

import pytest

from conftest import Flows, serve, task_status
from taskflow.api.spec import TaskflowSpec
from taskflow.api.status import Status, TaskflowStatus
from taskflow.engine import Dispatch, Reply, Throttled, decide

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

    def admit(key: str, limit: int, holder: str) -> bool:
        if key in held:
            return False
        held.add(key)  # (the shell's view after it takes the slot)
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
        admit=lambda k, n, h: True,
    )
    again = decide(
        spec=spec(key="one"),
        status=first.status,
        now=T0 + 1,
        uid=UID,
        generation=1,
        event_subject="e",
        admit=lambda k, n, h: False,
        inputs=[Throttled(stage="s", task="cfg[0]", attempt=0)],
    )
    task = again.status.stages[0].tasks[0]
    assert task.status == Status.WAITING and task.waiting_reason == "Throttled"
    assert task.deadline is None and task.attempts == []  # nothing was sent


def flow_for(svc: str, device: str) -> dict[str, Any]:
    return {
        "stages": [
            {
                "name": "s",
                "tasks": [
                    {
                        "name": "cfg",
                        "params": {"device": device},
                        "concurrency": {"key": "${{ inputs.device }}"},
                        "taskDetails": {"serviceId": svc, "actionName": "configure"},
                    }
                ],
            }
        ],
        "inputs": {"device": device},
        "options": {"timeout": "60s"},
    }


@pytest.mark.integration
async def test_one_operation_per_device_across_flows(operator, flows: Flows, nc, svc: str) -> None:
    held: list[Any] = []
    await serve(nc, f"{svc}.configure", lambda m: held.append(m))
    await flows.create(flow_for(svc, "dev-1"), "a")
    await flows.create(flow_for(svc, "dev-1"), "b")
    await flows.create(flow_for(svc, "dev-2"), "c")
    await asyncio.sleep(2)
    devices = sorted(json.loads(m.data)["device"] for m in held)
    assert devices == ["dev-1", "dev-2"]  # one of a/b waits for dev-1's slot
    waiting = [
        n
        for n in ("a", "b")
        if task_status(await flows.get(n), "s", "cfg").get("waitingReason") == "Throttled"
    ]
    assert len(waiting) == 1
    first = next(m for m in held if json.loads(m.data)["device"] == "dev-1")
    await nc.publish(first.reply, json.dumps({"success": True}).encode())
    for _ in range(100):
        if len(held) == 3:
            break
        await asyncio.sleep(0.1)
    assert len(held) == 3  # the slot went to the waiting flow
    for msg in held[1:]:
        await nc.publish(msg.reply, json.dumps({"success": True}).encode())
    for name in ("a", "b", "c"):
        assert (await flows.wait(name))["status"]["phase"] == "SUCCEEDED"


@pytest.mark.integration
async def test_a_killed_operators_slot_comes_back_when_its_lease_ends(
    operator, flows: Flows, nc, svc: str
) -> None:
    """The suite's operator runs with --slot-lease 3s."""
    held: list[Any] = []
    await serve(nc, f"{svc}.configure", lambda m: held.append(m))
    await flows.create(flow_for(svc, "dev-9"), "a")
    for _ in range(100):
        if held:
            break
        await asyncio.sleep(0.05)
    await flows.create(flow_for(svc, "dev-9"), "b")
    await asyncio.sleep(1)
    assert len(held) == 1
    operator.kill(signal.SIGKILL)
    operator.start()
    for _ in range(150):  # a's lease lapses (nobody renews it): b gets the slot
        if len(held) == 2:
            break
        await asyncio.sleep(0.1)
    assert len(held) == 2
    for msg in held:
        await nc.publish(msg.reply, json.dumps({"success": True}).encode())
    for name in ("a", "b"):
        assert (await flows.wait(name))["status"]["phase"] == "SUCCEEDED"
