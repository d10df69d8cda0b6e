"""Tenant isolation on the real servers: what a service's reply or a flow's labels may claim
about other flows. A link counts only within the namespace and with an owner reference."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import client

from conftest import Flows, eventually, flow, serve, task_status
from taskflow.client import TaskflowClient


async def other_namespace(kube: client.ApiClient) -> Flows:
    name = f"t-other-{uuid.uuid4().hex[:8]}"
    await asyncio.to_thread(
        client.CoreV1Api(kube).create_namespace, client.V1Namespace(metadata={"name": name})
    )
    return Flows(kube, name)


async def test_a_child_in_another_namespace_fails_the_attempt_and_is_never_cancelled(
    operator, kube: client.ApiClient, flows: Flows, nc, svc: str
) -> None:
    victims = await other_namespace(kube)
    await serve(nc, f"{svc}.hold", lambda m: None)  # the victim's task stays running
    await victims.create(flow(svc, ["v"], action="hold"), "victim")
    await victims.wait("victim", until=lambda b: (b.get("status") or {}).get("phase") == "RUNNING")
    claim = {"success": True, "data": 1, "nestedTaskflows": [f"{victims.namespace}/victim"]}
    await serve(nc, f"{svc}.do", lambda m: claim)
    await flows.create(flow(svc, ["a"], ["b"]), "f")
    done = await flows.wait("f")
    a = task_status(done, "s1", "a")
    assert done["status"]["phase"] == "FAILED"
    assert a["error"]["reason"] == "Child"
    assert (
        f"child flow {victims.namespace}/victim is not in this flow's namespace"
        in (a["error"]["message"])
    )
    assert a["nestedTaskflows"] == []
    await flows.patch("f", {"spec": {"cancel": True}})
    await asyncio.sleep(1.0)
    victim = await victims.get("victim")
    assert victim["spec"].get("cancel") is not True
    assert victim["status"]["phase"] == "RUNNING"


async def test_a_child_that_does_not_exist_fails_the_attempt(
    operator, flows: Flows, nc, svc: str
) -> None:
    """Once a task waited for it forever, with no deadline."""
    await serve(
        nc,
        f"{svc}.do",
        lambda m: {"success": True, "nestedTaskflows": [f"{flows.namespace}/nobody"]},
    )
    await flows.create(flow(svc, ["a"]), "f")
    done = await flows.wait("f", timeout=15)
    a = task_status(done, "s1", "a")
    assert a["status"] == "FAILED" and a["error"]["reason"] == "Child"
    assert "does not exist" in a["error"]["message"]


@pytest.mark.parametrize(
    "metadata",
    [
        {"labels": {"taskflow.dev/parent-uid": "00000000-0000-0000-0000-000000000001"}},
        {"annotations": {"taskflow.dev/depth": "0"}},
        {"annotations": {"taskflow.dev/parent-context": '{"forged": true}'}},
    ],
    ids=["parent-uid", "depth", "parent-context"],
)
async def test_the_operators_labels_without_an_owner_reference_are_refused_at_apply(
    kube: client.ApiClient, flows: Flows, svc: str, metadata: dict[str, Any]
) -> None:
    """The admission policy the chart ships (and the dev stack installs)."""
    forged = {"metadata": {"name": "forged", **metadata}, "spec": flow(svc, ["x"])}
    with pytest.raises(client.ApiException) as refused:
        await flows.create(forged)
    assert refused.value.status == 403
    key = next(iter(next(iter(metadata.values()))))
    assert (
        f"taskflow.dev/* labels and annotations ({key}) are the operator's: only a child "
        "flow carries them, with taskflow.dev/parent-uid and an ownerReference to that "
        "Taskflow"
    ) in str(refused.value.body)
    assert await flows.list() == []
    # The same metadata given to produce is dropped, not refused: the flow is a plain one.
    tf = TaskflowClient(api_client=kube, namespace=flows.namespace)
    made = await tf.produce(forged, name="produced")
    assert made["success"], made
    body = await flows.get("produced")
    assert not [
        k
        for part in ("labels", "annotations")
        for k in (body["metadata"].get(part) or {})
        if k.startswith("taskflow.dev/")
    ]


@pytest.fixture
def without_admission_policy(kube: client.ApiClient) -> Iterator[None]:
    """As on a cluster without the policy (admissionPolicy.enabled=false, Kubernetes < 1.30)."""
    from taskflow.api.admission import NAME, policy

    api = client.AdmissionregistrationV1Api(kube)
    api.delete_validating_admission_policy_binding(NAME)
    try:
        yield
    finally:
        api.create_validating_admission_policy_binding(policy()[1])


async def test_a_flow_that_claims_a_parent_by_label_changes_nothing(
    operator, flows: Flows, nc, svc: str, without_admission_policy: None
) -> None:
    """Where no admission policy refuses it, a flow labelled as another flow's child, without
    the owner reference, does not finish that flow's task when it ends: the operator checks
    links itself."""
    held: list[Any] = []

    def hold(msg: Any) -> Any:
        if json.loads(msg.data)["task"] == "a":
            held.append(msg)
            return None
        return {"success": True, "data": "forged"}

    await serve(nc, f"{svc}.do", hold)
    parent = await flows.create(flow(svc, ["a"]), "parent")
    uid = parent["metadata"]["uid"]
    await eventually(lambda: held)
    before = operator.metrics().get("taskflow_forged_links_total", 0)
    forged = {
        "metadata": {
            "name": "forged",
            "labels": {"taskflow.dev/parent-uid": uid},
            "annotations": {"taskflow.dev/parent-task": "s1.a", "taskflow.dev/parent-attempt": "0"},
        },
        "spec": flow(svc, ["x"]),
    }
    for _ in range(100):  # (the binding's removal takes a moment to reach admission)
        try:
            await flows.create(forged)
            break
        except client.ApiException:
            await asyncio.sleep(0.1)
    assert (await flows.wait("forged"))["status"]["phase"] == "SUCCEEDED"
    await asyncio.sleep(1.0)
    assert operator.metrics().get("taskflow_forged_links_total", 0) > before
    still = await flows.get("parent")
    assert task_status(still, "s1", "a")["status"] == "RUNNING"
    assert task_status(still, "s1", "a")["nestedTaskflows"] == []  # (once: the forged one)
    await nc.publish(held[0].reply, json.dumps({"success": True, "data": "real"}).encode())
    done = await flows.wait("parent")
    assert done["status"]["phase"] == "SUCCEEDED"
    assert task_status(done, "s1", "a")["response"] == "real"
    assert task_status(done, "s1", "a")["nestedTaskflows"] == []


async def test_a_forged_reply_changes_nothing(operator, flows: Flows, nc, svc: str) -> None:
    """Everything a subscriber of the flow's events sees (uid, stage, task, attempt) names the
    reply subject but for its token: a reply forged on it, or with a guessed token, is
    ignored and counted; the service's real answer is recorded."""
    held: list[Any] = []
    await serve(nc, f"{svc}.do", lambda m: held.append(m))
    body = await flows.create(flow(svc, ["a"], options={"timeout": "60s"}), "f")
    uid = body["metadata"]["uid"]
    await eventually(lambda: held)
    before = operator.metrics().get("taskflow_forged_replies_total", 0)
    forged = json.dumps({"success": True, "data": {"forged": True}}).encode()
    await nc.publish(f"taskflow.reply.{uid}.s1.a.0", forged)
    await nc.publish(f"taskflow.reply.{uid}.s1.a.0.{'0' * 32}", forged)
    await nc.flush()
    await asyncio.sleep(0.5)
    assert operator.metrics().get("taskflow_forged_replies_total", 0) >= before + 2
    assert task_status(await flows.get("f"), "s1", "a")["status"] == "RUNNING"
    token = held[0].reply.rsplit(".", 1)[1]
    assert len(token) == 32 and token not in json.dumps(await flows.get("f"))
    await nc.publish(held[0].reply, json.dumps({"success": True, "data": "real"}).encode())
    done = await flows.wait("f")
    assert task_status(done, "s1", "a")["response"] == "real"
