"""Poison replies on the real servers: each fails its attempt with a clear error and the flow
moves on (retry, timeout, cancel); a writer that cannot record a flow says so and recovers."""

from __future__ import annotations

import asyncio
import json
import signal
from typing import Any

import pytest
from kubernetes import client

from conftest import Flows, eventually, flow, serve, task_status


def attempt_of(msg: Any) -> int:
    context = json.loads(msg.headers["taskflowExecutionContext"])
    return int(context["taskflow"]["taskInfo"]["attempt"])


def deep(levels: int) -> bytes:
    return b'{"success": true, "data": ' + b"[" * levels + b"]" * levels + b"}"


POISON = {
    # ~600 bytes that once left a flow RUNNING for good (pydantic's serialisation depth).
    "deep-300": (deep(300), None, "BadReply", "nested more than 64 levels deep"),
    "deep-5000": (deep(5000), None, "BadReply", "nested more than 64 levels deep"),
    "nan": (b'{"success": true, "data": {"x": NaN}}', None, "BadReply", "NaN is not"),
    "huge-float": (b'{"success": true, "data": 1e999}', None, "BadReply", "out of range"),
    "lone-surrogate": (
        b'{"success": true, "data": "\\udc00"}',
        None,
        "BadReply",
        "not valid Unicode",
    ),
    # Once dropped by the operator, so the attempt ended TIMED_OUT with the answer lost.
    "long-error-code-header": (
        b"",
        {"Nats-Service-Error": "offline", "Nats-Service-Error-Code": "9" * 400},
        "Service",
        "offline",
    ),
}


@pytest.mark.parametrize("case", list(POISON))
async def test_a_poison_reply_fails_its_attempt_and_the_retry_succeeds(
    operator, flows: Flows, nc, svc: str, case: str
) -> None:
    body, headers, reason, message = POISON[case]

    def reply(msg: Any) -> Any:
        return (body, headers) if attempt_of(msg) == 0 else {"success": True, "data": "fine"}

    rec = await serve(nc, f"{svc}.do", reply)
    await flows.create(
        flow(svc, ["a"], options={"maxRetries": 1, "retryDelay": 0, "timeout": "20s"}), "f"
    )
    done = await flows.wait("f", timeout=15)
    a = task_status(done, "s1", "a")
    assert done["status"]["phase"] == "SUCCEEDED", a
    assert a["response"] == "fine" and len(rec.requests) == 2
    first = a["attempts"][0]
    assert first["status"] == "FAILED"
    assert first["error"]["reason"] == reason
    assert message in first["error"]["message"]
    if case == "long-error-code-header":
        assert first["error"]["code"].endswith("[code cut from 400 characters]")
    assert operator.process.poll() is None


async def test_a_huge_error_is_bounded_in_the_object(operator, flows: Flows, nc, svc: str) -> None:
    """200 KB of message and 300 KB of error.data once grew the object to 885 KB."""
    error = {"message": "m" * 200_000, "code": "E", "data": {"blob": "d" * 300_000}}
    await serve(nc, f"{svc}.do", lambda m: {"success": False, "error": error})
    await flows.create(flow(svc, ["a"], options={"maxRetries": 1, "retryDelay": 0}), "f")
    done = await flows.wait("f")
    a = task_status(done, "s1", "a")
    assert done["status"]["phase"] == "FAILED"
    assert "[error.data of 300011 bytes dropped" in a["error"]["message"]
    assert len(json.dumps(done)) < 32 * 1024


async def test_a_poison_reply_left_in_the_stream_is_not_replayed_forever(
    operator, flows: Flows, nc, svc: str
) -> None:
    """The reply arrives while the operator is down: the restarted writer finds it in the
    reply stream, fails the attempt with it, and the flow moves on."""
    held: list[Any] = []

    def reply(msg: Any) -> Any:
        if attempt_of(msg) == 0:
            held.append(msg)
            return None
        return {"success": True, "data": "fine"}

    await serve(nc, f"{svc}.do", reply)
    await flows.create(
        flow(svc, ["a"], options={"maxRetries": 1, "retryDelay": 0, "timeout": "30s"}), "f"
    )
    await eventually(lambda: held, timeout=10)
    operator.kill(signal.SIGKILL)
    try:
        await nc.publish(held[0].reply, deep(300))
        await nc.flush()
    finally:
        operator.start()
    done = await flows.wait("f", timeout=20)
    a = task_status(done, "s1", "a")
    assert done["status"]["phase"] == "SUCCEEDED"
    assert a["attempts"][0]["error"]["reason"] == "BadReply"


POLICY = "taskflow-test-refuse-results"


async def test_a_writer_that_cannot_write_says_so_and_recovers(
    operator, kube: client.ApiClient, flows: Flows, nc, svc: str
) -> None:
    """The API refuses every status write that records the result (an admission policy, as a
    misconfigured cluster would). The writer does not give up: a Stalled condition and a
    Warning Event name the error, and once the policy goes the flow finishes."""
    admission = client.AdmissionregistrationV1Api(kube)
    await asyncio.to_thread(
        admission.create_validating_admission_policy,
        {
            "metadata": {"name": POLICY},
            "spec": {
                "failurePolicy": "Fail",
                "matchConstraints": {
                    "resourceRules": [
                        {
                            "apiGroups": ["taskflow.dev"],
                            "apiVersions": ["*"],
                            "operations": ["UPDATE"],
                            "resources": ["taskflows/status"],
                        }
                    ],
                    "namespaceSelector": {
                        "matchLabels": {"kubernetes.io/metadata.name": flows.namespace}
                    },
                },
                "validations": [
                    {
                        "expression": "!has(object.status.progress) || "
                        "object.status.progress != '1/1'",
                        "message": "results are refused by a test policy",
                    }
                ],
            },
        },
    )
    await asyncio.to_thread(
        admission.create_validating_admission_policy_binding,
        {
            "metadata": {"name": POLICY},
            "spec": {"policyName": POLICY, "validationActions": ["Deny"]},
        },
    )
    try:
        await asyncio.sleep(2)  # the policy takes a moment to reach the admission chain
        await serve(nc, f"{svc}.do")
        await flows.create(flow(svc, ["a"]), "f")
        stalled = await flows.wait(
            "f",
            timeout=30,
            until=lambda b: any(
                c["type"] == "Stalled" for c in (b.get("status") or {}).get("conditions", [])
            ),
        )
        condition = next(c for c in stalled["status"]["conditions"] if c["type"] == "Stalled")
        assert condition["status"] == "True" and condition["reason"] == "WriterFailing"
        assert "results are refused by a test policy" in condition["message"]
        assert stalled["status"]["phase"] == "RUNNING"
        events = await asyncio.to_thread(
            client.CoreV1Api(kube).list_namespaced_event, flows.namespace
        )
        assert any(e.reason == "WriterFailing" and e.type == "Warning" for e in events.items)
    finally:
        await asyncio.to_thread(admission.delete_validating_admission_policy_binding, POLICY)
        await asyncio.to_thread(admission.delete_validating_admission_policy, POLICY)
    done = await flows.wait("f", timeout=60)
    assert done["status"]["phase"] == "SUCCEEDED"
    assert not any(c["type"] == "Stalled" for c in done["status"]["conditions"])


async def test_replies_dropped_by_a_slow_consumer_are_read_from_the_stream(
    tmp_path_factory: pytest.TempPathFactory, svc: str
) -> None:
    """An operator that may buffer only 8 KB of replies gets 100 replies of 4 KB at once: the
    NATS client drops most of them, and the flow reads those from the reply stream instead of
    waiting for them to time out. (Its own stack: no other operator may serve these flows.)"""
    import nats
    from kubernetes import config

    from conftest import OperatorProcess
    from taskflow.devstack.servers import DevStack

    with DevStack(tmp_path_factory.mktemp("slow-consumer")) as stack:
        api = config.new_client_from_config(str(stack.kubeconfig))
        await asyncio.to_thread(
            client.CoreV1Api(api).create_namespace, client.V1Namespace(metadata={"name": "flows"})
        )
        nc = await nats.connect(stack.nats.url)
        small = OperatorProcess(
            stack, tmp_path_factory.mktemp("slow-operator"), extra=["--reply-pending-bytes", "8192"]
        )
        try:
            gate = asyncio.Event()

            async def reply(msg: Any) -> Any:
                await gate.wait()
                return {"success": True, "data": "x" * 4000}

            rec = await serve(nc, f"{svc}.do", reply)
            small.start()
            flows = Flows(api, "flows")
            await flows.create(
                flow(svc, [f"t{i}" for i in range(100)], options={"timeout": "60s"}), "f"
            )
            for _ in range(400):
                if len(rec.requests) == 100:
                    break
                await asyncio.sleep(0.05)
            gate.set()
            done = await flows.wait("f", timeout=30)
            assert done["status"]["phase"] == "SUCCEEDED"
            assert all(len(t["response"]) == 4000 for t in done["status"]["stages"][0]["tasks"])
            assert small.metrics().get("taskflow_dropped_replies_total", 0) > 0
        finally:
            small.stop()
            await nc.close()
            api.close()


async def test_cancel_acts_on_a_flow_that_got_a_poison_reply(
    operator, flows: Flows, nc, svc: str
) -> None:
    """Once a poison reply left a flow RUNNING for good and a cancel changed nothing."""

    def reply(msg: Any) -> Any:
        return deep(300) if json.loads(msg.data)["task"] == "a" else None  # b: held

    await serve(nc, f"{svc}.do", reply)
    await flows.create(flow(svc, ["a", "b"], options={"timeout": "60s"}), "f")
    await flows.wait(
        "f", until=lambda b: "status" in b and task_status(b, "s1", "a")["status"] == "FAILED"
    )
    await flows.patch("f", {"spec": {"cancel": True}})
    done = await flows.wait("f", timeout=15)
    assert done["status"]["phase"] == "CANCELLED"
    assert task_status(done, "s1", "a")["error"]["reason"] == "BadReply"
    assert task_status(done, "s1", "b")["status"] == "CANCELLED"


async def test_a_timeout_acts_after_a_poison_reply(operator, flows: Flows, nc, svc: str) -> None:
    """Attempt 0 gets a poison reply, attempt 1 no reply at all: its timeout ends the flow."""

    def reply(msg: Any) -> Any:
        return deep(300) if attempt_of(msg) == 0 else None

    await serve(nc, f"{svc}.do", reply)
    await flows.create(
        flow(svc, ["a"], options={"maxRetries": 1, "retryDelay": 0, "timeout": "1s"}), "f"
    )
    done = await flows.wait("f", timeout=15)
    a = task_status(done, "s1", "a")
    assert done["status"]["phase"] == "FAILED"
    assert [(x["status"], x["error"]["reason"]) for x in a["attempts"]] == [
        ("FAILED", "BadReply"),
        ("TIMED_OUT", "Timeout"),
    ]
