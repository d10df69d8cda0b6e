"""TaskflowTemplate and templateRef on the real servers: the template's stages written into the
flow's spec when it starts, values reaching services by expressions."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from kubernetes import client

from conftest import Flows, serve, task_status
from unit.test_templates import TEMPLATE


def put_template(kube: client.ApiClient, namespace: str, name: str, spec: dict[str, Any]) -> None:
    client.CustomObjectsApi(kube).create_namespaced_custom_object(
        "taskflow.dev",
        "v1alpha1",
        namespace,
        "taskflowtemplates",
        {
            "apiVersion": "taskflow.dev/v1alpha1",
            "kind": "TaskflowTemplate",
            "metadata": {"name": name},
            "spec": spec,
        },
    )


def with_service(svc: str) -> dict[str, Any]:
    return json.loads(json.dumps(TEMPLATE).replace('"SVC"', json.dumps(svc)))


@pytest.mark.integration
async def test_a_flow_runs_a_template_with_its_arguments(
    operator, kube: client.ApiClient, flows: Flows, nc, svc: str
) -> None:
    seen = await serve(nc, f"{svc}.add")
    await asyncio.to_thread(put_template, kube, flows.namespace, "add-devices", with_service(svc))
    await flows.create(
        {
            "templateRef": {
                "name": "add-devices",
                "arguments": {"groupId": "g7", "devices": ["a", "b"]},
            }
        },
        "f",
    )
    done = await flows.wait("f")
    assert done["status"]["phase"] == "SUCCEEDED"
    assert sorted(json.loads(m.data)["device"] for m in seen.requests) == ["a", "b"]
    assert {json.loads(m.data)["group"] for m in seen.requests} == {"g7"}
    spec = done["spec"]
    assert spec["stages"][0]["name"] == "s" and spec["options"] == {"timeout": "30s"}
    assert spec["inputs"] == {"groupId": "g7", "devices": ["a", "b"], "retries": 1}
    assert spec["templateRef"]["resourceVersion"]  # which version of the template ran
    assert [t["name"] for t in done["status"]["stages"][0]["tasks"]] == ["add[0]", "add[1]"]
    assert task_status(done, "s", "add[1]")["params"] == {"group": "g7", "device": "b"}


@pytest.mark.integration
async def test_bad_arguments_or_a_missing_template_fail_the_flow_saying_why(
    operator, kube: client.ApiClient, flows: Flows, nc, svc: str
) -> None:
    seen = await serve(nc, f"{svc}.add")
    await asyncio.to_thread(put_template, kube, flows.namespace, "add-devices", with_service(svc))
    await flows.create({"templateRef": {"name": "add-devices", "arguments": {"devices": 3}}}, "bad")
    await flows.create({"templateRef": {"name": "nope"}}, "missing")
    for name, text in (
        ("bad", "argument 'groupId' is required; argument 'devices': a array, not int"),
        ("missing", f"no TaskflowTemplate 'nope' in namespace {flows.namespace}"),
    ):
        done = await flows.wait(name)
        assert done["status"]["phase"] == "FAILED"
        cond = next(c for c in done["status"]["conditions"] if c["type"] == "Succeeded")
        assert cond["reason"] == "InvalidTemplate" and text in cond["message"]
    assert seen.requests == []


@pytest.mark.integration
async def test_kubectl_taskflow_run_starts_a_flow_from_a_template(
    operator, stack, kube: client.ApiClient, flows: Flows, nc, svc: str
) -> None:
    from integration.test_plugin import Plugin

    seen = await serve(nc, f"{svc}.add")
    await asyncio.to_thread(put_template, kube, flows.namespace, "add-devices", with_service(svc))
    out = await Plugin(stack, flows.namespace)(
        "run", "add-devices", "--arg", "groupId=g9", "--arg", 'devices=["x"]', "-o", "json"
    )
    assert out.returncode == 0, out.stderr
    uid = json.loads(out.stdout)["taskflowId"]
    (body,) = [b for b in await flows.list() if b["metadata"]["uid"] == uid]
    assert body["metadata"]["name"].startswith("add-devices-")
    done = await flows.wait(body["metadata"]["name"])
    assert done["status"]["phase"] == "SUCCEEDED"
    assert [json.loads(m.data) for m in seen.requests] == [{"group": "g9", "device": "x"}]
