"""The Python client on real servers: produce (dict, model, invalid), details (incl. nested
flows), cancel, retry (the seed's four scopes), events (live and replayed), the sync wrapper,
and the docs page's example."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from conftest import ROOT, Flows
from taskflow.api import TaskflowSpec
from taskflow.client import Client, TaskflowClient
from unit.test_client import Reply


@pytest.fixture
async def tf(stack, namespace: str) -> AsyncIterator[TaskflowClient]:  # type: ignore[no-untyped-def]
    client = TaskflowClient(
        kubeconfig=str(stack.kubeconfig), namespace=namespace, nats_url=stack.nats.url
    )
    yield client
    await client.close()


async def serve(nc: Any, subject: str, reply: Reply) -> Any:
    """A plain nats-py service: the reply is the handler's dict."""

    async def cb(msg: Any) -> None:
        body = await reply(json.loads(msg.data or b"{}"), msg)
        await msg.respond(json.dumps(body).encode())

    return await nc.subscribe(subject, cb=cb)


async def succeed(params: dict[str, Any], _msg: Any) -> dict[str, Any]:
    return {"success": True, "data": {"echo": params}}


def seed_schema(svc: str) -> dict[str, Any]:
    """The seed's ``taskflowObj``, word for word, with this test's service ids."""
    return {
        "options": {
            "maxAge": 60 * 1000,
            "timeout": 60 * 1000,
            "retryDelay": 5 * 1000,
            "continueOnTaskFailure": True,
            "exactlyOnceTaskExecution": False,
        },
        "context": {"description": "This is a taskflow for configuring a group"},
        "stages": [
            {
                "name": "createGroup",
                "tasks": [
                    {
                        "name": "createGroup",
                        "params": {
                            "groupId": "sdvn78",
                            "groupType": "room",
                            "groupName": "bed-room",
                        },
                        "type": "ACTION",
                        "taskDetails": {"serviceId": f"{svc}-group", "actionName": "createGroup"},
                    }
                ],
            },
            {
                "name": "addApplianceToGroups",
                "tasks": [
                    {
                        "name": "addApplianceAlpha",
                        "params": {"groupId": "sdvn78", "applianceId": "vions56x"},
                        "type": "ACTION",
                        "taskDetails": {
                            "serviceId": f"{svc}-appliance",
                            "actionName": "AddApplianceToGroup",
                        },
                        "options": {"maxRetries": 3},
                    },
                    {
                        "name": "addApplianceBeta",
                        "params": {"groupId": "sdvn78", "applianceId": "viosds6456x"},
                        "type": "ACTION",
                        "taskDetails": {
                            "serviceId": f"{svc}-appliance",
                            "actionName": "AddApplianceToGroup",
                        },
                        "options": {"maxRetries": 3},
                    },
                ],
            },
        ],
    }


def one_task(svc: str, action: str = "act", **options: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "stages": [
            {
                "name": "s1",
                "tasks": [
                    {
                        "name": "t1",
                        "params": {"n": 1},
                        "taskDetails": {"serviceId": svc, "actionName": action},
                    }
                ],
            }
        ]
    }
    if options:
        spec["options"] = options
    return spec


async def wait_phase(
    tf: TaskflowClient, ident: str, phases: set[str], timeout: float = 30
) -> dict[str, Any]:
    deadline = asyncio.get_running_loop().time() + timeout
    tree: dict[str, Any] = {}
    while asyncio.get_running_loop().time() < deadline:
        res = await tf.get_details(ident)
        assert res["success"], res
        tree = res["data"]
        if tree["phase"] in phases:
            return tree
        await asyncio.sleep(0.1)
    raise AssertionError(f"{ident} never reached {phases}: {json.dumps(tree)[:3000]}")


def find_task(tree: dict[str, Any], stage: str, task: str) -> dict[str, Any]:
    for s in tree["stages"]:
        if s["name"] == stage:
            for t in s["tasks"]:
                if t["name"] == task:
                    return dict(t)
    raise KeyError(f"{stage}/{task}")


# -- produce, events, details --------------------------------------------------------------------


async def test_produce_the_seed_schema_then_events_and_details(
    operator, tf: TaskflowClient, nc, svc: str, namespace: str
) -> None:
    await serve(nc, f"{svc}-group.createGroup", succeed)
    await serve(nc, f"{svc}-appliance.AddApplianceToGroup", succeed)

    res = await tf.produce(seed_schema(svc))

    assert res["success"] is True, res
    assert set(res) == {"success", "data"}
    assert set(res["data"]) == {"taskflowId", "eventSubscription"}
    uid = res["data"]["taskflowId"]
    assert re.fullmatch(r"[0-9a-f-]{36}", uid)
    assert res["data"]["eventSubscription"] == f"taskflow.events.{uid}"

    events = [e async for e in tf.subscribe_events(uid)]
    assert events[0]["eventType"] == "TASKFLOW"
    assert events[0]["data"]["taskflowStatus"] == "RUNNING"
    assert events[-1]["eventType"] == "TASKFLOW"
    assert events[-1]["data"]["taskflowStatus"] == "SUCCEEDED"
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    done = {
        (e["data"]["taskName"], e["data"]["taskStatus"]) for e in events if e["eventType"] == "TASK"
    }
    assert {
        ("createGroup", "SUCCEEDED"),
        ("addApplianceAlpha", "SUCCEEDED"),
        ("addApplianceBeta", "SUCCEEDED"),
    } <= done
    task_event = next(
        e for e in events if e["eventType"] == "TASK" and e["data"]["taskStatus"] == "SUCCEEDED"
    )
    assert {
        "taskflowId",
        "attempt",
        "stageId",
        "taskId",
        "taskStatus",
        "taskResponse",
        "taskflowObject",
    } <= set(task_event["data"])

    details = await tf.get_details(uid)
    assert details["success"] is True
    tree = details["data"]
    assert tree["taskflowId"] == uid and tree["namespace"] == namespace
    assert tree["status"] == "SUCCEEDED" and tree["progress"] == "3/3"
    assert [s["status"] for s in tree["stages"]] == ["SUCCEEDED", "SUCCEEDED"]
    beta = find_task(tree, "addApplianceToGroups", "addApplianceBeta")
    assert beta["response"] == {"echo": {"groupId": "sdvn78", "applianceId": "viosds6456x"}}
    assert beta["attempt"] == 0
    assert [a["status"] for a in beta["attempts"]] == ["SUCCEEDED"]
    assert beta["taskDetails"] == {
        "serviceId": f"{svc}-appliance",
        "actionName": "AddApplianceToGroup",
    }

    by_name = await tf.get_details(f"{namespace}/{tree['name']}")
    assert by_name["data"]["taskflowId"] == uid


async def test_produce_takes_the_pydantic_model_and_a_name(
    operator, tf: TaskflowClient, nc, svc: str, flows: Flows
) -> None:
    await serve(nc, f"{svc}.act", succeed)
    spec = TaskflowSpec.model_validate(one_task(svc, timeout="5s"))

    res = await tf.produce(spec, name="from-model")

    assert res["success"], res
    body = await flows.wait("from-model")
    assert body["metadata"]["uid"] == res["data"]["taskflowId"]
    assert body["status"]["phase"] == "SUCCEEDED"
    assert body["spec"]["options"] == {"timeout": "5s"}


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda s: s["stages"][0]["tasks"][0]["taskDetails"].update(serviceId="a.b"), "serviceId"),
        (lambda s: s.update(stages=[]), "stages"),
        (lambda s: s["stages"][0]["tasks"][0].update(type="TASKFLOW"), "taskflow"),
        (lambda s: s["options"].update(maxRetries=1000), "maxRetries"),
    ],
    ids=["subject-injection", "no-stages", "taskflow-missing", "too-many-retries"],
)
async def test_produce_an_invalid_schema_returns_the_api_servers_message(
    tf: TaskflowClient, flows: Flows, mutate: Callable[[dict[str, Any]], None], field: str
) -> None:
    schema = one_task("svc", maxRetries=1)
    mutate(schema)

    res = await tf.produce(schema)

    assert res["success"] is False
    assert set(res) == {"success", "error"}
    assert res["error"]["code"] == "Invalid"
    assert res["error"]["status"] == 422
    assert field in res["error"]["message"], res["error"]["message"]
    assert "Taskflow.taskflow.dev" in res["error"]["message"]
    assert await flows.list() == []


async def test_produce_refuses_what_is_not_a_schema(tf: TaskflowClient) -> None:
    res = await tf.produce(["not", "a", "dict"])  # type: ignore[arg-type]
    assert res == {
        "success": False,
        "error": {
            "message": "a taskflow schema is a dict or a TaskflowSpec, not list",
            "code": "BadRequest",
        },
    }


async def test_details_of_an_unknown_flow_is_a_clear_failure(
    tf: TaskflowClient, namespace: str
) -> None:
    res = await tf.get_details(f"{namespace}/nope")
    assert res == {
        "success": False,
        "error": {"message": f"taskflow {namespace}/nope not found", "code": "NotFound"},
    }
    res = await tf.get_details("0b7c6a2e-1111-4222-8333-944455556666")
    assert res["success"] is False and res["error"]["code"] == "NotFound"


async def test_a_uid_is_found_without_nats_by_listing(
    operator, tf: TaskflowClient, nc, svc: str, stack, namespace: str
) -> None:
    await serve(nc, f"{svc}.act", succeed)
    res = await tf.produce(one_task(svc))
    uid = res["data"]["taskflowId"]
    # A fresh client that has never seen the flow and never connects to NATS.
    fresh = TaskflowClient(
        kubeconfig=str(stack.kubeconfig), namespace="default", nats_url="nats://127.0.0.1:1"
    )
    try:
        details = await fresh.get_details(uid)
    finally:
        await fresh.close()
    assert details["success"], details
    assert details["data"]["namespace"] == namespace


async def test_details_hold_the_whole_tree_of_nested_flows(
    operator, tf: TaskflowClient, nc, svc: str
) -> None:
    await serve(nc, f"{svc}.act", succeed)
    leaf = one_task(svc)
    middle = {
        "stages": [
            {
                "name": "m1",
                "tasks": [{"name": "work", "taskDetails": {"serviceId": svc, "actionName": "act"}}],
            },
            {"name": "m2", "tasks": [{"name": "grandchild", "type": "TASKFLOW", "taskflow": leaf}]},
        ]
    }
    root = {
        "stages": [
            {
                "name": "first",
                "tasks": [{"name": "a", "taskDetails": {"serviceId": svc, "actionName": "act"}}],
            },
            {
                "name": "nested",
                "tasks": [{"name": "child", "type": "TASKFLOW", "taskflow": middle}],
            },
        ]
    }
    res = await tf.produce(root)
    assert res["success"], res

    tree = await wait_phase(tf, res["data"]["taskflowId"], {"SUCCEEDED", "FAILED"})

    assert tree["phase"] == "SUCCEEDED"
    child_task = find_task(tree, "nested", "child")
    assert len(child_task["children"]) == 1
    child = child_task["children"][0]
    assert child["status"] == "SUCCEEDED"
    assert child["parent"]["taskflowId"] == tree["taskflowId"]
    assert child["parent"]["stage"] == "nested" and child["parent"]["task"] == "child"
    assert child_task["nestedTaskflows"] == [f"{child['namespace']}/{child['name']}"]
    grand = find_task(child, "m2", "grandchild")["children"]
    assert len(grand) == 1 and grand[0]["status"] == "SUCCEEDED"
    assert find_task(grand[0], "s1", "t1")["response"] == {"echo": {"n": 1}}
    assert grand[0]["parent"]["depth"] == 2


# -- cancel ------------------------------------------------------------------------------------


async def test_cancel_a_running_flow(operator, tf: TaskflowClient, nc, svc: str) -> None:
    seen = asyncio.Event()

    async def hang(_params: dict[str, Any], _msg: Any) -> dict[str, Any]:
        seen.set()
        await asyncio.sleep(3600)
        raise AssertionError("unreachable")

    async def cb(msg: Any) -> None:
        asyncio.get_running_loop().create_task(hang({}, msg))

    await nc.subscribe(f"{svc}.act", cb=cb)
    notices = await nc.subscribe(f"taskflow.cancel.{svc}")
    res = await tf.produce(one_task(svc))
    uid = res["data"]["taskflowId"]
    await asyncio.wait_for(seen.wait(), 20)

    cancelled = await tf.cancel(uid)

    assert cancelled["success"], cancelled
    assert cancelled["data"]["acknowledged"] is True
    assert cancelled["data"]["phase"] == "CANCELLED"
    tree = (await tf.get_details(uid))["data"]
    assert tree["cancel"] is True
    assert find_task(tree, "s1", "t1")["status"] == "CANCELLED"
    notice = json.loads((await notices.next_msg(timeout=5)).data)
    assert notice["taskflowId"] == uid and notice["task"] == "t1"

    again = await tf.cancel(uid)
    assert again["success"] is False
    assert again["error"]["code"] == "AlreadyFinished"
    assert "already ended CANCELLED" in again["error"]["message"]


async def test_a_flow_retried_after_a_cancel_can_be_cancelled_again(
    operator, tf: TaskflowClient, svc: str
) -> None:
    res = await tf.produce(one_task(svc, timeout="60s"))  # nobody serves it: stays RUNNING
    uid = res["data"]["taskflowId"]
    await wait_phase(tf, uid, {"RUNNING"})
    assert (await tf.cancel(uid))["data"]["phase"] == "CANCELLED"
    retried = await tf.retry(uid)
    assert retried["success"], retried
    await wait_phase(tf, uid, {"RUNNING"})

    again = await tf.cancel(uid, wait=5)

    assert again["success"], again
    tree = await wait_phase(tf, uid, {"CANCELLED"}, timeout=5)
    assert find_task(tree, "s1", "t1")["status"] == "CANCELLED"


# -- retry -------------------------------------------------------------------------------------


@pytest.fixture
async def flaky(nc, svc: str) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    """``<svc>.act`` fails for params.fail until ``state["heal"]`` is set; counts calls."""
    state: dict[str, Any] = {"heal": False, "calls": {}}

    async def reply(params: dict[str, Any], _msg: Any) -> dict[str, Any]:
        name = params.get("name", "?")
        state["calls"][name] = state["calls"].get(name, 0) + 1
        if params.get("fail") and not state["heal"]:
            return {"success": False, "error": {"message": f"{name} broke", "code": "BROKEN"}}
        return {"success": True, "data": name}

    await serve(nc, f"{svc}.act", reply)
    return state


def two_stages(svc: str) -> dict[str, Any]:
    def task(name: str, fail: bool = False) -> dict[str, Any]:
        return {
            "name": name,
            "params": {"name": name, "fail": fail},
            "taskDetails": {"serviceId": svc, "actionName": "act"},
        }

    return {
        "options": {"continueOnTaskFailure": True, "retryDelay": 0},
        "stages": [
            {"name": "one", "tasks": [task("ok1"), task("bad1", fail=True)]},
            {"name": "two", "tasks": [task("ok2"), task("bad2", fail=True)]},
        ],
    }


async def test_retry_specific_tasks_by_the_seeds_stage_and_task_ids(
    operator, tf: TaskflowClient, flaky: dict[str, Any], svc: str
) -> None:
    uid = (await tf.produce(two_stages(svc)))["data"]["taskflowId"]
    tree = await wait_phase(tf, uid, {"COMPLETED_WITH_FAILURES"})
    stage_two = tree["stages"][1]
    bad2 = find_task(tree, "two", "bad2")
    flaky["heal"] = True

    # taskflow.retryTaskflow(id, [{ stageId: "stage-id-2", taskIds: ["task-id-3"] }])
    res = await tf.retry(uid, [{"stageId": stage_two["id"], "taskIds": [bad2["id"]]}])

    assert res["success"], res
    assert res["data"]["accepted"] is True
    assert res["data"]["message"].endswith("1 task(s) to run again")
    tree = await wait_phase(tf, uid, {"COMPLETED_WITH_FAILURES", "SUCCEEDED", "FAILED"})
    assert find_task(tree, "two", "bad2")["status"] == "SUCCEEDED"
    assert find_task(tree, "two", "bad2")["attempt"] == 1
    assert find_task(tree, "one", "bad1")["status"] == "FAILED"  # not selected
    assert tree["phase"] == "COMPLETED_WITH_FAILURES"
    assert flaky["calls"] == {"ok1": 1, "bad1": 1, "ok2": 1, "bad2": 2}


async def test_retry_only_failed_tasks_and_whole_stages(
    operator, tf: TaskflowClient, flaky: dict[str, Any], svc: str
) -> None:
    uid = (await tf.produce(two_stages(svc)))["data"]["taskflowId"]
    await wait_phase(tf, uid, {"COMPLETED_WITH_FAILURES"})
    flaky["heal"] = True

    res = await tf.retry(uid, failed_only=True)

    assert res["success"] and res["data"]["accepted"], res
    tree = await wait_phase(tf, uid, {"SUCCEEDED", "FAILED", "COMPLETED_WITH_FAILURES"})
    assert tree["phase"] == "SUCCEEDED"
    assert flaky["calls"] == {"ok1": 1, "bad1": 2, "ok2": 1, "bad2": 2}

    # taskflow.retryTaskflow(id, [{ stageId: "two" }]) by name: all of stage two again
    res = await tf.retry(uid, ["two"])
    assert res["success"] and res["data"]["accepted"], res
    await wait_phase(tf, uid, {"SUCCEEDED"})
    assert flaky["calls"] == {"ok1": 1, "bad1": 2, "ok2": 2, "bad2": 3}

    # and the whole flow (exactlyOnceTaskExecution false: every task again)
    res = await tf.retry(uid)
    assert res["success"] and res["data"]["accepted"], res
    await wait_phase(tf, uid, {"SUCCEEDED"})
    assert flaky["calls"] == {"ok1": 2, "bad1": 3, "ok2": 3, "bad2": 4}


async def test_retry_refusals_are_clear(
    operator, tf: TaskflowClient, flaky: dict[str, Any], svc: str
) -> None:
    uid = (await tf.produce(two_stages(svc)))["data"]["taskflowId"]
    await wait_phase(tf, uid, {"COMPLETED_WITH_FAILURES"})

    unknown = await tf.retry(uid, ["three"])
    assert unknown == {
        "success": False,
        "error": {"message": "unknown stage 'three'", "code": "UnknownStage"},
    }
    unknown_task = await tf.retry(uid, tasks=["one/nope"])
    assert unknown_task["error"]["message"] == "unknown task 'nope' in stage 'one'"

    # A flow that is still running refuses: the operator's answer comes back.
    running = (await tf.produce(one_task(f"{svc}-nobody")))["data"]["taskflowId"]
    await wait_phase(tf, running, {"RUNNING"})
    refused = await tf.retry(running)
    assert refused["success"] is False
    assert refused["error"]["code"] == "RetryRefused"
    assert "only a finished flow can be retried" in refused["error"]["message"]
    await tf.cancel(running)


async def test_retry_writes_the_documented_spec_shape(
    operator, tf: TaskflowClient, flaky: dict[str, Any], svc: str, flows: Flows
) -> None:
    uid = (await tf.produce(two_stages(svc), name="shape"))["data"]["taskflowId"]
    await wait_phase(tf, uid, {"COMPLETED_WITH_FAILURES"})
    await tf.retry(uid, ["one"], wait=None)
    first = (await flows.get("shape"))["spec"]["retry"]
    assert first["stages"] == [{"name": "one"}]

    res = await tf.retry(
        uid, tasks=[("two", "bad2"), "two/ok2"], failed_only=True, wait=None, retry_id="r-mine"
    )

    spec = (await flows.get("shape"))["spec"]
    assert spec["cancel"] is False
    assert spec["retry"] == {
        "id": "r-mine",
        "failedOnly": True,
        "stages": [{"name": "two", "tasks": ["bad2", "ok2"]}],
    }
    assert res == {
        "success": True,
        "data": {"taskflowId": uid, "retryId": "r-mine", "acknowledged": False},
    }
    await tf.retry(uid, wait=None)  # the whole flow: the old stages must not linger
    assert "stages" not in (await flows.get("shape"))["spec"]["retry"]


# -- events ------------------------------------------------------------------------------------


async def test_events_live_then_replayed_by_a_late_subscriber(
    operator, tf: TaskflowClient, nc, svc: str
) -> None:
    release = asyncio.Event()

    async def slow(params: dict[str, Any], _msg: Any) -> dict[str, Any]:
        await release.wait()
        return {"success": True, "data": params}

    await serve(nc, f"{svc}.act", slow)
    uid = (await tf.produce(one_task(svc)))["data"]["taskflowId"]
    await wait_phase(tf, uid, {"RUNNING"})

    live: list[dict[str, Any]] = []

    async def tail() -> None:
        async for event in tf.subscribe_events(uid, replay=False):
            live.append(event)

    tailing = asyncio.create_task(tail())
    await asyncio.sleep(0.5)
    release.set()
    await asyncio.wait_for(tailing, 20)

    replayed = [e async for e in tf.subscribe_events(uid)]
    assert live and live[-1]["data"]["taskflowStatus"] == "SUCCEEDED"
    assert live == replayed[-len(live) :]
    assert replayed[0]["seq"] == 1
    assert ("TASK", "RUNNING") in {(e["eventType"], e["data"].get("taskStatus")) for e in replayed}


async def test_every_failed_attempt_event_carries_its_error(
    operator, tf: TaskflowClient, nc, svc: str
) -> None:
    async def broken(_params: dict[str, Any], _msg: Any) -> dict[str, Any]:
        return {"success": False, "error": {"message": "broke", "code": "BROKEN"}}

    await serve(nc, f"{svc}.act", broken)
    uid = (await tf.produce(one_task(svc, maxRetries=1, retryDelay=0)))["data"]["taskflowId"]

    failed = [
        e
        for e in [e async for e in tf.subscribe_events(uid)]
        if e["eventType"] == "TASK" and e["data"]["taskStatus"] == "FAILED"
    ]

    assert [e["data"]["attempt"] for e in failed] == [0, 1]
    assert [e["data"].get("taskError", {}).get("code") for e in failed] == ["BROKEN", "BROKEN"]


# -- the sync wrapper, the link constants and the docs -------------------------------------------


async def test_sync_client_runs_the_same_calls(
    operator, stack, nc, svc: str, namespace: str
) -> None:
    await serve(nc, f"{svc}.act", succeed)

    def work() -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, Any]]:
        with Client(
            kubeconfig=str(stack.kubeconfig), namespace=namespace, nats_url=stack.nats.url
        ) as taskflow:
            res = taskflow.produce(one_task(svc))
            events = list(taskflow.subscribe_events(res["data"]["taskflowId"]))
            return res, events, taskflow.get_details(res["data"]["taskflowId"])

    res, events, details = await asyncio.to_thread(work)
    assert res["success"]
    assert events[-1]["data"]["taskflowStatus"] == "SUCCEEDED"
    assert details["data"]["stages"][0]["tasks"][0]["response"] == {"echo": {"n": 1}}


async def test_the_docs_example_runs(operator, stack, namespace: str) -> None:
    from taskflow.demo import serve as demo_services  # what `make dev` serves

    demo = asyncio.create_task(demo_services(stack.nats.url))
    await asyncio.sleep(0.3)
    code = extract_example(ROOT / "docs/client.md")
    env = {
        **os.environ,
        "KUBECONFIG": str(stack.kubeconfig),
        "NATS_URL": stack.nats.url,
        "TASKFLOW_NAMESPACE": namespace,
    }
    try:
        result = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-c", code],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        demo.cancel()
    assert result.returncode == 0, result.stderr
    assert "taskflow SUCCEEDED" in result.stdout, result.stdout
    assert "addApplianceToGroups/addApplianceAlpha: SUCCEEDED attempt 1" in result.stdout


def extract_example(path: Any) -> str:
    """The page's runnable example: the python block after the 'runnable example' marker."""
    text = path.read_text()
    marker = text.index("<!-- runnable example -->")
    block = re.search(r"```python\n(.*?)```", text[marker:], re.S)
    assert block, f"no runnable example in {path}"
    return block.group(1)
