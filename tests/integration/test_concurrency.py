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


async def _until(predicate: Any, timeout: float = 15.0) -> None:
    for _ in range(int(timeout * 20)):
        if predicate():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the condition did not hold in time")


@pytest.mark.integration
async def test_a_limit_holds_across_an_operator_sigkill(
    operator, flows: Flows, nc, svc: str
) -> None:
    """The restarted operator resumes the running attempt and takes its slot again at once:
    the waiting flow does not start beside it, however long the restart (lease: 3 s)."""
    held: list[Any] = []
    await serve(nc, f"{svc}.configure", lambda m: held.append(m))
    await flows.create(flow_for(svc, "dev-9"), "a")
    await _until(lambda: held)
    await flows.create(flow_for(svc, "dev-9"), "b")
    await asyncio.sleep(1)
    assert len(held) == 1
    operator.kill(signal.SIGKILL)
    await asyncio.sleep(4)  # longer than the lease: only a resumed holder keeps the slot
    operator.start()
    await asyncio.sleep(8)
    assert len(held) == 1, "a second attempt ran beside the one still in the service"
    assert task_status(await flows.get("b"), "s", "cfg").get("waitingReason") == "Throttled"
    await nc.publish(held[0].reply, json.dumps({"success": True}).encode())
    await _until(lambda: len(held) == 2)  # a ended: its slot went to b
    await nc.publish(held[1].reply, json.dumps({"success": True}).encode())
    for name in ("a", "b"):
        assert (await flows.wait(name))["status"]["phase"] == "SUCCEEDED"


@pytest.mark.integration
async def test_a_slot_nobody_resumes_comes_back_when_its_lease_ends(
    operator, flows: Flows, nc, svc: str
) -> None:
    """The holder's flow was deleted while its operator was down: nobody renews its slot, and
    the lease (3 s) gives it back."""
    held: list[Any] = []
    await serve(nc, f"{svc}.configure", lambda m: held.append(m))
    await flows.create(flow_for(svc, "dev-8"), "a")
    await _until(lambda: held)
    await flows.create(flow_for(svc, "dev-8"), "b")
    await asyncio.sleep(1)
    operator.kill(signal.SIGKILL)
    await asyncio.to_thread(
        flows.custom.delete_namespaced_custom_object,
        "taskflow.dev",
        "v1alpha1",
        flows.namespace,
        "taskflows",
        "a",
    )
    operator.start()
    await _until(lambda: len(held) == 2)
    await nc.publish(held[1].reply, json.dumps({"success": True}).encode())
    assert (await flows.wait("b"))["status"]["phase"] == "SUCCEEDED"


@pytest.mark.integration
async def test_waiting_flows_are_served_in_order_of_readiness(
    operator, flows: Flows, nc, svc: str
) -> None:
    held: list[Any] = []
    await serve(nc, f"{svc}.configure", lambda m: held.append(m))
    await flows.create(flow_for(svc, "dev-7"), "first")
    await _until(lambda: held)
    for name in ("second", "third", "fourth"):  # each ready (and held back) after the last
        await flows.create(flow_for(svc, "dev-7"), name)
        await flows.wait(
            name,
            until=lambda b: (
                "status" in b and task_status(b, "s", "cfg").get("waitingReason") == "Throttled"
            ),
        )
    order = []
    for n in range(4):
        await _until(lambda n=n: len(held) == n + 1)
        order.append(json.loads(held[n].headers["taskflowExecutionContext"])["taskflow"]["id"])
        await nc.publish(held[n].reply, json.dumps({"success": True}).encode())
    uids = [
        (await flows.get(name))["metadata"]["uid"]
        for name in ("first", "second", "third", "fourth")
    ]
    assert order == uids
