"""Nested taskflows on real servers: three levels, context propagation, cascades, limits."""

from __future__ import annotations

import asyncio
import json
import signal
from typing import Any

from conftest import Flows, flow, serve, task_status


def action(svc: str, name: str) -> dict[str, Any]:
    return {
        "name": name,
        "params": {"task": name},
        "taskDetails": {"serviceId": svc, "actionName": "do"},
    }


def leaf_held_until(release: asyncio.Event) -> Any:
    """A reply function that holds the grandchild's ``leaf`` task until ``release`` is set."""

    async def reply(msg: Any) -> dict[str, Any]:
        if json.loads(msg.data)["task"] == "leaf":
            await release.wait()
        return {"success": True, "data": 1}

    return reply


def three_levels(svc: str) -> dict[str, Any]:
    grandchild = {"stages": [{"name": "g1", "tasks": [action(svc, "leaf")]}]}
    child = {
        "stages": [
            {"name": "c1", "tasks": [action(svc, "childFirst")]},
            {
                "name": "c2",
                "tasks": [{"name": "deeper", "type": "TASKFLOW", "taskflow": grandchild}],
            },
        ]
    }
    return {
        "stages": [
            {"name": "p1", "tasks": [action(svc, "prepare")]},
            {"name": "p2", "tasks": [{"name": "nested", "type": "TASKFLOW", "taskflow": child}]},
            {"name": "p3", "tasks": [action(svc, "finish")]},
        ]
    }


async def test_three_level_flow_runs_to_succeeded_with_the_parent_context(
    operator, flows: Flows, nc, svc: str
) -> None:
    rec = await serve(nc, f"{svc}.do")
    created = await flows.create(three_levels(svc), "top")
    done = await flows.wait("top", timeout=30)
    assert done["status"]["phase"] == "SUCCEEDED"
    nested = task_status(done, "p2", "nested")
    assert nested["status"] == "SUCCEEDED"
    assert len(nested["nestedTaskflows"]) == 1
    assert nested["nestedActiveRunningTaskFlowIds"] == []
    assert nested["response"]["phase"] == "SUCCEEDED"
    _, child_name = nested["nestedTaskflows"][0].split("/")
    child = await flows.get(child_name)
    assert child["metadata"]["ownerReferences"][0]["uid"] == created["metadata"]["uid"]
    assert child["metadata"]["labels"]["taskflow.dev/parent-uid"] == created["metadata"]["uid"]
    grand_ref = task_status(child, "c2", "deeper")["nestedTaskflows"][0]
    grandchild = await flows.get(grand_ref.split("/")[1])
    assert grandchild["status"]["phase"] == "SUCCEEDED"

    contexts = {c["taskflow"]["taskInfo"]["name"]: c for c in rec.contexts()}
    assert contexts["prepare"]["taskflow"]["taskInfo"]["meta"] == {}
    # The grandchild's task carries its parent's context, which carries the top flow's.
    leaf_meta = contexts["leaf"]["taskflow"]["taskInfo"]["meta"]["taskflowExecutionContext"]
    assert leaf_meta["taskflow"]["id"] == child["metadata"]["uid"]
    assert leaf_meta["taskflow"]["taskInfo"]["name"] == "deeper"
    assert leaf_meta["taskflow"]["taskInfo"]["type"] == "TASKFLOW"
    assert leaf_meta["previousStageRes"] == [
        {"taskName": "childFirst", "response": {"success": True, "data": {"task": "childFirst"}}}
    ]
    top_meta = leaf_meta["taskflow"]["taskInfo"]["meta"]["taskflowExecutionContext"]
    assert top_meta["taskflow"]["id"] == created["metadata"]["uid"]
    assert top_meta["taskflow"]["taskInfo"]["name"] == "nested"
    assert set(top_meta["taskflow"]) == {"id", "stageId", "createdAt", "taskId", "taskInfo"}
    assert top_meta["previousStageRes"][0]["taskName"] == "prepare"


async def test_cancel_cascades_to_running_children(operator, flows: Flows, nc, svc: str) -> None:
    release = asyncio.Event()
    await serve(nc, f"{svc}.do", leaf_held_until(release))
    await flows.create(three_levels(svc), "top")

    def grandchild_running(items: list[dict[str, Any]]) -> bool:
        return sum(1 for i in items if (i.get("status") or {}).get("phase") == "RUNNING") == 3

    for _ in range(100):
        if grandchild_running(await flows.list()):
            break
        await asyncio.sleep(0.1)
    await flows.patch("top", {"spec": {"cancel": True}})
    await flows.wait("top")
    for _ in range(100):
        phases = {i["metadata"]["name"]: i["status"]["phase"] for i in await flows.list()}
        if set(phases.values()) == {"CANCELLED"}:
            break
        await asyncio.sleep(0.1)
    assert set(phases.values()) == {"CANCELLED"}, phases
    assert len(phases) == 3
    release.set()


async def test_retry_of_a_parent_task_runs_a_new_child(
    operator, flows: Flows, nc, svc: str
) -> None:
    failing = {"leaf"}

    def reply(msg: Any) -> dict[str, Any]:
        name = json.loads(msg.data)["task"]
        if name in failing:
            return {"success": False, "error": {"message": "leaf broke"}}
        return {"success": True, "data": name}

    await serve(nc, f"{svc}.do", reply)
    await flows.create(three_levels(svc), "top")
    failed = await flows.wait("top", timeout=30)
    assert failed["status"]["phase"] == "FAILED"
    old_child = task_status(failed, "p2", "nested")["nestedTaskflows"][0]
    failing.clear()
    await flows.patch(
        "top", {"spec": {"retry": {"id": "again", "stages": [{"name": "p2", "tasks": ["nested"]}]}}}
    )
    done = await flows.wait(
        "top",
        lambda b: (
            b["status"].get("retry", {}).get("id") == "again" and b["status"]["phase"] != "RUNNING"
        ),
        timeout=30,
    )
    assert done["status"]["phase"] == "SUCCEEDED"
    nested = task_status(done, "p2", "nested")
    assert nested["attempt"] == 1
    # A new child for the new attempt; the old one stays listed and kept, for history.
    assert nested["nestedTaskflows"][0] == old_child
    assert len(nested["nestedTaskflows"]) == 2 and "-nested-1-" in nested["nestedTaskflows"][1]
    assert (await flows.get(old_child.split("/")[1]))["status"]["phase"] == "FAILED"  # history


async def test_operator_restart_while_a_child_runs(operator, flows: Flows, nc, svc: str) -> None:
    release = asyncio.Event()
    await serve(nc, f"{svc}.do", leaf_held_until(release))
    await flows.create(three_levels(svc), "top")
    for _ in range(100):
        if len(await flows.list()) == 3:
            break
        await asyncio.sleep(0.1)
    await asyncio.sleep(0.3)
    operator.kill(signal.SIGKILL)
    release.set()  # the leaf answers while the operator is down
    await asyncio.sleep(0.5)
    operator.start()
    done = await flows.wait("top", timeout=30)
    assert done["status"]["phase"] == "SUCCEEDED"
    assert len(await flows.list()) == 3  # a restart never creates a second child


async def test_depth_limit_is_refused_with_a_clear_error(
    operator, flows: Flows, nc, svc: str
) -> None:
    """Eleven levels of inline children: the tenth child's own child is refused (the depth
    annotation is the operator's; admission refuses it on a flow that is not a child)."""
    await serve(nc, f"{svc}.do")
    spec: dict[str, Any] = flow(svc, ["x"])
    for _ in range(11):
        spec = {
            "stages": [
                {"name": "s", "tasks": [{"name": "n", "type": "TASKFLOW", "taskflow": spec}]}
            ]
        }
    await flows.create({"metadata": {"name": "deep"}, "spec": spec})
    done = await flows.wait("deep", timeout=60)
    assert done["status"]["phase"] == "FAILED"
    children = await flows.list()
    assert len(children) == 11  # the top and ten children
    deepest = next(
        c
        for c in children
        if (c["metadata"].get("annotations") or {}).get("taskflow.dev/depth") == "10"
    )
    n = task_status(deepest, "s", "n")
    assert "nesting depth 11 exceeds the limit of 10" in n["error"]["message"]


async def test_invalid_child_spec_fails_the_task_with_the_api_servers_message(
    operator, flows: Flows
) -> None:
    await flows.create(
        {
            "stages": [
                {
                    "name": "s",
                    "tasks": [{"name": "n", "type": "TASKFLOW", "taskflow": {"stages": []}}],
                }
            ]
        },
        "bad",
    )
    done = await flows.wait("bad")
    n = task_status(done, "s", "n")
    assert n["status"] == "FAILED"
    assert "child taskflow refused" in n["error"]["message"]
    assert "spec.stages" in n["error"]["message"]


async def test_deleting_a_parent_removes_its_children(
    operator, flows: Flows, nc, svc: str, kubectl, namespace: str
) -> None:
    release = asyncio.Event()

    async def slow(msg: Any) -> dict[str, Any]:
        await release.wait()
        return {"success": True, "data": 1}

    await serve(nc, f"{svc}.do", slow)
    await flows.create(
        {
            "stages": [
                {
                    "name": "s",
                    "tasks": [{"name": "n", "type": "TASKFLOW", "taskflow": flow(svc, ["x"])}],
                }
            ]
        },
        "parent",
    )
    for _ in range(100):
        if len(await flows.list()) == 2:
            break
        await asyncio.sleep(0.1)
    kubectl("delete", "tf", "parent", "-n", namespace, "--cascade=foreground", "--wait=false")
    for _ in range(150):  # kube-controller-manager's garbage collector removes the child
        if not await flows.list():
            break
        await asyncio.sleep(0.2)
    release.set()
    assert await flows.list() == []
