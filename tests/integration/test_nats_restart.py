"""A NATS restart costs no flow: replies lost while nats-server was away are recovered by
asking idempotent services again (same attempt, same key), not guessed as timeouts."""

from __future__ import annotations

import asyncio
import json
import signal
from collections import Counter
from typing import Any

import nats
import pytest
from kubernetes import client, config

from conftest import Flows, OperatorProcess, eventually, flow, task_status
from taskflow.devstack.servers import DevStack
from taskflow.sdk import Service, TaskContext
from taskflow.shell.bus import idempotent_endpoints


def test_services_api_metadata_declares_idempotent_endpoints() -> None:
    info = {
        "name": "svc",
        "metadata": {"taskflow.dev/idempotent": "true"},
        "endpoints": [{"name": "a", "subject": "svc.a"}, {"name": "b", "subject": "svc.b"}],
    }
    assert idempotent_endpoints(json.dumps(info).encode()) == {"svc.a", "svc.b"}
    per_endpoint = {
        "name": "svc",
        "metadata": {},
        "endpoints": [
            {"name": "a", "subject": "svc.a", "metadata": {"taskflow.dev/idempotent": "True"}},
            {"name": "b", "subject": "svc.b", "metadata": None},
        ],
    }
    assert idempotent_endpoints(json.dumps(per_endpoint).encode()) == {"svc.a"}
    for junk in (b"", b"[]", b'{"endpoints": 7}', b"[" * 5000):
        assert idempotent_endpoints(junk) == set()


@pytest.mark.integration
async def test_replies_lost_in_a_nats_restart_are_asked_again(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """Four exactly-once attempts are running when nats-server is killed; the service
    finishes them while it is away, and its client (no reconnect buffer) drops the replies.
    After the restart the operator asks the SDK service again, which answers from its reply
    cache: every task SUCCEEDED, each executed once (without the re-ask: TIMED_OUT, FAILED)."""
    with DevStack(tmp_path_factory.mktemp("nats-restart")) as stack:
        api = config.new_client_from_config(str(stack.kubeconfig))
        await asyncio.to_thread(
            client.CoreV1Api(api).create_namespace, client.V1Namespace(metadata={"name": "flows"})
        )
        operator = OperatorProcess(stack, tmp_path_factory.mktemp("nats-restart-operator"))
        operator.start()
        svc_nc = await nats.connect(
            stack.nats.url, pending_size=0, max_reconnect_attempts=-1, reconnect_time_wait=0.2
        )
        gate = asyncio.Event()
        runs: Counter[str] = Counter()
        service = Service("idem", nc=svc_nc)

        @service.action("do")
        async def do(params: Any, ctx: TaskContext) -> Any:
            runs[str(ctx.idempotency_key)] += 1
            await gate.wait()
            return {"done": params["task"]}

        await service.start()
        try:
            flows = Flows(api, "flows")
            names = ["a", "b", "c", "d"]
            await flows.create(
                flow("idem", names, options={"exactlyOnceTaskExecution": True, "timeout": "60s"}),
                "f",
            )
            await eventually(lambda: len(runs) == 4, timeout=10)

            stack.nats.server.stop(sig=signal.SIGKILL)
            gate.set()  # the handlers finish while NATS is away: their replies are dropped
            await asyncio.sleep(0.5)
            stack.nats.server.start()
            stack.nats.wait_ready()

            done = await flows.wait("f", timeout=30)
            assert done["status"]["phase"] == "SUCCEEDED"
            for name in names:
                task = task_status(done, "s1", name)
                assert task["response"] == {"done": name} and task["attempt"] == 0
            assert sorted(runs.values()) == [1, 1, 1, 1]  # executed once each
            assert operator.metrics().get("taskflow_reasked_attempts_total", 0) >= 4
        finally:
            await service.stop(grace=1)
            await svc_nc.close()
            operator.stop()
            api.close()
