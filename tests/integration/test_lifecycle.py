"""Run lifecycle on the real servers: suspend and resume, and finished flows deleted after their
TTL with their final status kept in the history."""

from __future__ import annotations

import asyncio
import json

import pytest
from kubernetes.client.exceptions import ApiException

from conftest import Flows, flow, serve, task_status

# -- on the real servers -------------------------------------------------------------------------


@pytest.mark.integration
async def test_suspend_and_resume_on_the_real_servers(operator, flows: Flows, nc, svc: str) -> None:
    seen = await serve(nc, f"{svc}.do")
    await flows.create({**flow(svc, ["a"], ["b"]), "suspend": True}, "f")
    body = await flows.wait("f", until=lambda b: bool((b.get("status") or {}).get("suspendedAt")))
    await asyncio.sleep(0.5)
    assert seen.requests == [] and body["status"]["phase"] == "RUNNING"
    await flows.patch("f", {"spec": {"suspend": False}})
    done = await flows.wait("f")
    assert done["status"]["phase"] == "SUCCEEDED" and len(seen.requests) == 2
    cond = next(c for c in done["status"]["conditions"] if c["type"] == "Suspended")
    assert cond["status"] == "False" and cond["reason"] == "Resumed"


@pytest.mark.integration
async def test_a_finished_flow_is_deleted_after_its_ttl_and_kept_in_the_history(
    operator, flows: Flows, nc, svc: str
) -> None:
    await serve(nc, f"{svc}.do")
    created = await flows.create({**flow(svc, ["a"]), "ttl": {"afterSucceeded": "1s"}}, "f")
    keep = await flows.create(flow(svc, ["a"]), "kept")  # no TTL, no default: kept
    uid = created["metadata"]["uid"]
    for _ in range(150):
        try:
            await flows.get("f")
        except ApiException as exc:
            assert exc.status == 404
            break
        await asyncio.sleep(0.1)
    else:
        raise AssertionError("the flow was not deleted after its TTL")
    js = nc.jetstream()
    kept = json.loads(
        (
            await js.get_last_msg("TASKFLOW_HISTORY", f"taskflow.history.{flows.namespace}.{uid}")
        ).data
    )
    assert kept["phase"] == "SUCCEEDED" and kept["name"] == "f"
    assert kept["stages"][0]["tasks"][0]["serviceId"] == svc
    assert (await flows.get("kept"))["metadata"]["uid"] == keep["metadata"]["uid"]
    assert task_status(await flows.wait("kept"), "s1", "a")["status"] == "SUCCEEDED"


@pytest.mark.integration
async def test_the_plugin_suspends_resumes_and_reads_the_history(
    operator, stack, flows: Flows, nc, svc: str
) -> None:
    from integration.test_plugin import Plugin

    plugin = Plugin(stack, flows.namespace)
    seen = await serve(nc, f"{svc}.do")
    await flows.create({**flow(svc, ["a"]), "suspend": True, "ttl": {"afterSucceeded": "1s"}}, "f")
    await flows.wait("f", until=lambda b: bool((b.get("status") or {}).get("suspendedAt")))
    out = await plugin("resume", "f")
    assert out.returncode == 0 and f"taskflow {flows.namespace}/f resumed" in out.stdout
    for _ in range(150):
        try:
            await flows.get("f")
        except ApiException:
            break
        await asyncio.sleep(0.1)
    assert len(seen.requests) == 1
    listed = await plugin("history", "-o", "json", "--service", svc, "--since", "10m")
    assert listed.returncode == 0, listed.stderr
    items = json.loads(listed.stdout)
    assert [(i["name"], i["phase"]) for i in items] == [("f", "SUCCEEDED")]
    none = await plugin("history", "-o", "json", "--phase", "FAILED")
    assert json.loads(none.stdout) == []
