"""``kubectl taskflow services`` and ``list_services`` on the real servers: SDK services and a
bare ``nats.micro`` service, their instances, endpoints, stats and capacity."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from nats.micro import add_service
from nats.micro.service import ServiceError

from taskflow.client import LiveService, list_services
from taskflow.client.services import (
    CAPACITY,
    IDEMPOTENT,
)
from taskflow.devstack.servers import NatsServer, find_binaries
from taskflow.sdk import Service, TaskContext

PLUGIN = str(Path(sys.executable).parent / "kubectl-taskflow")


# -- on the real servers -----------------------------------------------------------------------


async def kubectl_taskflow(nats_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    """The plugin as users run it (on a thread: the services answer from this event loop)."""
    env = {**os.environ}
    env.pop("NATS_URL", None)
    return await asyncio.to_thread(
        subprocess.run,
        [PLUGIN, "services", *args, "--nats-url", nats_url],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


async def services_json(nats_url: str, *args: str) -> dict[str, dict[str, Any]]:
    result = await kubectl_taskflow(nats_url, *args, "-o", "json")
    assert result.returncode == 0, result.stderr
    return {s["name"]: s for s in json.loads(result.stdout)}


@pytest.fixture
async def fleet(stack, nc, svc: str) -> AsyncIterator[dict[str, Any]]:  # type: ignore[no-untyped-def]
    """Two SDK instances of ``svc`` (max_concurrency=4, actions ``build`` and ``inspect``) and
    a bare nats.micro service ``<svc>-plain`` (endpoint ``charge`` declares itself idempotent,
    fails when asked ``{"bad": true}``)."""
    instances = []
    for _ in range(2):
        service = Service(svc, nats_url=stack.nats.url, max_concurrency=4)

        @service.action("build")
        async def build(params: dict[str, Any], ctx: TaskContext) -> dict[str, Any]:
            return params

        @service.action("inspect")
        async def inspect(params: dict[str, Any], ctx: TaskContext) -> dict[str, Any]:
            return params

        instances.append(await service.start())

    async def charge(request: Any) -> None:
        if json.loads(request.data or b"{}").get("bad"):
            raise ServiceError("400", "bad amount")
        await request.respond(b'{"success": true, "data": "charged"}')

    plain = await add_service(nc, name=f"{svc}-plain", version="2.1.0", queue_group="billing")
    await plain.add_endpoint(
        name="charge", subject=f"{svc}-plain.charge", handler=charge, metadata={IDEMPOTENT: "true"}
    )
    await nc.flush()
    yield {"sdk": instances, "plain": f"{svc}-plain"}
    await plain.stop()
    for service in instances:
        await service.stop(grace=0.5)


@pytest.mark.integration
async def test_lists_instances_endpoints_capacity_and_flags(
    stack,  # type: ignore[no-untyped-def]
    fleet: dict[str, Any],
    svc: str,
) -> None:
    listing = await services_json(stack.nats.url)

    sdk = listing[svc]
    assert sdk["instanceCount"] == 2
    assert sdk["versions"] == ["1.0.0"]
    assert sdk["idempotent"] is True
    assert sdk["capacity"] == 8
    assert [i["capacity"] for i in sdk["instances"]] == [4, 4]
    assert all(i["metadata"][CAPACITY] == "4" for i in sdk["instances"])
    assert [
        (e["name"], e["subject"], e["queueGroup"], e["instances"]) for e in sdk["endpoints"]
    ] == [
        ("build", f"{svc}.build", svc, 2),
        ("inspect", f"{svc}.inspect", svc, 2),
    ]
    plain = listing[f"{svc}-plain"]
    assert plain["instanceCount"] == 1
    assert plain["versions"] == ["2.1.0"]
    assert plain["idempotent"] is False  # the service does not say; its endpoint does
    assert plain["capacity"] is None
    assert [(e["subject"], e["queueGroup"], e["idempotent"]) for e in plain["endpoints"]] == [
        (f"{svc}-plain.charge", "billing", True)
    ]

    text = await kubectl_taskflow(stack.nats.url)
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    head = next(line for line in lines if line.startswith(f"{svc}  "))
    assert head == f"{svc}  1.0.0  2 instances  idempotent  capacity 8 (4 per instance)"
    plain_head = next(line for line in lines if line.startswith(f"{svc}-plain  "))
    assert plain_head == f"{svc}-plain  2.1.0  1 instance"
    charge = next(line for line in lines if f"{svc}-plain.charge" in line)
    assert charge.split() == [
        "charge",
        f"{svc}-plain.charge",
        "billing",
        "0",
        "0",
        "-",
        "idempotent",
    ]


@pytest.mark.integration
async def test_stats_count_requests_errors_and_processing_time(
    stack,  # type: ignore[no-untyped-def]
    nc,  # type: ignore[no-untyped-def]
    fleet: dict[str, Any],
    svc: str,
) -> None:
    for i in range(5):
        await nc.request(f"{svc}.build", json.dumps({"i": i}).encode(), timeout=5)
    for bad in (False, True, False):
        await nc.request(f"{svc}-plain.charge", json.dumps({"bad": bad}).encode(), timeout=5)

    listing = await services_json(stack.nats.url)

    build, inspect = listing[svc]["endpoints"]
    assert (build["requests"], build["errors"]) == (5, 0)  # summed over both instances
    assert build["averageProcessingTimeNs"] > 0
    assert (inspect["requests"], inspect["averageProcessingTimeNs"]) == (0, None)
    (charge,) = listing[f"{svc}-plain"]["endpoints"]
    assert (charge["requests"], charge["errors"]) == (3, 1)
    assert charge["processingTimeNs"] >= charge["averageProcessingTimeNs"] > 0

    text = await kubectl_taskflow(stack.nats.url, fleet["plain"])
    row = next(line for line in text.stdout.splitlines() if f"{svc}-plain.charge" in line)
    assert row.split()[3:5] == ["3", "1"]


@pytest.mark.integration
async def test_a_service_name_shows_only_that_service(
    stack,  # type: ignore[no-untyped-def]
    fleet: dict[str, Any],
    svc: str,
) -> None:
    assert list(await services_json(stack.nats.url, svc)) == [svc]  # not <svc>-plain
    assert list(await services_json(stack.nats.url, fleet["plain"])) == [fleet["plain"]]

    text = await kubectl_taskflow(stack.nats.url, svc)
    assert text.returncode == 0, text.stderr
    assert text.stdout.splitlines()[0].startswith(f"{svc}  1.0.0  2 instances")
    assert f"{svc}-plain" not in text.stdout


@pytest.mark.integration
async def test_the_client_returns_typed_services_and_the_sdk_says_capacity_only_when_bounded(
    stack,  # type: ignore[no-untyped-def]
    nc,  # type: ignore[no-untyped-def]
    fleet: dict[str, Any],
    svc: str,
) -> None:
    unbounded = await Service(f"{svc}-open", nats_url=stack.nats.url).start()
    try:
        (bounded,) = await list_services(nc, name=svc)
        (open_,) = await list_services(nc, name=f"{svc}-open", timeout=0.3)
    finally:
        await unbounded.stop(grace=0.5)

    assert isinstance(bounded, LiveService)
    assert (len(bounded.instances), bounded.capacity, bounded.idempotent) == (2, 8, True)
    assert [i.metadata[CAPACITY] for i in bounded.instances] == ["4", "4"]
    assert CAPACITY not in open_.instances[0].metadata
    assert (open_.capacity, open_.idempotent) == (None, True)


@pytest.mark.integration
async def test_nothing_listening_prints_a_clear_line(
    stack,  # type: ignore[no-untyped-def]
    tmp_path: Path,
    svc: str,
) -> None:
    empty = NatsServer(tmp_path / "nats", find_binaries(("nats-server",))["nats-server"])
    empty.start()
    try:
        result = await kubectl_taskflow(empty.url)
        as_json = await kubectl_taskflow(empty.url, "-o", "json")
    finally:
        empty.stop()
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout == (
        f"no service answers on NATS at {empty.url} (NATS Services API, $SRV.INFO)\n"
    )
    assert (as_json.returncode, json.loads(as_json.stdout)) == (0, [])

    # On a busy server too, a name nobody serves is the same clear line.
    named = await kubectl_taskflow(stack.nats.url, f"{svc}-nobody")
    assert (named.returncode, named.stderr) == (0, "")
    assert named.stdout.startswith(f"no instance of service {svc}-nobody answers on NATS at ")


@pytest.mark.integration
async def test_a_bad_service_name_or_timeout_is_one_error_line(stack) -> None:  # type: ignore[no-untyped-def]
    for args, message in [
        (["a.b"], "error: 'a.b' is not a service name"),
        (["--timeout", "0"], "error: the timeout must be more than 0"),
    ]:
        result = await kubectl_taskflow(stack.nats.url, *args)
        assert result.returncode == 1
        assert result.stderr.startswith(message), result.stderr
        assert len(result.stderr.splitlines()) == 1


# -- reading answers (pure) --------------------------------------------------------------------


# -- formatting (pure) -------------------------------------------------------------------------
