"""The NATS boundary on a real nats-server with an account, users and per-user permissions
(docs/security.md): the operator runs as its own user, a service as one that may only answer
the requests it receives."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import nats
import pytest
from kubernetes import client, config

from conftest import Flows, OperatorProcess, flow, task_status
from taskflow.devstack.natsauth import OPERATOR_USER, VIEWER_USER, NatsAuth
from taskflow.devstack.servers import DevStack


class Violations:
    """The permission errors the server sends a client (asynchronously, by error_cb)."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    async def record(self, exc: Exception) -> None:
        self.seen.append(str(exc))

    async def wait_for(self, text: str) -> None:
        for _ in range(50):
            if any(text.lower() in s.lower() for s in self.seen):
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"no violation naming {text!r}: {self.seen}")


@pytest.mark.integration
async def test_a_service_user_may_answer_its_own_request_and_nothing_else(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    auth = NatsAuth.make(services=("svc", "other"))
    with DevStack(tmp_path_factory.mktemp("nats-auth"), nats_auth=auth) as stack:
        api = config.new_client_from_config(str(stack.kubeconfig))
        await asyncio.to_thread(
            client.CoreV1Api(api).create_namespace, client.V1Namespace(metadata={"name": "flows"})
        )
        workdir = tmp_path_factory.mktemp("nats-auth-operator")
        password = Path(workdir / "nats-password")
        password.write_text(auth.passwords[OPERATOR_USER])
        operator = OperatorProcess(
            stack,
            workdir,
            extra=["--nats-user", OPERATOR_USER, "--nats-password-file", str(password)],
        )
        operator.start()
        violations = Violations()
        svc = await nats.connect(auth.url(stack.nats.url, "svc-svc"), error_cb=violations.record)
        other_svc = await nats.connect(auth.url(stack.nats.url, "svc-other"))
        with pytest.raises(Exception, match=r"[Aa]uthorization"):
            await asyncio.wait_for(
                nats.connect(stack.nats.url, allow_reconnect=False, connect_timeout=2), 10
            )
        try:
            requests: list[Any] = []

            async def take(msg: Any) -> None:
                requests.append(msg)

            await svc.subscribe("svc.do", cb=take)
            await svc.flush()
            theirs: list[Any] = []

            async def hold(msg: Any) -> None:
                theirs.append(msg)

            await other_svc.subscribe("other.do", cb=hold)
            await other_svc.flush()
            flows = Flows(api, "flows")
            spec = flow("svc", ["a", "b"], options={"timeout": "60s"})
            spec["stages"][0]["tasks"].append(
                {"name": "c", "taskDetails": {"serviceId": "other", "actionName": "do"}}
            )
            await flows.create(spec, "f")
            for _ in range(200):
                if len(requests) == 2 and theirs:
                    break
                await asyncio.sleep(0.05)
            assert len(requests) == 2 and len(theirs) == 1
            mine, other = requests
            forged = json.dumps({"success": True, "data": "forged"}).encode()

            # Its own answer, once: and the reply stream captures it.
            await mine.respond(json.dumps({"success": True, "data": "mine"}).encode())
            operator_nc = await nats.connect(auth.url(stack.nats.url, OPERATOR_USER))
            try:
                stored = await operator_nc.jetstream().get_last_msg(
                    "TASKFLOW_REPLIES", mine.reply, direct=True
                )
                assert json.loads(stored.data)["data"] == "mine"
            finally:
                await operator_nc.close()
            await mine.respond(forged)  # a second answer: over allow_responses' max of 1
            await violations.wait_for("Permissions Violation for Publish")
            # Not the reply of an attempt it was not sent (even knowing its subject), the
            # journal, the NATS API or the event stream.
            uid = json.loads(mine.headers["taskflowExecutionContext"])["taskflow"]["id"]
            for subject in (
                theirs[0].reply,
                f"taskflow.reply.{uid}.s1.b.0",
                f"$KV.taskflow-journal.{uid}",
                "taskflow.api.produce",
                f"taskflow.events.{uid}",
            ):
                violations.seen.clear()
                await svc.publish(subject, forged)
                await violations.wait_for(f'Publish to "{subject}"')

            await other.respond(json.dumps({"success": True, "data": "other"}).encode())
            await theirs[0].respond(json.dumps({"success": True, "data": "theirs"}).encode())
            done = await flows.wait("f")
            assert done["status"]["phase"] == "SUCCEEDED"
            # The viewer replays the flow's events, and may do nothing else.
            watched = Violations()
            viewer = await nats.connect(
                auth.url(stack.nats.url, VIEWER_USER), error_cb=watched.record
            )
            try:
                sub = await viewer.jetstream().subscribe(
                    f"taskflow.events.{uid}", ordered_consumer=True
                )
                first = json.loads((await sub.next_msg(timeout=5)).data)
                assert first["seq"] == 1 and first["data"]["taskflowId"] == uid
                await viewer.publish("taskflow.api.produce", b"{}")
                await watched.wait_for('Publish to "taskflow.api.produce"')
            finally:
                await viewer.close()
            assert task_status(done, "s1", "a")["response"] == "mine"
            assert task_status(done, "s1", "b")["response"] == "other"
            assert task_status(done, "s1", "c")["response"] == "theirs"

        finally:
            await svc.close()
            await other_svc.close()
            operator.stop()
            api.close()
