"""CronTaskflow: runs on a schedule with CronJob's semantics; the pure rules by table, then the
real servers with a short period (@every 2s), not by waiting minutes."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from kubernetes import client
from pydantic import ValidationError

from conftest import Flows, flow, serve
from taskflow.api.schedules import CronTaskflowSpec, latest_due, run_name

T = datetime(2026, 12, 4, 20, 0, 30, tzinfo=UTC)


def cron(**fields: Any) -> CronTaskflowSpec:
    return CronTaskflowSpec.model_validate({"taskflow": {"stages": []}, **fields})


def test_every_counts_from_the_creation() -> None:
    spec = cron(schedule="@every 10s")
    assert latest_due(spec, created=T, now=T + timedelta(seconds=9)) is None
    assert latest_due(spec, created=T, now=T + timedelta(seconds=25)) == T + timedelta(seconds=20)


def test_cron_in_a_time_zone_and_the_most_recent_missed_run() -> None:
    paris = cron(schedule="0 9 * * *", timeZone="Europe/Paris")
    created = datetime(2026, 12, 1, tzinfo=UTC)
    # 9:00 in Paris is 8:00 UTC in December; three days missed: only the most recent is due.
    assert latest_due(paris, created=created, now=datetime(2026, 12, 4, 8, 30, tzinfo=UTC)) == (
        datetime(2026, 12, 4, 8, 0, tzinfo=UTC)
    )
    assert latest_due(cron(schedule="*/5 * * * *"), created=T, now=T + timedelta(minutes=1)) is None


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"schedule": "every day"}, "not a cron expression"),
        ({"schedule": "@every 100ms"}, "at least 1s"),
        ({"schedule": "@hourly", "timeZone": "Mars/Olympus"}, "unknown time zone"),
        ({"schedule": "@hourly", "concurrencyPolicy": "Sometimes"}, "concurrencyPolicy"),
    ],
)
def test_bad_schedules_are_refused(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        cron(**fields)


def test_a_runs_name_is_fixed_by_its_time() -> None:
    assert run_name("nightly", T) == run_name("nightly", T) == f"nightly-{int(T.timestamp())}"


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
