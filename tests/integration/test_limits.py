"""ServiceLimit on the real servers: at most maxInFlight attempts at once across flows (and
across an operator SIGKILL), at most ratePerSecond starts, and maxInFlight: auto following the
live SDK instances times the capacity they advertise."""

from __future__ import annotations

import asyncio
import itertools
import json
import signal
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from kubernetes import client as k8s

from conftest import Flows, flow, task_status
from taskflow.sdk import Service, TaskContext

GROUP, VERSION, PLURAL = "taskflow.dev", "v1alpha1", "servicelimits"


class Limits:
    """ServiceLimits (cluster-scoped) made by one test, deleted after it."""

    def __init__(self, api: k8s.ApiClient) -> None:
        self.custom = k8s.CustomObjectsApi(api)
        self.made: list[str] = []

    async def create(self, name: str, spec: dict[str, Any]) -> None:
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "ServiceLimit",
            "metadata": {"name": name},
            "spec": spec,
        }
        await asyncio.to_thread(
            self.custom.create_cluster_custom_object, GROUP, VERSION, PLURAL, body
        )
        self.made.append(name)
        await asyncio.sleep(0.5)  # (the operator's watch sees it)

    async def get(self, name: str) -> dict[str, Any]:
        got: dict[str, Any] = await asyncio.to_thread(
            self.custom.get_cluster_custom_object, GROUP, VERSION, PLURAL, name
        )
        return got

    async def delete_all(self) -> None:
        for name in self.made:
            await asyncio.to_thread(
                self.custom.delete_cluster_custom_object, GROUP, VERSION, PLURAL, name
            )


@pytest.fixture
async def limits(kube: k8s.ApiClient) -> AsyncIterator[Limits]:
    made = Limits(kube)
    yield made
    await made.delete_all()


async def until(predicate: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "the condition did not hold in time"
        await asyncio.sleep(0.05)


class Held:
    """A service that keeps every request until the test answers it, counting how many it
    holds at once."""

    def __init__(self) -> None:
        self.open: list[Any] = []
        self.seen = 0
        self.most = 0

    async def on(self, msg: Any) -> None:
        self.open.append(msg)
        self.seen += 1
        self.most = max(self.most, len(self.open))

    async def answer(self, nc: Any, count: int = 1) -> None:
        for _ in range(count):
            msg = self.open.pop(0)
            await nc.publish(msg.reply, json.dumps({"success": True}).encode())


@pytest.mark.integration
async def test_max_in_flight_holds_across_flows_and_an_operator_sigkill(
    operator, flows: Flows, nc, svc: str, limits: Limits
) -> None:
    await limits.create(f"{svc}-limit", {"serviceId": svc, "maxInFlight": 2})
    held = Held()
    await nc.subscribe(f"{svc}.do", cb=held.on)
    for n in range(5):
        await flows.create(flow(svc, ["t"], options={"timeout": "120s"}), f"f{n}")
    await until(lambda: held.seen == 2)
    await asyncio.sleep(1)
    assert held.seen == 2
    throttled = [
        n
        for n in range(5)
        if task_status(await flows.get(f"f{n}"), "s1", "t").get("waitingReason") == "Throttled"
    ]
    assert len(throttled) == 3
    operator.kill(signal.SIGKILL)
    await asyncio.sleep(4)  # past the lease (3 s): only a resumed attempt keeps its slot
    operator.start()
    await asyncio.sleep(6)
    assert held.seen == 2 and held.most == 2
    while held.seen < 5 or held.open:
        await until(lambda: bool(held.open))
        await held.answer(nc)
        await asyncio.sleep(0.3)
    assert held.most <= 2
    for n in range(5):
        assert (await flows.wait(f"f{n}"))["status"]["phase"] == "SUCCEEDED"
    status = (await limits.get(f"{svc}-limit")).get("status") or {}
    assert status.get("limit") == 2


@pytest.mark.integration
async def test_rate_per_second_spaces_the_starts(
    operator, flows: Flows, nc, svc: str, limits: Limits
) -> None:
    await limits.create(f"{svc}-rate", {"serviceId": svc, "ratePerSecond": 4, "burst": 1})
    arrived: list[float] = []

    async def on(msg: Any) -> None:
        arrived.append(time.monotonic())
        await nc.publish(msg.reply, json.dumps({"success": True}).encode())

    await nc.subscribe(f"{svc}.do", cb=on)
    names = [f"t{i}" for i in range(8)]
    await flows.create(flow(svc, names), "burst")
    assert (await flows.wait("burst", timeout=60))["status"]["phase"] == "SUCCEEDED"
    assert len(arrived) == 8
    # 8 starts at 4/s with a burst of 1: the last at least 7/4 s after the first.
    assert arrived[-1] - arrived[0] >= 1.5, arrived
    gaps = [b - a for a, b in itertools.pairwise(arrived)]
    assert sum(1 for g in gaps if g < 0.1) <= 1, gaps  # (no burst beyond one token)


@pytest.mark.integration
async def test_auto_follows_the_live_instances_and_their_capacity(
    stack, operator, flows: Flows, nc, svc: str, limits: Limits
) -> None:
    """Two SDK instances, each serving one request at a time (capacity 1): auto comes to 2."""
    release = asyncio.Event()
    running: list[str] = []
    most = 0
    services = []
    for _ in range(2):
        service = Service(svc, nats_url=stack.nats.url, max_concurrency=1)

        @service.action("do")
        async def do(params: dict[str, Any], ctx: TaskContext) -> dict[str, Any]:
            nonlocal most
            running.append(ctx.task_name or "")
            most = max(most, len(running))
            await release.wait()
            running.remove(ctx.task_name or "")
            return params

        services.append(await service.start())
    try:
        await limits.create(f"{svc}-auto", {"serviceId": svc, "maxInFlight": "auto"})

        async def limit_in_force() -> Any:
            return ((await limits.get(f"{svc}-auto")).get("status") or {}).get("limit")

        deadline = time.monotonic() + 20
        while await limit_in_force() != 2:
            assert time.monotonic() < deadline, await limits.get(f"{svc}-auto")
            await asyncio.sleep(0.3)
        assert ((await limits.get(f"{svc}-auto"))["status"]).get("instances") == 2
        await flows.create(flow(svc, [f"t{i}" for i in range(6)]), "auto")

        def sent_and_held(body: dict[str, Any]) -> tuple[int, int]:
            tasks = ((body.get("status") or {}).get("stages") or [{}])[0].get("tasks") or []
            sent = sum(1 for t in tasks if t.get("status") == "RUNNING")
            return sent, sum(1 for t in tasks if t.get("waitingReason") == "Throttled")

        # (NATS gives each request to either instance of the queue group: count what the
        # operator sent, not which instance runs it)
        await flows.wait("auto", until=lambda b: sent_and_held(b) == (2, 4))
        await asyncio.sleep(1.5)
        assert sent_and_held(await flows.get("auto")) == (2, 4)
        release.set()
        assert (await flows.wait("auto", timeout=60))["status"]["phase"] == "SUCCEEDED"
        assert 1 <= most <= 2  # (NATS may give both to one instance, which runs one at a time)
    finally:
        release.set()
        for service in services:
            await service.stop(grace=0.5)


@pytest.mark.integration
async def test_a_service_limit_without_a_limit_is_refused_at_apply(
    kube: k8s.ApiClient, svc: str
) -> None:
    custom = k8s.CustomObjectsApi(kube)
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "ServiceLimit",
        "metadata": {"name": f"{svc}-empty"},
        "spec": {"serviceId": svc},
    }
    with pytest.raises(k8s.ApiException) as refused:
        await asyncio.to_thread(custom.create_cluster_custom_object, GROUP, VERSION, PLURAL, body)
    assert "maxInFlight, ratePerSecond or both" in str(refused.value.body)
    body["spec"] = {"serviceId": svc, "maxInFlight": 0}
    with pytest.raises(k8s.ApiException) as refused:
        await asyncio.to_thread(custom.create_cluster_custom_object, GROUP, VERSION, PLURAL, body)
    assert "maxInFlight" in str(refused.value.body)
