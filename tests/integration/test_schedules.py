"""CronTaskflow on the real servers with a short period (@every 2s), not by waiting minutes:
Forbid, the history limit and suspend."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from kubernetes import client

from conftest import Flows, flow, serve


def put_cron(kube: client.ApiClient, namespace: str, name: str, spec: dict[str, Any]) -> None:
    client.CustomObjectsApi(kube).create_namespaced_custom_object(
        "taskflow.dev",
        "v1alpha1",
        namespace,
        "crontaskflows",
        {
            "apiVersion": "taskflow.dev/v1alpha1",
            "kind": "CronTaskflow",
            "metadata": {"name": name},
            "spec": spec,
        },
    )


def get_cron(kube: client.ApiClient, namespace: str, name: str) -> dict[str, Any]:
    result: dict[str, Any] = client.CustomObjectsApi(kube).get_namespaced_custom_object(
        "taskflow.dev", "v1alpha1", namespace, "crontaskflows", name
    )
    return result


@pytest.mark.integration
async def test_forbid_skips_a_run_while_one_is_active_and_history_is_trimmed(
    operator, kube: client.ApiClient, flows: Flows, nc, svc: str
) -> None:
    held: list[Any] = []
    await serve(nc, f"{svc}.do", lambda m: held.append(m))
    await asyncio.to_thread(
        put_cron,
        kube,
        flows.namespace,
        "every2",
        {
            "schedule": "@every 2s",
            "concurrencyPolicy": "Forbid",
            "successfulHistoryLimit": 1,
            "taskflow": flow(svc, ["t"]),
        },
    )
    await asyncio.sleep(7)  # three scheduled times: one run, the others skipped (Forbid)
    runs = await flows.list()
    assert len(runs) == 1 and len(held) == 1
    run = runs[0]
    assert run["metadata"]["ownerReferences"][0]["kind"] == "CronTaskflow"
    status = (await asyncio.to_thread(get_cron, kube, flows.namespace, "every2"))["status"]
    assert status["active"] == [run["metadata"]["name"]] and status["lastScheduleTime"]
    for msg in held:  # the run ends: the next scheduled time starts another
        await nc.publish(msg.reply, json.dumps({"success": True}).encode())
    for _ in range(100):
        names = [r["metadata"]["name"] for r in await flows.list()]
        if len(held) >= 2 and run["metadata"]["name"] not in names:
            break
        await asyncio.sleep(0.1)
    assert len(held) >= 2  # a second run started once the first had ended
    # successfulHistoryLimit 1: the first (SUCCEEDED) run is deleted once a newer one succeeds
    for msg in held[1:]:
        await nc.publish(msg.reply, json.dumps({"success": True}).encode())
    for _ in range(100):
        ended = [
            r for r in await flows.list() if (r.get("status") or {}).get("phase") == "SUCCEEDED"
        ]
        if len(ended) <= 1 and run["metadata"]["name"] not in [
            r["metadata"]["name"] for r in await flows.list()
        ]:
            break
        await asyncio.sleep(0.1)
    assert run["metadata"]["name"] not in [r["metadata"]["name"] for r in await flows.list()]


@pytest.mark.integration
async def test_a_suspended_schedule_starts_nothing(
    operator, kube: client.ApiClient, flows: Flows, nc, svc: str
) -> None:
    await serve(nc, f"{svc}.do")
    await asyncio.to_thread(
        put_cron,
        kube,
        flows.namespace,
        "held",
        {"schedule": "@every 1s", "suspend": True, "taskflow": flow(svc, ["t"])},
    )
    await asyncio.sleep(3)
    assert await flows.list() == []
