"""The service SDK on real servers: side by side with a plain nats-py service, the typed
context, failures, the Services API (ping, queue groups), maxAge drops, cancel notices, and
children started through the SDK (the parent task ends only when they do)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import nats
import pytest

from conftest import ROOT, Flows, serve, task_status
from conftest import flow as plain_flow
from integration.test_client import extract_example
from taskflow.client import TaskflowClient
from taskflow.sdk import Nested, Service, TaskContext, TaskFailure
from taskflow.wire import links
from taskflow.wire.context import EXPIRES_HEADER, IDEMPOTENCY_HEADER


@pytest.fixture
async def services(stack, api_token: str) -> AsyncIterator[Callable[..., Service]]:  # type: ignore[no-untyped-def]
    """Make SDK services on the test's NATS server; all are stopped at the end. Each may use
    the NATS API in the test's namespace (its bearer token)."""
    made: list[Service] = []

    def make(service_id: str, **kwargs: Any) -> Service:
        kwargs.setdefault("api_token", api_token)
        service = Service(service_id, nats_url=stack.nats.url, **kwargs)
        made.append(service)
        return service

    yield make
    for service in made:
        await service.stop(grace=0.5)


@pytest.fixture
async def tf(stack, namespace: str) -> AsyncIterator[TaskflowClient]:  # type: ignore[no-untyped-def]
    client = TaskflowClient(
        kubeconfig=str(stack.kubeconfig), namespace=namespace, nats_url=stack.nats.url
    )
    yield client
    await client.close()


def action(service_id: str, action_name: str, name: str, **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "taskDetails": {"serviceId": service_id, "actionName": action_name},
        **extra,
    }


def flow(*stages: tuple[str, list[dict[str, Any]]], **options: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"stages": [{"name": n, "tasks": t} for n, t in stages]}
    if options:
        body["options"] = options
    return {"spec": body}


# -- side by side ------------------------------------------------------------------------------


async def test_an_sdk_service_and_a_plain_nats_py_service_side_by_side(
    operator, flows: Flows, nc, svc: str, services: Callable[..., Service]
) -> None:
    sdk = services(f"{svc}-sdk")
    seen: dict[str, TaskContext] = {}

    @sdk.action("first")
    async def first(params: dict[str, Any], ctx: TaskContext) -> Any:
        seen["first"] = ctx
        return {"doubled": params["x"] * 2}

    @sdk.action("second")
    async def second(params: dict[str, Any], ctx: TaskContext) -> Any:
        seen["second"] = ctx
        return {
            "sum": ctx.previous_response("viaSdk")["doubled"]
            + ctx.previous_response("viaPlain")["tripled"]
        }

    await sdk.start()

    async def plain(msg: Any) -> None:  # no SDK: any NATS client can serve a task
        params = json.loads(msg.data)
        await msg.respond(
            json.dumps({"success": True, "data": {"tripled": params["x"] * 3}}).encode()
        )

    await nc.subscribe(f"{svc}-plain.triple", queue=f"{svc}-plain", cb=plain)

    created = await flows.create(
        flow(
            (
                "one",
                [
                    action(f"{svc}-sdk", "first", "viaSdk", params={"x": 2}),
                    action(f"{svc}-plain", "triple", "viaPlain", params={"x": 2}),
                ],
            ),
            ("two", [action(f"{svc}-sdk", "second", "combine")]),
            timeout="20s",
            maxAge="1m",
        )
    )
    done = await flows.wait(created["metadata"]["name"])

    assert done["status"]["phase"] == "SUCCEEDED"
    assert task_status(done, "one", "viaSdk")["response"] == {"doubled": 4}
    assert task_status(done, "one", "viaPlain")["response"] == {"tripled": 6}
    assert task_status(done, "two", "combine")["response"] == {"sum": 10}

    uid = created["metadata"]["uid"]
    ctx = seen["first"]
    stage = done["status"]["stages"][0]
    assert ctx.taskflow_id == uid
    assert ctx.stage == "one" and ctx.stage_id == stage["id"]
    assert ctx.task_name == "viaSdk" and ctx.task_id == task_status(done, "one", "viaSdk")["id"]
    assert ctx.task_type == "ACTION"
    assert ctx.attempt == 0
    assert ctx.idempotency_key == f"{uid}/one/viaSdk/0"
    assert ctx.params == {"x": 2}
    assert ctx.options["timeout"] == 20_000 and ctx.options["maxAge"] == 60_000
    assert ctx.previous_stage_responses == []
    assert ctx.parent_context is None
    now = int(time.time() * 1000)
    assert ctx.deadline is not None and now - 30_000 < ctx.deadline < now + 20_000
    assert ctx.expires_at is not None and ctx.expires_at > ctx.deadline
    assert ctx.raw["taskflow"]["taskInfo"]["name"] == "viaSdk"
    assert seen["second"].previous_stage_responses == [
        {"taskName": "viaSdk", "response": {"success": True, "data": {"doubled": 4}}},
        {"taskName": "viaPlain", "response": {"success": True, "data": {"tripled": 6}}},
    ]
    assert sdk.counters.handled == 2 and sdk.counters.succeeded == 2


async def test_the_service_is_discoverable_through_the_services_api(
    nc, svc: str, services: Callable[..., Service]
) -> None:
    service = services(svc, version="2.1.0")

    @service.action("AddApplianceToGroup")
    async def add(params: Any, ctx: TaskContext) -> Any:
        return params

    await service.start()

    ping = json.loads((await nc.request(f"$SRV.PING.{svc}", b"", timeout=2)).data)
    info = json.loads((await nc.request(f"$SRV.INFO.{svc}", b"", timeout=2)).data)

    assert ping["name"] == svc and ping["version"] == "2.1.0"
    assert [(e["name"], e["subject"], e["queue_group"]) for e in info["endpoints"]] == [
        ("AddApplianceToGroup", f"{svc}.AddApplianceToGroup", svc)
    ]
    reply = json.loads(
        (await nc.request(f"{svc}.AddApplianceToGroup", b'{"a": 1}', timeout=2)).data
    )
    assert reply == {"success": True, "data": {"a": 1}}


async def test_instances_share_the_work_through_the_queue_group(
    operator, flows: Flows, svc: str, services: Callable[..., Service]
) -> None:
    instances = [services(svc), services(svc)]
    for instance in instances:

        @instance.action("work")
        async def work(params: Any, ctx: TaskContext) -> Any:
            await asyncio.sleep(0.05)
            return params["i"]

        await instance.start()

    created = await flows.create(
        flow(("all", [action(svc, "work", f"t{i}", params={"i": i}) for i in range(12)]))
    )
    done = await flows.wait(created["metadata"]["name"])

    assert done["status"]["phase"] == "SUCCEEDED"
    assert sum(i.counters.handled for i in instances) == 12
    assert [task_status(done, "all", f"t{i}")["response"] for i in range(12)] == list(range(12))


async def test_failures_become_failure_replies_with_code_and_message(
    operator, flows: Flows, svc: str, services: Callable[..., Service]
) -> None:
    service = services(svc)

    @service.action("refuse")
    async def refuse(params: Any, ctx: TaskContext) -> Any:
        raise TaskFailure(f"appliance unreachable on attempt {ctx.attempt}", code="UNREACHABLE")

    @service.action("crash")
    async def crash(params: Any, ctx: TaskContext) -> Any:
        raise ValueError("bad value")

    await service.start()
    created = await flows.create(
        flow(
            (
                "s",
                [
                    action(svc, "refuse", "refused", options={"maxRetries": 1}),
                    action(svc, "crash", "crashed"),
                ],
            ),
            continueOnTaskFailure=True,
            retryDelay=0,
        )
    )
    done = await flows.wait(created["metadata"]["name"])

    assert done["status"]["phase"] == "COMPLETED_WITH_FAILURES"
    refused = task_status(done, "s", "refused")
    assert refused["status"] == "FAILED" and refused["attempt"] == 1
    assert [(a["error"]["code"], a["error"]["message"]) for a in refused["attempts"]] == [
        ("UNREACHABLE", "appliance unreachable on attempt 0"),
        ("UNREACHABLE", "appliance unreachable on attempt 1"),
    ]
    crashed = task_status(done, "s", "crashed")
    assert crashed["error"]["code"] == "ValueError"
    assert crashed["error"]["message"] == "bad value"
    assert service.counters.failed == 3


# -- maxAge ------------------------------------------------------------------------------------


async def test_a_request_past_its_max_age_is_dropped_unanswered(
    nc, svc: str, services: Callable[..., Service]
) -> None:
    service = services(svc)
    calls: list[Any] = []

    @service.action("act")
    async def act(params: Any, ctx: TaskContext) -> Any:
        calls.append(params)
        return "done"

    await service.start()
    now = int(time.time() * 1000)

    with pytest.raises(TimeoutError):
        await nc.request(
            f"{svc}.act", b'{"stale": true}', timeout=1, headers={EXPIRES_HEADER: str(now - 1)}
        )
    fresh = await nc.request(
        f"{svc}.act", b'{"stale": false}', timeout=2, headers={EXPIRES_HEADER: str(now + 60_000)}
    )

    assert json.loads(fresh.data) == {"success": True, "data": "done"}
    assert calls == [{"stale": False}]
    assert service.counters.dropped_expired == 1


async def test_a_task_that_waited_past_its_max_age_is_never_run(
    operator, flows: Flows, svc: str, services: Callable[..., Service]
) -> None:
    service = services(svc, max_concurrency=1)  # one at a time: the second request queues
    ran: list[str] = []

    @service.action("act")
    async def act(params: Any, ctx: TaskContext) -> Any:
        ran.append(ctx.task_name or "?")
        await asyncio.sleep(params["sleep"])
        return "ok"

    await service.start()
    created = await flows.create(
        flow(
            (
                "s",
                [
                    action(svc, "act", "slow", params={"sleep": 2}, options={"timeout": "10s"}),
                    action(
                        svc,
                        "act",
                        "late",
                        params={"sleep": 0},
                        options={"maxAge": "1s", "timeout": "4s"},
                    ),
                ],
            ),
            continueOnTaskFailure=True,
        )
    )
    done = await flows.wait(created["metadata"]["name"])

    assert ran == ["slow"]
    assert service.counters.dropped_expired == 1
    assert task_status(done, "s", "slow")["status"] == "SUCCEEDED"
    late = task_status(done, "s", "late")
    assert late["status"] == "TIMED_OUT"
    assert done["status"]["phase"] == "COMPLETED_WITH_FAILURES"


# -- cancel ------------------------------------------------------------------------------------


async def test_a_cancel_notice_cancels_the_running_handler(
    operator, flows: Flows, tf: TaskflowClient, svc: str, services: Callable[..., Service]
) -> None:
    service = services(svc)
    started, cancelled = asyncio.Event(), asyncio.Event()

    @service.action("long")
    async def long(params: Any, ctx: TaskContext) -> Any:
        started.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return "never"

    await service.start()
    created = await flows.create(flow(("s", [action(svc, "long", "t")])))
    await asyncio.wait_for(started.wait(), 20)

    res = await tf.cancel(created["metadata"]["uid"])

    assert res["success"], res
    await asyncio.wait_for(cancelled.wait(), 10)
    done = await flows.wait(created["metadata"]["name"])
    assert done["status"]["phase"] == "CANCELLED"
    assert task_status(done, "s", "t")["status"] == "CANCELLED"
    assert service.counters.cancelled == 1


async def test_a_cancel_notice_that_overtakes_its_request_drops_it(
    nc, svc: str, services: Callable[..., Service]
) -> None:
    service = services(svc)

    @service.action("act")
    async def act(params: Any, ctx: TaskContext) -> Any:
        return "ran"

    await service.start()
    key = "0b7c6a2e-1111-4222-8333-944455556666/s/t/0"
    await nc.publish(f"taskflow.cancel.{svc}", json.dumps({"idempotencyKey": key}).encode())
    await nc.flush()
    await asyncio.sleep(0.2)

    with pytest.raises(TimeoutError):
        await nc.request(f"{svc}.act", b"{}", timeout=1, headers={IDEMPOTENCY_HEADER: key})
    assert service.counters.dropped_cancelled == 1


async def test_a_redelivered_attempt_gets_the_same_reply_without_running_twice(
    nc, svc: str, services: Callable[..., Service]
) -> None:
    service = services(svc)
    runs: list[int] = []

    @service.action("act")
    async def act(params: Any, ctx: TaskContext) -> Any:
        runs.append(ctx.attempt)
        return len(runs)

    await service.start()
    headers = {IDEMPOTENCY_HEADER: "0b7c6a2e-1111-4222-8333-944455556666/s/t/3"}
    for _ in range(20):
        # (Twice in many runs under load this connection's first request, right after the
        # service's subscribe + flush on its own connection, met "no responders": the same
        # redelivery the operator makes; the point here is what the second request gets.)
        try:
            first = await nc.request(f"{svc}.act", b"{}", timeout=2, headers=headers)
            break
        except nats.errors.NoRespondersError:
            await asyncio.sleep(0.05)
    second = await nc.request(f"{svc}.act", b"{}", timeout=2, headers=headers)

    assert first.data == second.data == b'{"success":true,"data":1}'
    assert runs == [3]


# -- child flows -------------------------------------------------------------------------------


def leaf_service(
    services: Callable[..., Service], service_id: str
) -> tuple[Service, dict[str, asyncio.Event], dict[str, TaskContext]]:
    """``<id>.work`` holds each child's task until the test releases it by label."""
    leaf = services(service_id)
    gates: dict[str, asyncio.Event] = {}
    contexts: dict[str, TaskContext] = {}

    @leaf.action("work")
    async def work(params: Any, ctx: TaskContext) -> Any:
        contexts[params["label"]] = ctx
        await gates.setdefault(params["label"], asyncio.Event()).wait()
        return f"{params['label']} done"

    return leaf, gates, contexts


def child_spec(leaf_id: str, label: str) -> dict[str, Any]:
    return {
        "stages": [
            {
                "name": "c",
                "tasks": [
                    {
                        "name": "work",
                        "params": {"label": label},
                        "taskDetails": {"serviceId": leaf_id, "actionName": "work"},
                    }
                ],
            }
        ]
    }


async def wait_task(
    flows: Flows,
    name: str,
    stage: str,
    task: str,
    until: Callable[[dict[str, Any]], bool],
    timeout: float = 20,
) -> dict[str, Any]:
    body = await flows.wait(
        name,
        until=lambda b: (
            bool(b.get("status", {}).get("stages")) and until(task_status(b, stage, task))
        ),
        timeout=timeout,
    )
    return task_status(body, stage, task)


async def test_a_service_starts_two_children_and_its_task_ends_after_both(
    operator,
    flows: Flows,
    tf: TaskflowClient,
    svc: str,
    services: Callable[..., Service],
    stack,
    namespace: str,
) -> None:
    kube_client = TaskflowClient(
        kubeconfig=str(stack.kubeconfig), namespace=namespace, nats_url=stack.nats.url
    )
    parent_svc = services(svc, client=kube_client)
    leaf, gates, contexts = leaf_service(services, f"{svc}-leaf")
    parent_ctx: dict[str, TaskContext] = {}

    @parent_svc.action("fanout")
    async def fanout(params: Any, ctx: TaskContext) -> Any:
        parent_ctx["ctx"] = ctx
        first = await ctx.start_child(child_spec(f"{svc}-leaf", "a"))
        await ctx.start_child(child_spec(f"{svc}-leaf", "b"))
        return Nested({"started": 2}, children=[first])  # named twice, listed once

    for service in (parent_svc, leaf):
        await service.start()
    gates["a"], gates["b"] = asyncio.Event(), asyncio.Event()
    created = await flows.create(flow(("spawn", [action(svc, "fanout", "fanout")])))
    name, uid = created["metadata"]["name"], created["metadata"]["uid"]

    running = await wait_task(
        flows,
        name,
        "spawn",
        "fanout",
        lambda t: len(t.get("nestedActiveRunningTaskFlowIds", [])) == 2,
    )
    assert running["status"] == "RUNNING" and running["waitingReason"] == "Children"
    refs = running["nestedTaskflows"]
    assert len(refs) == 2 and all(r.startswith(f"{namespace}/") for r in refs)
    await asyncio.sleep(0.5)
    assert task_status(await flows.get(name), "spawn", "fanout")["status"] == "RUNNING"

    gates["a"].set()
    await wait_task(
        flows,
        name,
        "spawn",
        "fanout",
        lambda t: len(t.get("nestedActiveRunningTaskFlowIds", [])) == 1,
    )
    await asyncio.sleep(0.5)
    assert task_status(await flows.get(name), "spawn", "fanout")["status"] == "RUNNING"
    assert (await flows.get(name))["status"]["phase"] == "RUNNING"

    gates["b"].set()
    done = await flows.wait(name)
    assert done["status"]["phase"] == "SUCCEEDED"
    fanout_status = task_status(done, "spawn", "fanout")
    assert fanout_status["response"] == {"started": 2}
    assert sorted(fanout_status["nestedTaskflows"]) == sorted(refs)
    assert fanout_status["nestedActiveRunningTaskFlowIds"] == []

    # Linked exactly as the operator links an inline nested flow.
    child = await flows.get(refs[0].split("/")[1])
    meta = child["metadata"]
    assert meta["labels"][links.PARENT_UID] == uid
    assert meta["labels"][links.PARENT_NAME] == name
    assert meta["annotations"][links.PARENT_TASK] == "spawn.fanout"
    assert meta["annotations"][links.PARENT_ATTEMPT] == "0"
    assert meta["annotations"][links.DEPTH] == "1"
    assert json.loads(meta["annotations"][links.PARENT_CONTEXT]) == parent_ctx["ctx"].raw
    assert meta["ownerReferences"] == [
        {
            "apiVersion": "taskflow.dev/v1alpha1",
            "kind": "Taskflow",
            "name": name,
            "uid": uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]
    # The child's service sees the parent task's context in meta, as in the seed.
    assert contexts["a"].parent_context == parent_ctx["ctx"].raw
    assert contexts["a"].meta == {"taskflowExecutionContext": parent_ctx["ctx"].raw}

    tree = (await tf.get_details(uid))["data"]
    kids = tree["stages"][0]["tasks"][0]["children"]
    assert sorted(f"{k['namespace']}/{k['name']}" for k in kids) == sorted(refs)
    assert {k["status"] for k in kids} == {"SUCCEEDED"}
    await kube_client.close()


async def test_children_can_be_started_through_the_operators_nats_api(
    operator, flows: Flows, svc: str, services: Callable[..., Service], namespace: str
) -> None:
    parent_svc = services(svc)  # no Kubernetes client: ctx.start_child goes over NATS
    leaf, gates, _ = leaf_service(services, f"{svc}-leaf")

    @parent_svc.action("fanout")
    async def fanout(params: Any, ctx: TaskContext) -> Any:
        for label in ("a", "b"):
            await ctx.start_child(child_spec(f"{svc}-leaf", label))
        return "started"

    for service in (parent_svc, leaf):
        await service.start()
    gates["a"], gates["b"] = asyncio.Event(), asyncio.Event()
    created = await flows.create(flow(("spawn", [action(svc, "fanout", "fanout")])))
    name = created["metadata"]["name"]

    running = await wait_task(
        flows,
        name,
        "spawn",
        "fanout",
        lambda t: len(t.get("nestedActiveRunningTaskFlowIds", [])) == 2,
    )
    assert running["status"] == "RUNNING"
    gates["a"].set()
    gates["b"].set()
    done = await flows.wait(name)

    assert done["status"]["phase"] == "SUCCEEDED"
    children = [f for f in await flows.list() if f["metadata"]["name"] != name]
    assert len(children) == 2
    assert {c["metadata"]["labels"][links.PARENT_UID] for c in children} == {
        created["metadata"]["uid"]
    }


async def test_a_refused_child_fails_the_task_with_the_servers_message(
    operator, flows: Flows, svc: str, services: Callable[..., Service]
) -> None:
    parent_svc = services(svc)

    @parent_svc.action("fanout")
    async def fanout(params: Any, ctx: TaskContext) -> Any:
        await ctx.start_child({"stages": []})
        return "unreachable"

    await parent_svc.start()
    created = await flows.create(flow(("spawn", [action(svc, "fanout", "fanout")])))
    done = await flows.wait(created["metadata"]["name"])

    error = task_status(done, "spawn", "fanout")["error"]
    assert error["code"] == "CHILD_REFUSED"
    assert error["message"].startswith("could not start a child taskflow: Taskflow.taskflow.dev")
    assert "spec.stages" in error["message"]


async def test_a_handler_failing_after_starting_children_cancels_them(
    operator, flows: Flows, svc: str, services: Callable[..., Service]
) -> None:
    parent_svc = services(svc, max_children_per_task=1)

    @parent_svc.action("fanout")
    async def fanout(params: Any, ctx: TaskContext) -> Any:
        await ctx.start_child(child_spec(f"{svc}-nobody", "a"))
        await ctx.start_child(child_spec(f"{svc}-nobody", "b"))  # one too many
        return "unreachable"

    await parent_svc.start()
    created = await flows.create(flow(("spawn", [action(svc, "fanout", "fanout")])))
    done = await flows.wait(created["metadata"]["name"])

    error = task_status(done, "spawn", "fanout")["error"]
    assert (error["code"], error["message"]) == (
        "CHILD_LIMIT",
        "a task may start at most 1 child flows",
    )
    [child] = [
        f for f in await flows.list() if f["metadata"]["name"] != created["metadata"]["name"]
    ]
    assert child["spec"]["cancel"] is True
    await flows.wait(child["metadata"]["name"])


async def test_children_that_start_running_before_the_reply_are_still_waited_for(
    operator, flows: Flows, svc: str, services: Callable[..., Service], stack, namespace: str
) -> None:
    kube_client = TaskflowClient(
        kubeconfig=str(stack.kubeconfig), namespace=namespace, nats_url=stack.nats.url
    )
    parent_svc = services(svc, client=kube_client)
    leaf, gates, contexts = leaf_service(services, f"{svc}-leaf")

    @parent_svc.action("fanout")
    async def fanout(params: Any, ctx: TaskContext) -> Any:
        await ctx.start_child(child_spec(f"{svc}-leaf", "a"))
        await ctx.start_child(child_spec(f"{svc}-leaf", "b"))
        while len(contexts) < 2:  # the children run before this handler replies
            await asyncio.sleep(0.05)
        await asyncio.sleep(1)
        return "started"

    for service in (parent_svc, leaf):
        await service.start()
    gates["a"], gates["b"] = asyncio.Event(), asyncio.Event()
    try:
        created = await flows.create(flow(("spawn", [action(svc, "fanout", "fanout")])))
        name = created["metadata"]["name"]
        await wait_task(
            flows,
            name,
            "spawn",
            "fanout",
            lambda t: t.get("waitingReason") == "Children" or t["status"] != "RUNNING",
        )
        await asyncio.sleep(0.5)
        assert task_status(await flows.get(name), "spawn", "fanout")["status"] == "RUNNING"
    finally:
        gates["a"].set()
        gates["b"].set()
        await kube_client.close()


async def test_the_docs_example_runs(operator, stack, namespace: str, svc: str) -> None:
    code = extract_example(ROOT / "docs/sdk.md")
    env = {
        **os.environ,
        "KUBECONFIG": str(stack.kubeconfig),
        "NATS_URL": stack.nats.url,
        "TASKFLOW_NAMESPACE": namespace,
        "SERVICE_ID": svc,
    }
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


async def test_a_failure_no_retry_can_help_fails_the_task_at_once(
    operator, flows: Flows, svc: str, services: Callable[..., Service]
) -> None:
    """``TaskFailure(retryable=False)`` from the SDK, and a code the flow lists in
    ``nonRetryableCodes``: one attempt each, whatever maxRetries says; others are retried."""
    service = services(svc)
    calls: dict[str, int] = {}

    @service.action("do")
    async def do(params: Any, ctx: TaskContext) -> Any:
        calls[params["task"]] = calls.get(params["task"], 0) + 1
        if params["task"] == "invalid":
            raise TaskFailure("the request names no device", code="INVALID", retryable=False)
        if params["task"] == "missing":
            raise TaskFailure("no such device", code="NOT_FOUND")
        raise TaskFailure("busy", code="BUSY")

    await service.start()
    spec = plain_flow(
        svc,
        ["invalid", "missing", "busy"],
        options={
            "maxRetries": 2,
            "retryDelay": 50,
            "nonRetryableCodes": ["NOT_FOUND"],
            "continueOnTaskFailure": True,
        },
    )
    await flows.create(spec, "f")
    done = await flows.wait("f")
    assert calls == {"invalid": 1, "missing": 1, "busy": 3}
    invalid = task_status(done, "s1", "invalid")
    assert invalid["status"] == "FAILED" and invalid["error"]["retryable"] is False
    assert task_status(done, "s1", "missing")["attempt"] == 0
    assert task_status(done, "s1", "busy")["attempt"] == 2


async def test_retries_back_off(operator, flows: Flows, nc, svc: str) -> None:
    """retryDelay 200 ms, factor 3: the second retry waits at least 600 ms after the first
    attempt's failure (lower bounds only: the machine may be slower, never faster)."""
    seen: list[float] = []

    def answer(msg: Any) -> Any:
        seen.append(time.monotonic())
        return {"success": False, "error": {"message": "down", "code": "DOWN"}}

    await serve(nc, f"{svc}.do", answer)
    await flows.create(
        plain_flow(
            svc, ["t"], options={"maxRetries": 2, "retryDelay": 200, "retryBackoff": {"factor": 3}}
        ),
        "f",
    )
    done = await flows.wait("f")
    assert done["status"]["phase"] == "FAILED" and len(seen) == 3
    assert seen[1] - seen[0] >= 0.2 and seen[2] - seen[1] >= 0.6
    codes = [a["error"]["code"] for a in task_status(done, "s1", "t")["attempts"]]
    assert codes == ["DOWN", "DOWN", "DOWN"]
