"""Retry and cancel by patching spec, on real servers: every scope, idempotence, refusals, races.

Which tasks re-ran is counted on the service side (requests received per task name).
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from typing import Any

import pytest

from conftest import Flows, Kubectl, flow, serve, task_status


class Service:
    """Fails the task names in ``failing``; counts requests per task name."""

    def __init__(self) -> None:
        self.failing: set[str] = set()
        self.calls: Counter[str] = Counter()
        self.hold: asyncio.Event | None = None  # when set, answers wait for it

    async def __call__(self, msg: Any) -> dict[str, Any]:
        if self.hold is not None:
            await self.hold.wait()
        name = json.loads(msg.data)["task"]
        self.calls[name] += 1
        if name in self.failing:
            return {"success": False, "error": {"message": f"{name} failed"}}
        return {"success": True, "data": f"{name}#{self.calls[name]}"}


async def failed_flow(
    flows: Flows, nc: Any, svc: str, *, exactly_once: bool, cont: bool = True
) -> Service:
    """s1: a, b (b fails) ; s2: c, d — finished, with b FAILED."""
    service = Service()
    service.failing = {"b"}
    await serve(nc, f"{svc}.do", service)
    await flows.create(
        flow(
            svc,
            ["a", "b"],
            ["c", "d"],
            options={"exactlyOnceTaskExecution": exactly_once, "continueOnTaskFailure": cont},
        ),
        "f",
    )
    done = await flows.wait("f")
    assert done["status"]["phase"] == ("COMPLETED_WITH_FAILURES" if cont else "FAILED")
    service.failing.clear()
    service.calls.clear()
    return service


async def retry(flows: Flows, request: dict[str, Any]) -> dict[str, Any]:
    await flows.patch("f", {"spec": {"retry": request}})
    return await flows.wait(
        "f",
        lambda b: (
            (b["status"].get("retry") or {}).get("id") == request["id"]
            and b["status"]["phase"] not in ("RUNNING",)
        ),
    )


@pytest.mark.parametrize("exactly_once", [True, False])
async def test_retry_whole_flow(operator, flows: Flows, nc, svc: str, exactly_once: bool) -> None:
    service = await failed_flow(flows, nc, svc, exactly_once=exactly_once)
    done = await retry(flows, {"id": "r1"})
    assert done["status"]["phase"] == "SUCCEEDED"
    assert done["status"]["retry"]["accepted"] is True
    if exactly_once:
        assert service.calls == {"b": 1}  # SUCCEEDED tasks are never dispatched again
        assert task_status(done, "s1", "a")["response"] == "a#1"  # old response kept
        assert task_status(done, "s1", "a")["attempt"] == 0
    else:
        assert service.calls == {"a": 1, "b": 1, "c": 1, "d": 1}
        assert task_status(done, "s1", "a")["attempt"] == 1  # attempt numbers keep counting
    b = task_status(done, "s1", "b")
    assert b["attempt"] == 1
    assert [x["status"] for x in b["attempts"]] == ["FAILED", "SUCCEEDED"]


async def test_retry_failed_only(operator, flows: Flows, nc, svc: str) -> None:
    service = await failed_flow(flows, nc, svc, exactly_once=False, cont=False)
    done = await retry(flows, {"id": "r1", "failedOnly": True})
    assert done["status"]["phase"] == "SUCCEEDED"
    # b re-ran; the SKIPPED later stage ran for the first time; a was not touched.
    assert service.calls == {"b": 1, "c": 1, "d": 1}


async def test_retry_given_stages(operator, flows: Flows, nc, svc: str) -> None:
    service = await failed_flow(flows, nc, svc, exactly_once=False)
    done = await retry(flows, {"id": "r1", "stages": [{"name": "s2"}]})
    assert done["status"]["phase"] == "COMPLETED_WITH_FAILURES"  # b still failed in s1
    assert service.calls == {"c": 1, "d": 1}
    assert task_status(done, "s2", "c")["response"] == "c#1"


async def test_retry_given_tasks(operator, flows: Flows, nc, svc: str) -> None:
    service = await failed_flow(flows, nc, svc, exactly_once=False)
    done = await retry(flows, {"id": "r1", "stages": [{"name": "s1", "tasks": ["b"]}]})
    # b re-ran, and the later stage that depended on it ran again.
    assert service.calls == {"b": 1, "c": 1, "d": 1}
    assert done["status"]["phase"] == "SUCCEEDED"


async def test_same_retry_is_acted_on_once(
    operator, flows: Flows, nc, svc: str, kubectl: Kubectl, namespace: str
) -> None:
    service = await failed_flow(flows, nc, svc, exactly_once=True)
    patch = json.dumps({"spec": {"retry": {"id": "again-1"}}})
    kubectl("patch", "tf", "f", "-n", namespace, "--type", "merge", "-p", patch)
    done = await flows.wait(
        "f",
        lambda b: (
            (b["status"].get("retry") or {}).get("id") == "again-1"
            and b["status"]["phase"] == "SUCCEEDED"
        ),
    )
    # Re-applying the same object (as from `kubectl get -o yaml`) changes nothing.
    kubectl("patch", "tf", "f", "-n", namespace, "--type", "merge", "-p", patch)
    manifest = await flows.get("f")
    manifest["metadata"].pop("resourceVersion")
    manifest.pop("status")
    kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(manifest))
    await asyncio.sleep(1.5)
    after = await flows.get("f")
    assert service.calls == {"b": 1}
    assert after["status"]["retry"] == done["status"]["retry"]
    assert after["status"]["phase"] == "SUCCEEDED"


async def test_retry_refusals_are_reported(operator, flows: Flows, nc, svc: str) -> None:
    release = asyncio.Event()

    async def slow(msg: Any) -> dict[str, Any]:
        await release.wait()
        return {"success": True, "data": 1}

    await serve(nc, f"{svc}.do", slow)
    await flows.create(flow(svc, ["a"], ["b"]), "f")
    await flows.wait("f", lambda b: (b.get("status") or {}).get("phase") == "RUNNING")
    await flows.patch("f", {"spec": {"retry": {"id": "too-early"}}})
    refused = await flows.wait(
        "f", lambda b: (b["status"].get("retry") or {}).get("id") == "too-early"
    )
    assert refused["status"]["retry"]["accepted"] is False
    assert "only a finished flow can be retried" in refused["status"]["retry"]["message"]
    cond = next(c for c in refused["status"]["conditions"] if c["type"] == "RetryAccepted")
    assert cond["status"] == "False" and "too-early" in cond["message"]
    release.set()
    await flows.wait("f")
    await flows.patch(
        "f", {"spec": {"retry": {"id": "bad-task", "stages": [{"name": "s1", "tasks": ["nope"]}]}}}
    )
    refused = await flows.wait(
        "f", lambda b: (b["status"].get("retry") or {}).get("id") == "bad-task"
    )
    assert refused["status"]["retry"]["accepted"] is False
    assert "unknown task 'nope'" in refused["status"]["retry"]["message"]
    assert refused["status"]["phase"] == "SUCCEEDED"  # nothing half-applied


async def test_cancel_with_100_tasks_in_flight(operator, flows: Flows, nc, svc: str) -> None:
    held: list[Any] = []
    await serve(nc, f"{svc}.do", lambda m: held.append(m))
    notices = await nc.subscribe(f"taskflow.cancel.{svc}")
    names = [f"t{i:03d}" for i in range(100)]
    await flows.create(flow(svc, names, ["never"]), "f")
    for _ in range(100):
        if len(held) == 100:
            break
        await asyncio.sleep(0.1)
    assert len(held) == 100
    await flows.patch("f", {"spec": {"cancel": True}})
    done = await flows.wait("f")
    status = done["status"]
    assert status["phase"] == "CANCELLED"
    assert {t["status"] for t in status["stages"][0]["tasks"]} == {"CANCELLED"}
    assert status["stages"][1]["status"] == "SKIPPED"
    assert any(c["type"] == "Cancelled" and c["status"] == "True" for c in status["conditions"])
    keys = set()
    for _ in range(100):
        msg = await notices.next_msg(timeout=5)
        keys.add(json.loads(msg.data)["idempotencyKey"])
    uid = done["metadata"]["uid"]
    assert keys == {f"{uid}/s1/{n}/0" for n in names}
    # A late reply is recorded as late and changes no outcome.
    await nc.publish(held[0].reply, json.dumps({"success": True, "data": "late"}).encode())
    late = await flows.wait(
        "f",
        lambda b: (
            task_status(b, "s1", held_name(held[0])).get("attempts", [{}])[-1].get("lateReply")
            is True
        ),
        timeout=10,
    )
    assert late["status"]["phase"] == "CANCELLED"
    assert task_status(late, "s1", held_name(held[0]))["status"] == "CANCELLED"


def held_name(msg: Any) -> str:
    return str(json.loads(msg.data)["task"])


async def test_cancel_of_a_finished_flow_is_a_recorded_noop(
    operator, flows: Flows, nc, svc: str
) -> None:
    await serve(nc, f"{svc}.do")
    await flows.create(flow(svc, ["a"]), "f")
    await flows.wait("f")
    await flows.patch("f", {"spec": {"cancel": True}})
    done = await flows.wait(
        "f", lambda b: any(c["type"] == "Cancelled" for c in b["status"].get("conditions", []))
    )
    cond = next(c for c in done["status"]["conditions"] if c["type"] == "Cancelled")
    assert (cond["status"], cond["reason"]) == ("False", "AlreadyFinished")
    assert done["status"]["phase"] == "SUCCEEDED"


async def test_retry_right_after_failure_and_two_quick_retries(
    operator, flows: Flows, nc, svc: str
) -> None:
    service = await failed_flow(flows, nc, svc, exactly_once=True)
    service.failing = {"b"}
    await flows.patch("f", {"spec": {"retry": {"id": "q1"}}})
    await flows.patch("f", {"spec": {"retry": {"id": "q2"}}})
    done = await flows.wait(
        "f",
        lambda b: (
            (b["status"].get("retry") or {}).get("id") == "q2" and b["status"]["phase"] != "RUNNING"
        ),
    )
    # q1 may have run (then q2 was refused or ran after it) or been superseded by q2:
    # either way b ran at most twice and each attempt had its own number.
    b = task_status(done, "s1", "b")
    assert service.calls["b"] in (1, 2)
    assert [x["attempt"] for x in b["attempts"]] == list(range(len(b["attempts"])))
    assert set(service.calls) == {"b"}


async def test_cancel_during_a_retry(operator, flows: Flows, nc, svc: str) -> None:
    service = await failed_flow(flows, nc, svc, exactly_once=False)
    service.hold = release = asyncio.Event()
    await flows.patch("f", {"spec": {"retry": {"id": "r1"}}})
    await flows.wait("f", lambda b: b["status"]["phase"] == "RUNNING")
    await flows.patch("f", {"spec": {"cancel": True}})
    done = await flows.wait("f")
    service.hold = None
    release.set()
    assert done["status"]["phase"] == "CANCELLED"
    assert done["status"]["retry"]["id"] == "r1"
    # A retry after the cancel needs cancel unset in the same patch.
    await flows.patch("f", {"spec": {"cancel": False, "retry": {"id": "r2"}}})
    final = await flows.wait(
        "f",
        lambda b: (
            (b["status"].get("retry") or {}).get("id") == "r2" and b["status"]["phase"] != "RUNNING"
        ),
        timeout=30,
    )
    assert final["status"]["phase"] == "SUCCEEDED"
