"""Heartbeats on the real servers: a long attempt stays alive while its SDK service heartbeats,
times out soon after it stops, and a forged heartbeat changes nothing."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from conftest import Flows, flow, task_status
from taskflow.engine import parse_iso
from taskflow.sdk import Service, TaskContext

# -- on the real servers -------------------------------------------------------------------------


@pytest.mark.integration
async def test_a_long_attempt_lives_while_it_heartbeats_and_dies_when_it_stops(
    operator, stack, flows: Flows, nc, svc: str, api_token: str
) -> None:
    service = Service(svc, nats_url=stack.nats.url, api_token=api_token)

    @service.action("long")
    async def long(params: Any, ctx: TaskContext) -> Any:
        for done in range(6):  # 1.8 s of work, three times the heartbeatTimeout
            assert await ctx.heartbeat({"done": done})
            await asyncio.sleep(0.3)
        return {"ok": True}

    @service.action("stuck")
    async def stuck(params: Any, ctx: TaskContext) -> Any:
        await ctx.heartbeat({"done": 0})
        await asyncio.sleep(30)  # then nothing: the service hangs
        return None

    await service.start()
    events: list[dict[str, Any]] = []
    try:
        spec = flow(
            svc, ["a"], options={"timeout": "60s", "heartbeatTimeout": "600ms"}, action="long"
        )
        spec["stages"].append(
            {
                "name": "s2",
                "tasks": [
                    {
                        "name": "b",
                        "taskDetails": {"serviceId": svc, "actionName": "stuck"},
                        "options": {"timeout": "60s", "heartbeatTimeout": "600ms"},
                    }
                ],
            }
        )
        created = await flows.create(spec, "f")
        uid = created["metadata"]["uid"]

        async def record(msg: Any) -> None:
            events.append(json.loads(msg.data))

        await nc.subscribe(f"taskflow.events.{uid}", cb=record)
        done = await flows.wait("f", timeout=30)
    finally:
        await service.stop(grace=0.1)
    a, b = task_status(done, "s1", "a"), task_status(done, "s2", "b")
    assert a["status"] == "SUCCEEDED" and a["progress"] == {"done": 5}
    assert b["status"] == "TIMED_OUT" and b["error"]["reason"] == "Heartbeat"
    ended = parse_iso(b["endTime"]) - parse_iso(b["startTime"])
    assert ended < 10_000  # the heartbeat window, not the minute-long timeout
    progress = [e["data"]["taskProgress"] for e in events if "taskProgress" in e["data"]]
    assert progress and progress[0] == {"done": 0}


@pytest.mark.integration
async def test_a_forged_heartbeat_keeps_nothing_alive(operator, flows: Flows, nc, svc: str) -> None:
    """Anyone may see a flow's events; only the request carries the heartbeat subject."""
    from conftest import serve

    held: list[Any] = []
    await serve(nc, f"{svc}.do", lambda m: held.append(m))
    created = await flows.create(
        flow(svc, ["t"], options={"timeout": "60s", "heartbeatTimeout": "800ms"}), "f"
    )
    uid = created["metadata"]["uid"]
    for _ in range(12):  # a forger heartbeats on every subject it can guess
        await nc.publish(f"taskflow.heartbeat.{uid}.s1.t.0", b"")
        await nc.publish(f"taskflow.heartbeat.{uid}.s1.t.0.{'0' * 32}", b"")
        await asyncio.sleep(0.1)
    done = await flows.wait("f", timeout=20)
    assert task_status(done, "s1", "t")["error"]["reason"] == "Heartbeat"
    assert held and "Taskflow-Heartbeat" in held[0].headers
