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
