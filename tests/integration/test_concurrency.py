"""Keyed concurrency on the real servers: at most ``limit`` attempts per key at once, across
flows, with slots that are leases in NATS KV (a killed operator's slots come back)."""

from __future__ import annotations

import asyncio
import json
import signal
from typing import Any

import pytest

from conftest import Flows, serve, task_status


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
