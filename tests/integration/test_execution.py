"""The engine on real servers: options, headers, events, bad replies, large responses."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from conftest import Flows, flow, serve, task_status

SEED_TASK_INFO_KEYS = {
    "id",
    "attempt",
    "meta",
    "params",
    "options",
    "status",
    "nestedActiveRunningTaskFlowIds",
    "nestedTaskflows",
    "name",
    "type",
    "taskDetails",
}


async def test_retry_then_success(operator, flows: Flows, nc, svc: str) -> None:
    def reply(msg: Any) -> dict[str, Any]:
        attempt = json.loads(msg.headers["taskflowExecutionContext"])["taskflow"]["taskInfo"][
            "attempt"
        ]
        if attempt < 2:
            return {"success": False, "error": {"message": f"flaky {attempt}", "code": "E1"}}
        return {"success": True, "data": "ok"}

    rec = await serve(nc, f"{svc}.do", reply)
    await flows.create(flow(svc, ["a"], options={"maxRetries": 3, "retryDelay": 50}), "f")
    done = await flows.wait("f")
    a = task_status(done, "s1", "a")
    assert done["status"]["phase"] == "SUCCEEDED"
    assert a["attempt"] == 2 and a["response"] == "ok"
    assert [x["status"] for x in a["attempts"]] == ["FAILED", "FAILED", "SUCCEEDED"]
    assert a["attempts"][1]["error"] == {"message": "flaky 1", "code": "E1", "reason": "Service"}
    uid = done["metadata"]["uid"]
    assert rec.keys() == [f"{uid}/s1/a/0", f"{uid}/s1/a/1", f"{uid}/s1/a/2"]


async def test_timeout_then_give_up(operator, flows: Flows, nc, svc: str) -> None:
    rec = await serve(nc, f"{svc}.do", lambda msg: None)  # never answers
    await flows.create(
        flow(svc, ["a"], options={"timeout": "300ms", "maxRetries": 1, "retryDelay": 0}), "f"
    )
    done = await flows.wait("f", timeout=10)
    a = task_status(done, "s1", "a")
    assert done["status"]["phase"] == "FAILED"
    assert a["status"] == "TIMED_OUT"
    assert [x["status"] for x in a["attempts"]] == ["TIMED_OUT", "TIMED_OUT"]
    assert "timeout of 300 ms" in a["error"]["message"]
    assert len(rec.requests) == 2


async def test_max_age_expires_a_task_nobody_serves(operator, flows: Flows, svc: str) -> None:
    # No service listens: NATS answers "no responders", the operator redelivers the same
    # attempt until maxAge has passed, then fails the task as expired.
    await flows.create(flow(svc, ["a"], options={"maxAge": "1500ms", "timeout": "10s"}), "f")
    done = await flows.wait("f", timeout=15)
    a = task_status(done, "s1", "a")
    assert done["status"]["phase"] == "FAILED"
    assert a["status"] == "FAILED"
    assert a["error"]["reason"] == "Expired"
    assert "no service was listening" in a["error"]["message"]
    assert a["attempt"] == 0


async def test_late_service_is_reached_by_redelivery(operator, flows: Flows, nc, svc: str) -> None:
    await flows.create(flow(svc, ["a"], options={"maxAge": "20s"}), "f")
    await asyncio.sleep(1.5)  # a few redeliveries find nobody
    assert (await flows.get("f"))["status"]["phase"] == "RUNNING"
    await serve(nc, f"{svc}.do")
    done = await flows.wait("f", timeout=10)
    assert done["status"]["phase"] == "SUCCEEDED"
    assert task_status(done, "s1", "a")["attempt"] == 0


@pytest.mark.parametrize("continue_on_failure", [True, False])
async def test_continue_on_task_failure(
    operator, flows: Flows, nc, svc: str, continue_on_failure: bool
) -> None:
    def reply(msg: Any) -> dict[str, Any]:
        name = json.loads(msg.data)["task"]
        if name == "bad":
            return {"success": False, "error": {"message": "broken"}}
        return {"success": True, "data": name}

    rec = await serve(nc, f"{svc}.do", reply, delay=0.2)
    await flows.create(
        flow(
            svc, ["bad", "slow"], ["later"], options={"continueOnTaskFailure": continue_on_failure}
        ),
        "f",
    )
    done = await flows.wait("f")
    status = done["status"]
    # The other task of the failing stage always finishes and is recorded.
    assert task_status(done, "s1", "slow")["status"] == "SUCCEEDED"
    if continue_on_failure:
        assert status["phase"] == "COMPLETED_WITH_FAILURES"
        assert task_status(done, "s2", "later")["status"] == "SUCCEEDED"
        assert len(rec.requests) == 3
    else:
        assert status["phase"] == "FAILED"
        assert status["stages"][1]["status"] == "SKIPPED"
        assert task_status(done, "s2", "later")["status"] == "SKIPPED"
        assert len(rec.requests) == 2


async def test_task_options_override_flow_options(operator, flows: Flows, nc, svc: str) -> None:
    rec = await serve(nc, f"{svc}.do", lambda m: {"success": False, "error": {"message": "x"}})
    spec = flow(svc, ["a", "b"], options={"maxRetries": 0, "retryDelay": 0})
    spec["stages"][0]["tasks"][1]["options"] = {"maxRetries": 2}
    await flows.create(spec, "f")
    done = await flows.wait("f")
    assert task_status(done, "s1", "a")["attempt"] == 0
    assert task_status(done, "s1", "b")["attempt"] == 2
    by_task: dict[str, int] = {}
    for msg in rec.requests:
        by_task[json.loads(msg.data)["task"]] = by_task.get(json.loads(msg.data)["task"], 0) + 1
    assert by_task == {"a": 1, "b": 3}
    opts = [c["taskflow"]["taskInfo"]["options"] for c in rec.contexts()]
    assert {o["maxRetries"] for o in opts} == {0, 2}


async def test_headers_carry_the_seed_context_and_previous_stage_responses(
    operator, flows: Flows, nc, svc: str
) -> None:
    rec = await serve(
        nc, f"{svc}.do", lambda m: {"success": True, "data": f"done {json.loads(m.data)['task']}"}
    )
    created = await flows.create(
        flow(
            svc,
            ["task1", "task2"],
            ["task3"],
            options={
                "maxAge": 60000,
                "timeout": 60000,
                "retryDelay": 5000,
                "maxRetries": 3,
                "exactlyOnceTaskExecution": False,
                "continueOnTaskFailure": True,
            },
        ),
        "f",
    )
    done = await flows.wait("f")
    assert done["status"]["phase"] == "SUCCEEDED"
    uid = created["metadata"]["uid"]
    contexts = {c["taskflow"]["taskInfo"]["name"]: c for c in rec.contexts()}
    first = contexts["task1"]
    assert "previousStageRes" not in first
    t = first["taskflow"]
    assert set(t) == {"id", "stageId", "createdAt", "taskId", "taskInfo"}
    assert t["id"] == uid and isinstance(t["createdAt"], int)
    assert set(t["taskInfo"]) == SEED_TASK_INFO_KEYS
    assert t["taskInfo"]["options"] == {
        "maxRetries": 3,
        "maxAge": 60000,
        "timeout": 60000,
        "retryDelay": 5000,
        "exactlyOnceTaskExecution": False,
        "continueOnTaskFailure": True,
    }
    assert t["taskInfo"]["params"] == {"task": "task1"}
    assert t["taskInfo"]["taskDetails"] == {"serviceId": svc, "actionName": "do"}
    assert t["taskInfo"]["meta"] == {}
    assert t["taskId"] == t["taskInfo"]["id"] == task_status(done, "s1", "task1")["id"]
    assert t["stageId"] == done["status"]["stages"][0]["id"]
    third = contexts["task3"]
    assert third["previousStageRes"] == [
        {"taskName": "task1", "response": {"success": True, "data": "done task1"}},
        {"taskName": "task2", "response": {"success": True, "data": "done task2"}},
    ]
    key = next(m for m in rec.requests if json.loads(m.data)["task"] == "task3").headers
    assert key["Taskflow-Idempotency-Key"] == f"{uid}/s2/task3/0"
    assert int(key["Taskflow-Expires-At"]) > int(key["Taskflow-Deadline"]) - 60001


async def test_late_subscriber_replays_every_event_in_order(
    operator, flows: Flows, nc, svc: str
) -> None:
    await serve(nc, f"{svc}.do")
    created = await flows.create(flow(svc, ["a", "b"], ["c"]), "f")
    await flows.wait("f")
    js = nc.jetstream()
    sub = await js.subscribe(f"taskflow.events.{created['metadata']['uid']}", ordered_consumer=True)
    events = []
    while True:
        try:
            msg = await sub.next_msg(timeout=1)
        except Exception:
            break
        events.append(json.loads(msg.data))
    seqs = [e["seq"] for e in events]
    assert seqs == list(range(1, len(seqs) + 1))
    kinds = [
        (
            e["eventType"],
            e["data"].get("taskStatus")
            or e["data"].get("stageStatus")
            or e["data"].get("taskflowStatus"),
        )
        for e in events
    ]
    assert kinds[0] == ("TASKFLOW", "RUNNING")
    assert kinds[-1] == ("TASKFLOW", "SUCCEEDED")
    assert kinds.count(("TASK", "SUCCEEDED")) == 3
    assert kinds.count(("STAGE", "SUCCEEDED")) == 2
    task_event = next(e for e in events if e["eventType"] == "TASK")
    assert set(task_event["data"]) >= {
        "taskflowId",
        "attempt",
        "stageId",
        "taskId",
        "taskStatus",
        "taskResponse",
        "taskflowObject",
    }
    stage_event = next(e for e in events if e["eventType"] == "STAGE")
    assert set(stage_event["data"]) >= {"taskflowId", "stageId", "stageStatus", "taskflowObject"}


@pytest.mark.parametrize(
    "reply, reason, message",
    [
        (b"this is not json", "BadReply", "not valid JSON"),
        ({"ok": 1}, "BadReply", 'not {"success"'),
        ([1, 2], "BadReply", 'not {"success"'),
        (
            (b"", {"Nats-Service-Error": "device offline", "Nats-Service-Error-Code": "503"}),
            "Service",
            "device offline",
        ),
        (
            b'{"success": true, "data": "' + b"x" * (5 * 1024 * 1024) + b'"}',
            "BadReply",
            "exceeds the limit",
        ),
    ],
    ids=["not-json", "wrong-shape", "array", "service-error-headers", "5MB"],
)
async def test_bad_replies_fail_the_task_with_a_reason(
    operator, flows: Flows, nc, svc: str, reply: Any, reason: str, message: str
) -> None:
    await serve(nc, f"{svc}.do", lambda m: reply)
    await flows.create(flow(svc, ["a"]), "f")
    done = await flows.wait("f")
    a = task_status(done, "s1", "a")
    assert a["status"] == "FAILED"
    assert a["error"]["reason"] == reason
    assert message in a["error"]["message"]
    # The operator is still alive and serving other flows.
    assert operator.process.poll() is None


async def test_reply_for_an_old_attempt_is_ignored(operator, flows: Flows, nc, svc: str) -> None:
    first: list[Any] = []

    async def reply(msg: Any) -> Any:
        attempt = json.loads(msg.headers["taskflowExecutionContext"])["taskflow"]["taskInfo"][
            "attempt"
        ]
        if attempt == 0:
            first.append(msg)
            return None  # let attempt 0 time out
        # Answer attempt 0 late (stale), then attempt 1 properly.
        await nc.publish(first[0].reply, json.dumps({"success": True, "data": "stale"}).encode())
        await asyncio.sleep(0.2)
        return {"success": True, "data": "fresh"}

    await serve(nc, f"{svc}.do", reply)
    await flows.create(
        flow(svc, ["a"], options={"timeout": "400ms", "maxRetries": 1, "retryDelay": 0}), "f"
    )
    done = await flows.wait("f", timeout=10)
    a = task_status(done, "s1", "a")
    assert a["response"] == "fresh"
    assert a["attempts"][0]["status"] == "TIMED_OUT"
    assert a["attempts"][0].get("lateReply") is True


async def test_large_response_is_kept_out_of_the_object(
    operator, flows: Flows, nc, svc: str
) -> None:
    big = "y" * (200 * 1024)
    await serve(nc, f"{svc}.do", lambda m: {"success": True, "data": big})
    created = await flows.create(flow(svc, ["a"]), "f")
    done = await flows.wait("f")
    a = task_status(done, "s1", "a")
    assert a["status"] == "SUCCEEDED"
    assert "response" not in a
    uid = created["metadata"]["uid"]
    assert a["responseRef"] == f"nats-object://taskflow-responses/{uid}/s1/a/0"
    store = await nc.jetstream().object_store("taskflow-responses")
    stored = await store.get(f"{uid}/s1/a/0")
    assert json.loads(stored.data) == big


async def test_many_task_flow_keeps_status_small(operator, flows: Flows, nc, svc: str) -> None:
    """Responses share a per-flow budget: 300 tasks answering 8 KiB each stay out of status."""
    await serve(nc, f"{svc}.do", lambda m: {"success": True, "data": "z" * 8000})
    await flows.create(flow(svc, [f"t{i}" for i in range(300)]), "f")
    done = await flows.wait("f", timeout=60)
    assert done["status"]["phase"] == "SUCCEEDED"
    assert all("responseRef" in t for t in done["status"]["stages"][0]["tasks"])
    assert len(json.dumps(done)) < 400_000
