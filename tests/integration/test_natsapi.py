"""The operator's NATS API on real servers: the operator's own endpoints, and ``serve_api`` with
an allow-list of namespaces (a request for another namespace is refused)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from kubernetes import client as k8s

from conftest import ROOT, Flows, flow, task_status
from integration.test_client import extract_example, one_task, seed_schema, serve, succeed
from taskflow.shell.natsapi import serve_api


async def call(
    nc: Any, subject: str, request: Any, timeout: float = 20, token: str | None = None
) -> dict[str, Any]:
    data = request if isinstance(request, bytes) else json.dumps(request).encode()
    headers = {"Authorization": f"Bearer {token}"} if token else None
    reply = await nc.request(subject, data, timeout=timeout, headers=headers)
    result: dict[str, Any] = json.loads(reply.data)
    return result


@pytest.fixture
async def restricted(kube: k8s.ApiClient, nc, namespace: str) -> AsyncIterator[str]:
    """``serve_api`` limited to the test's namespace, on a prefix of its own."""
    prefix = f"test.api.{uuid.uuid4().hex[:8]}"
    await serve_api(nc, kube, namespaces=[namespace], prefix=prefix, authorize=False)
    yield prefix


async def wait_phase(
    nc: Any, prefix: str, ident: str, phases: set[str], token: str | None = None
) -> dict[str, Any]:
    for _ in range(300):
        res = await call(nc, f"{prefix}.details", {"taskflowId": ident}, token=token)
        assert res["success"], res
        if res["data"]["phase"] in phases:
            return dict(res["data"])
        await asyncio.sleep(0.1)
    raise AssertionError(f"{ident} never reached {phases}")


async def test_the_operator_serves_produce_details_cancel_and_retry(
    operator, nc, svc: str, namespace: str, api_token: str
) -> None:
    await serve(nc, f"{svc}-group.createGroup", succeed)
    failing = {"on": True}

    async def appliance(params: dict[str, Any], _msg: Any) -> dict[str, Any]:
        if failing["on"] and params["applianceId"] == "vions56x":
            return {"success": False, "error": {"message": "unreachable", "code": "DOWN"}}
        return {"success": True, "data": params["applianceId"]}

    await serve(nc, f"{svc}-appliance.AddApplianceToGroup", appliance)
    schema = seed_schema(svc)
    schema["options"]["retryDelay"] = 0
    schema["stages"][1]["tasks"][0]["options"] = {"maxRetries": 0}

    res = await call(
        nc, "taskflow.api.produce", {"namespace": namespace, "schema": schema}, token=api_token
    )

    assert res["success"], res
    assert set(res["data"]) == {"taskflowId", "eventSubscription"}
    uid = res["data"]["taskflowId"]
    assert res["data"]["eventSubscription"] == f"taskflow.events.{uid}"
    tree = await wait_phase(nc, "taskflow.api", uid, {"COMPLETED_WITH_FAILURES"}, token=api_token)
    alpha = next(t for t in tree["stages"][1]["tasks"] if t["name"] == "addApplianceAlpha")
    assert alpha["status"] == "FAILED" and alpha["error"]["code"] == "DOWN"

    failing["on"] = False
    retried = await call(
        nc,
        "taskflow.api.retry",
        {
            "taskflowId": uid,
            "stages": [{"stageId": tree["stages"][1]["id"], "taskIds": [alpha["id"]]}],
        },
        token=api_token,
    )
    assert retried["success"] and retried["data"]["accepted"], retried
    tree = await wait_phase(nc, "taskflow.api", uid, {"SUCCEEDED"}, token=api_token)
    assert tree["progress"] == "3/3"

    by_name = await call(
        nc, "taskflow.api.details", {"taskflowId": f"{namespace}/{tree['name']}"}, token=api_token
    )
    assert by_name["data"]["taskflowId"] == uid

    running = await call(
        nc,
        "taskflow.api.produce",
        {"namespace": namespace, "name": "held", "schema": one_task(f"{svc}-nobody")},
        token=api_token,
    )
    await wait_phase(
        nc, "taskflow.api", running["data"]["taskflowId"], {"RUNNING"}, token=api_token
    )
    cancelled = await call(
        nc, "taskflow.api.cancel", {"taskflowId": f"{namespace}/held"}, token=api_token
    )
    assert cancelled["success"], cancelled
    assert cancelled["data"]["acknowledged"] is True
    assert cancelled["data"]["phase"] == "CANCELLED"


async def test_every_call_is_authorized_as_kubernetes_would(
    operator, kube: k8s.ApiClient, nc, svc: str, namespace: str, flows: Flows, api_token: str
) -> None:
    """No token, a token Kubernetes does not accept, a ServiceAccount without rights, and one
    with rights in another namespace only: each refused, and nothing changes."""
    from conftest import service_account_token

    reader = service_account_token(kube, namespace, "reader", verbs=["get"])
    other = f"{namespace[:50]}-auth"
    k8s.CoreV1Api(kube).create_namespace(k8s.V1Namespace(metadata={"name": other}))
    outsider = service_account_token(kube, other, "outsider", verbs=["get", "create", "patch"])
    produce = {"namespace": namespace, "schema": one_task(svc)}

    none = await call(nc, "taskflow.api.produce", produce)
    assert none["error"]["code"] == "Unauthorized"
    assert "bearer token" in none["error"]["message"]
    forged = await call(nc, "taskflow.api.produce", produce, token="not-a-token")
    assert forged["error"] == {
        "message": "the bearer token was not accepted by Kubernetes",
        "code": "Unauthorized",
    }
    read_only = await call(nc, "taskflow.api.produce", produce, token=reader)
    assert read_only["error"] == {
        "code": "Forbidden",
        "message": f"system:serviceaccount:{namespace}:reader may not create "
        f"taskflows in namespace {namespace}",
    }
    elsewhere = await call(nc, "taskflow.api.produce", produce, token=outsider)
    assert elsewhere["error"]["code"] == "Forbidden"
    assert await flows.list() == []

    await serve(nc, f"{svc}.act", succeed)
    made = await call(nc, "taskflow.api.produce", produce, token=api_token)
    assert made["success"], made
    uid = made["data"]["taskflowId"]
    seen = await call(nc, "taskflow.api.details", {"taskflowId": uid}, token=reader)
    assert seen["success"] and seen["data"]["taskflowId"] == uid
    for verb in ("cancel", "retry"):
        refused = await call(nc, f"taskflow.api.{verb}", {"taskflowId": uid}, token=reader)
        assert refused["error"]["code"] == "Forbidden", refused
        assert f"may not patch taskflows in namespace {namespace}" in refused["error"]["message"]
    assert (await call(nc, "taskflow.api.details", {"taskflowId": uid}, token=outsider))["error"][
        "code"
    ] == "Forbidden"
    body = (await flows.list())[0]
    assert body["spec"].get("cancel") is None and body["spec"].get("retry") is None


async def test_produce_with_an_invalid_schema_returns_the_api_servers_message(
    restricted: str, nc, namespace: str, flows: Flows
) -> None:
    schema = one_task("svc")
    schema["stages"][0]["tasks"][0]["taskDetails"]["actionName"] = "x>"

    res = await call(nc, f"{restricted}.produce", {"namespace": namespace, "schema": schema})

    assert res["success"] is False
    assert res["error"]["code"] == "Invalid"
    assert "actionName" in res["error"]["message"]
    assert await flows.list() == []


async def test_a_request_for_another_namespace_is_refused(
    restricted: str, nc, kube: k8s.ApiClient, namespace: str, flows: Flows, operator, svc: str
) -> None:
    other = f"{namespace[:50]}-other"
    k8s.CoreV1Api(kube).create_namespace(k8s.V1Namespace(metadata={"name": other}))
    elsewhere = Flows(kube, other)
    await serve(nc, f"{svc}.act", succeed)
    foreign = await elsewhere.create({"spec": one_task(svc)}, name="foreign")
    refusal = f"namespace {other!r} is not allowed here (allowed: {namespace})"

    produce = await call(nc, f"{restricted}.produce", {"namespace": other, "schema": one_task(svc)})
    details = await call(nc, f"{restricted}.details", {"taskflowId": f"{other}/foreign"})
    by_uid = await call(nc, f"{restricted}.details", {"taskflowId": foreign["metadata"]["uid"]})
    cancel = await call(nc, f"{restricted}.cancel", {"taskflowId": f"{other}/foreign"})
    retry = await call(nc, f"{restricted}.retry", {"taskflowId": "foreign", "namespace": other})

    for res in (produce, details, cancel, retry):
        assert res == {"success": False, "error": {"message": refusal, "code": "Forbidden"}}
    assert by_uid["success"] is False and by_uid["error"]["code"] in ("Forbidden", "NotFound")
    assert [f["metadata"]["name"] for f in await elsewhere.list()] == ["foreign"]
    assert (await elsewhere.get("foreign"))["spec"].get("cancel") is None

    allowed = await call(
        nc, f"{restricted}.produce", {"namespace": namespace, "schema": one_task(svc)}
    )
    assert allowed["success"], allowed
    done = await wait_phase(nc, restricted, allowed["data"]["taskflowId"], {"SUCCEEDED"})
    assert done["namespace"] == namespace


async def test_bad_requests_get_clear_answers(restricted: str, nc) -> None:
    assert await call(nc, f"{restricted}.details", b"not json") == {
        "success": False,
        "error": {
            "message": "the request is not JSON: Expecting value: line 1 column 1 (char 0)",
            "code": "BadRequest",
        },
    }
    assert await call(nc, f"{restricted}.details", b"[1]") == {
        "success": False,
        "error": {"message": "the request is a JSON object", "code": "BadRequest"},
    }
    assert await call(nc, f"{restricted}.details", {}) == {
        "success": False,
        "error": {
            "message": '"taskflowId" (a uid or "namespace/name") is required',
            "code": "BadRequest",
        },
    }
    assert (await call(nc, f"{restricted}.produce", {"schema": {"stages": []}}))["error"] == {
        "message": '"namespace" is required',
        "code": "BadRequest",
    }
    assert (await call(nc, f"{restricted}.produce", {"namespace": "x"}))["error"] == {
        "message": '"schema" (the TaskFlowSchema object) is required',
        "code": "BadRequest",
    }
    assert (await call(nc, f"{restricted}.retry", {"taskflowId": "a/b", "stages": "s1"}))[
        "error"
    ] == {"message": '"stages" is a list', "code": "BadRequest"}


async def test_a_child_produced_with_a_parent_context_is_linked_to_the_task(
    operator, nc, svc: str, namespace: str, flows: Flows, api_token: str
) -> None:
    """What the SDK does for a service without Kubernetes access, by hand: a plain nats-py
    service starts a child of the task it serves and names it in its reply."""

    async def fanout(msg: Any) -> None:
        parent = {
            "taskflowExecutionContext": json.loads(msg.headers["taskflowExecutionContext"]),
            "idempotencyKey": msg.headers["Taskflow-Idempotency-Key"],
        }
        res = await call(
            nc,
            "taskflow.api.produce",
            {"schema": one_task(f"{svc}-leaf"), "parent": parent},
            token=api_token,
        )
        assert res["success"], res
        await msg.respond(
            json.dumps(
                {"success": True, "data": "started", "nestedTaskflows": [res["data"]["ref"]]}
            ).encode()
        )

    async def fanout_cb(msg: Any) -> None:
        asyncio.get_running_loop().create_task(fanout(msg))

    await nc.subscribe(f"{svc}.fanout", cb=fanout_cb)
    await serve(nc, f"{svc}-leaf.act", succeed)
    created = await flows.create(
        {
            "spec": {
                "stages": [
                    {
                        "name": "s",
                        "tasks": [
                            {
                                "name": "fan",
                                "taskDetails": {"serviceId": svc, "actionName": "fanout"},
                            }
                        ],
                    }
                ]
            }
        }
    )

    done = await flows.wait(created["metadata"]["name"])

    assert done["status"]["phase"] == "SUCCEEDED"
    ref = task_status(done, "s", "fan")["nestedTaskflows"][0]
    child = await flows.get(ref.split("/")[1])
    assert child["metadata"]["labels"]["taskflow.dev/parent-uid"] == created["metadata"]["uid"]
    assert child["metadata"]["annotations"]["taskflow.dev/parent-task"] == "s.fan"
    assert child["status"]["phase"] == "SUCCEEDED"


async def test_the_docs_example_runs(
    operator, stack, namespace: str, svc: str, api_token: str
) -> None:
    code = extract_example(ROOT / "docs/nats-api.md")
    env = {
        **os.environ,
        "NATS_URL": stack.nats.url,
        "TASKFLOW_NAMESPACE": namespace,
        "SERVICE_ID": svc,
        "TASKFLOW_API_TOKEN": api_token,
    }
    env.pop("KUBECONFIG", None)  # the point: no Kubernetes access needed
    result = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "taskflow SUCCEEDED" in result.stdout, result.stdout


async def test_suspend_resume_and_history_through_the_nats_api(
    operator, nc, flows: Flows, namespace: str, svc: str, api_token: str
) -> None:
    seen: list[Any] = []

    async def answer(msg: Any) -> None:
        seen.append(msg)
        await msg.respond(json.dumps({"success": True}).encode())

    await nc.subscribe(f"{svc}.do", cb=answer)
    await flows.create({**flow(svc, ["a"]), "suspend": True, "ttl": {"afterSucceeded": "1s"}}, "f")
    await flows.wait("f", until=lambda b: bool((b.get("status") or {}).get("suspendedAt")))
    res = await call(nc, "taskflow.api.resume", {"taskflowId": f"{namespace}/f"}, token=api_token)
    assert res["success"] and res["data"]["suspend"] is False, res
    for _ in range(150):
        listed = await call(nc, "taskflow.api.history", {"namespace": namespace}, token=api_token)
        if listed["success"] and listed["data"]["items"]:
            break
        await asyncio.sleep(0.1)
    assert [i["name"] for i in listed["data"]["items"]] == ["f"] and len(seen) == 1
    refused = await call(nc, "taskflow.api.history", {"namespace": "kube-system"}, token=api_token)
    assert refused["error"]["code"] == "Forbidden"
