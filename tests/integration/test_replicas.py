"""Active/active replicas: three operators share the flows by bucket Leases; one is SIGKILLed
mid-run, its buckets are taken over, every flow succeeds and no attempt is sent twice."""

from __future__ import annotations

import asyncio
import re
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

import nats
import pytest
from kubernetes import client, config

from conftest import Flows, OperatorProcess, flow, serve
from taskflow.devstack import DevStack

BUCKETS, LEASE_S = 12, 3
FLOWS = 60
SECOND_STAGE = [f"b{i}" for i in range(10)]


def replica_id(replica: OperatorProcess) -> str:
    found = re.search(r"active/active replica (\S+):", replica.log_path.read_text())
    assert found, replica.log_path.read_text()[-2000:]
    return found.group(1)


def holders(core: client.CoordinationV1Api, namespace: str) -> dict[int, str]:
    leases = core.list_namespaced_lease(namespace).items
    return {
        int(lease.metadata.name.removeprefix("taskflow-bucket-")): lease.spec.holder_identity or ""
        for lease in leases
        if lease.metadata.name.startswith("taskflow-bucket-")
    }


async def until(predicate: Any, *, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await asyncio.to_thread(predicate):
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.1)


async def test_three_active_replicas_one_killed_mid_run(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    # A stack of its own: the session's operator watches every namespace and would serve
    # these flows too.
    with DevStack(tmp_path_factory.mktemp("replicas-stack")) as stack:
        api = config.new_client_from_config(str(stack.kubeconfig))
        core = client.CoreV1Api(api)
        leases = client.CoordinationV1Api(api)
        for ns in ("flows", "taskflow-system"):
            await asyncio.to_thread(
                core.create_namespace, client.V1Namespace(metadata={"name": ns})
            )
        nc = await nats.connect(stack.nats.url)
        service = await serve(nc, "svc.do", delay=1.5)  # plain: not an idempotent service
        replicas = []
        for i in range(3):
            log_dir = tmp_path_factory.mktemp(f"replica-{i}")
            replicas.append(
                OperatorProcess(
                    stack,
                    log_dir,
                    extra=[
                        "--replica-mode=active",
                        f"--buckets={BUCKETS}",
                        f"--bucket-lease={LEASE_S}s",
                        "--lease-namespace=taskflow-system",
                        "--namespace=flows",
                    ],
                )
            )
        flows = Flows(api, "flows")
        try:
            for replica in replicas:
                await asyncio.to_thread(replica.start)
            ids = [replica_id(r) for r in replicas]

            def spread() -> bool:
                held = Counter(holders(leases, "taskflow-system").values())
                return all(held[i] == BUCKETS // 3 for i in ids)

            await until(spread, timeout=60, what="the buckets did not spread over 3 replicas")

            options = {"timeout": "20s", "maxRetries": 1}
            for i in range(FLOWS):
                await flows.create(flow("svc", ["a"], SECOND_STAGE, options=options), f"f{i:02d}")
            total = FLOWS * (1 + len(SECOND_STAGE))
            deadline = time.monotonic() + 60
            while len(service.requests) < total * 0.4:  # mid-run: in the second stage
                assert time.monotonic() < deadline, len(service.requests)
                await asyncio.sleep(0.05)

            victim, survivors = replicas[0], replicas[1:]
            lost = {b for b, h in holders(leases, "taskflow-system").items() if h == ids[0]}
            assert len(lost) == BUCKETS // 3
            victim.kill(signal.SIGKILL)
            killed_at = time.monotonic()

            def taken_over() -> bool:
                now = holders(leases, "taskflow-system")
                return all(now.get(b) in ids[1:] for b in lost)

            await until(taken_over, timeout=30, what="the killed replica's buckets were not taken")
            takeover_s = time.monotonic() - killed_at
            print(f"\nbuckets {sorted(lost)} of the killed replica taken over in {takeover_s:.1f}s")
            # lease + margin + one look at the Leases, and the polling here
            assert takeover_s < LEASE_S * 1.2 + LEASE_S / 3 + 2.0, takeover_s

            for i in range(FLOWS):
                done = await flows.wait(f"f{i:02d}", timeout=120)
                assert done["status"]["phase"] == "SUCCEEDED", done["status"]
                assert done["status"]["progress"] == f"{total // FLOWS}/{total // FLOWS}"
            await asyncio.sleep(1.0)  # a late second send, had there been one

            keys = Counter(service.keys())
            twice = [k for k, n in keys.items() if n > 1]
            assert not twice, f"attempts sent twice: {twice[:5]}"
            retried = len(keys) - total
            print(f"{len(keys)} attempts for {total} tasks ({retried} retried after a timeout)")
            assert len(keys) >= total
            logs = [r.log_path.read_text() for r in survivors]
            taken = {
                int(m.group(1))
                for log in logs
                for m in re.finditer(rf"took bucket (\d+) from {re.escape(ids[0])}", log)
            }
            assert taken == lost, (taken, lost)
            held = [r.metrics().get("taskflow_buckets_held", 0) for r in survivors]
            assert sorted(held) == [BUCKETS // 2, BUCKETS // 2], held
            served = [r.metrics().get("taskflow_dispatches_total", 0) for r in survivors]
            assert all(n > 0 for n in served), served  # both survivors wrote flows
        finally:
            for replica in replicas:
                replica.stop()
            await nc.close()
            api.close()
        for log_dir in (Path(r.log_path) for r in replicas):
            text = log_dir.read_text()
            assert "Traceback" not in text, text[text.index("Traceback") - 500 :][:3000]
