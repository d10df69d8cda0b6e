"""The seed scenario end to end: the examples run on real servers to SUCCEEDED."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, Flows, task_status


@pytest.fixture
async def demo(stack):  # type: ignore[no-untyped-def]
    from taskflow.demo import serve

    task = asyncio.create_task(serve(stack.nats.url))
    await asyncio.sleep(0.3)
    yield
    task.cancel()


async def test_configure_group_example_succeeds_with_one_visible_retry(
    operator, flows: Flows, demo, nc
) -> None:
    body = yaml.safe_load((ROOT / "examples/configure-group.yaml").read_text())
    created = await flows.create(body)
    events = await nc.subscribe(f"taskflow.events.{created['metadata']['uid']}")
    done = await flows.wait("configure-group", timeout=30)
    status = done["status"]
    assert status["phase"] == "SUCCEEDED"
    assert status["progress"] == "11/11"
    assert status["currentStage"] == "2/2 addApplianceToGroups"
    assert status["taskflowId"] == created["metadata"]["uid"]
    assert status["eventSubscription"] == f"taskflow.events.{created['metadata']['uid']}"
    alpha = task_status(done, "addApplianceToGroups", "addApplianceAlpha")
    assert alpha["attempt"] == 1
    assert [a["status"] for a in alpha["attempts"]] == ["FAILED", "SUCCEEDED"]
    assert alpha["attempts"][0]["error"]["code"] == "UNREACHABLE"
    beta = task_status(done, "addApplianceToGroups", "addApplianceBeta")
    assert beta["response"] == {"applianceId": "viosds6456x", "groupId": "sdvn78"}
    seen = []
    while True:
        try:
            msg = await events.next_msg(timeout=2)
        except Exception:
            break
        seen.append(json.loads(msg.data))
    kinds = {e["eventType"] for e in seen}
    assert kinds == {"TASK", "STAGE", "TASKFLOW"}
    assert seen[-1]["data"]["taskflowStatus"] == "SUCCEEDED"


async def test_hello_world_example_succeeds(operator, flows: Flows, demo) -> None:
    await flows.create(yaml.safe_load(Path(ROOT / "examples/hello-world.yaml").read_text()))
    done = await flows.wait("hello-world")
    assert done["status"]["phase"] == "SUCCEEDED"
    assert task_status(done, "greet", "greet")["response"] == "hello, taskflow"


async def test_the_seed_rewritten_with_for_each_flows_values_from_stage_to_stage(
    operator, flows: Flows, demo, kube
) -> None:
    """examples/configure-group-foreach.yaml: the group id from stage 1's response, one entry
    per appliance (five at a time), their responses as a list in stage 3; then a retry of one
    entry by its index."""
    body = yaml.safe_load((ROOT / "examples/configure-group-foreach.yaml").read_text())
    await flows.create(body)
    done = await flows.wait("configure-group-foreach", timeout=60)
    status = done["status"]
    assert status["phase"] == "SUCCEEDED", json.dumps(status)[:2000]
    appliances = body["spec"]["inputs"]["appliances"]
    stage = next(s for s in status["stages"] if s["name"] == "addApplianceToGroups")
    assert [t["name"] for t in stage["tasks"]] == [f"add[{i}]" for i in range(10)]
    assert [t["item"] for t in stage["tasks"]] == appliances
    assert all(
        t["params"] == {"groupId": "sdvn78", "applianceId": a}
        for t, a in zip(stage["tasks"], appliances, strict=True)
    )
    flaky = next(t for t in stage["tasks"] if t["attempt"] == 1)  # the demo's flaky one
    assert [a["status"] for a in flaky["attempts"]] == ["FAILED", "SUCCEEDED"]
    summary = task_status(done, "report", "summary")
    assert summary["params"]["added"] == appliances and summary["params"]["count"] == 10
    assert summary["response"]["asked"]["added"] == appliances  # what the service got

    from taskflow.client import TaskflowClient

    tree = (
        await TaskflowClient(api_client=kube, namespace=flows.namespace).get_details(
            "configure-group-foreach"
        )
    )["data"]
    fanned = next(s for s in tree["stages"] if s["name"] == "addApplianceToGroups")["tasks"]
    assert [(t["name"], t["item"]) for t in fanned] == [
        (f"add[{i}]", a) for i, a in enumerate(appliances)
    ]

    await flows.patch(
        "configure-group-foreach",
        {
            "spec": {
                "retry": {
                    "id": "one",
                    "stages": [{"name": "addApplianceToGroups", "tasks": ["add[3]"]}],
                }
            }
        },
    )
    again = await flows.wait(
        "configure-group-foreach",
        until=lambda b: (
            ((b.get("status") or {}).get("retry") or {}).get("id") == "one"
            and b["status"]["phase"] == "SUCCEEDED"
        ),
        timeout=60,
    )
    entries = next(s for s in again["status"]["stages"] if s["name"] == "addApplianceToGroups")[
        "tasks"
    ]
    assert entries[3]["runStartAttempt"] > 0 or entries[3]["attempt"] > 0
    assert [e["attempt"] for i, e in enumerate(entries) if i != 3] == [
        t["attempt"] for i, t in enumerate(stage["tasks"]) if i != 3
    ]
