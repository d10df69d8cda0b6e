"""Tenants on the real servers (docs/security.md): a namespace's TaskflowPolicy decides what its
flows may call (at ``kubectl apply`` and again before each dispatch), and as which NATS user in
which account, so that NATS account exports and imports decide who may call what.

The first tests use the suite's stack and operator (a namespace without a policy may call
anything there). The others run their own nats-server with an account per team, and an
operator that requires a policy in every namespace."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nats
import pytest
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from nats.js.errors import NotFoundError

from conftest import Flows, OperatorProcess, eventually, flow, serve, task_status
from taskflow.api.crd import GROUP, VERSION
from taskflow.api.policy import SECRET_NAMESPACES
from taskflow.devstack.natsauth import OPERATOR_USER, Team, TenantAuth
from taskflow.devstack.servers import DevStack

pytestmark = pytest.mark.integration


def put_policy(
    api: client.ApiClient, namespace: str, spec: dict[str, Any], name: str = "default"
) -> None:
    custom = client.CustomObjectsApi(api)
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "TaskflowPolicy",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }
    try:
        current = custom.get_namespaced_custom_object(
            GROUP, VERSION, namespace, "taskflowpolicies", name
        )
    except ApiException as exc:
        if exc.status != 404:
            raise
        custom.create_namespaced_custom_object(GROUP, VERSION, namespace, "taskflowpolicies", body)
        return
    body["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
    custom.replace_namespaced_custom_object(
        GROUP, VERSION, namespace, "taskflowpolicies", name, body
    )


def get_policy(api: client.ApiClient, namespace: str) -> dict[str, Any]:
    result: dict[str, Any] = client.CustomObjectsApi(api).get_namespaced_custom_object(
        GROUP, VERSION, namespace, "taskflowpolicies", "default"
    )
    return result


# -- with the suite's operator -------------------------------------------------------------------


async def test_admission_refuses_a_flow_calling_what_its_namespace_may_not(
    operator: OperatorProcess, kube: client.ApiClient, flows: Flows, svc: str
) -> None:
    await asyncio.to_thread(
        put_policy, kube, flows.namespace, {"services": [{"serviceId": svc, "actions": ["read"]}]}
    )
    spec = flow(svc, ["a", "b"], action="read")
    spec["stages"][0]["tasks"][1]["taskDetails"]["actionName"] = "wipe"
    spec["stages"].append(
        {
            "name": "s2",
            "tasks": [
                {"name": "c", "taskDetails": {"serviceId": "billing", "actionName": "charge"}}
            ],
        }
    )

    async def refused() -> str:
        with pytest.raises(ApiException) as caught:
            await flows.create(spec, "f")
        assert caught.value.status in (403, 422)
        return str(json.loads(caught.value.body)["message"])

    message = await refused()
    assert f"s1/b calls {svc}.wipe" in message and "s2/c calls billing.charge" in message
    assert f"TaskflowPolicy default of namespace {flows.namespace}" in message
    assert "s1/a" not in message
    await flows.create(flow(svc, ["a"], action="read"), "allowed")  # only what it may call

    # One policy per namespace, named default: another name is refused by the CRD itself.
    with pytest.raises(ApiException, match="one TaskflowPolicy, named 'default'"):
        await asyncio.to_thread(put_policy, kube, flows.namespace, {}, name="extra")


async def test_a_namespace_without_a_policy_may_call_anything(
    operator: OperatorProcess, flows: Flows, nc: nats.NATS, svc: str
) -> None:
    await serve(nc, f"{svc}.do")
    await flows.create(flow(svc, ["a"]), "f")
    assert (await flows.wait("f"))["status"]["phase"] == "SUCCEEDED"


async def test_a_task_the_policy_no_longer_allows_is_refused_before_it_is_sent(
    operator: OperatorProcess, kube: client.ApiClient, flows: Flows, nc: nats.NATS, svc: str
) -> None:
    """Created while allowed; the policy tightens before the task's stage starts."""
    held: list[Any] = []
    await serve(nc, f"{svc}.hold", lambda m: held.append(m))
    later = await serve(nc, f"{svc}.do")
    await asyncio.to_thread(put_policy, kube, flows.namespace, {"services": [{"serviceId": svc}]})
    spec = flow(svc, ["b"], options={"maxRetries": 3, "retryDelay": 0})
    spec["stages"].insert(
        0,
        {
            "name": "s0",
            "tasks": [{"name": "a", "taskDetails": {"serviceId": svc, "actionName": "hold"}}],
        },
    )
    await flows.create(spec, "f")
    await eventually(lambda: held, timeout=15)
    await asyncio.to_thread(
        put_policy, kube, flows.namespace, {"services": [{"serviceId": svc, "actions": ["hold"]}]}
    )
    await asyncio.sleep(1.0)  # the watch brings the new policy to the operator
    await nc.publish(held[0].reply, json.dumps({"success": True}).encode())
    done = await flows.wait("f")
    b = task_status(done, "s1", "b")
    assert done["status"]["phase"] == "FAILED"
    assert b["status"] == "FAILED" and b["error"]["reason"] == "PolicyDenied"
    assert f"{svc}.do" in b["error"]["message"]
    assert b["attempt"] == 0 and len(b["attempts"]) == 1  # refused, not retried
    assert later.requests == []  # nothing was sent

    # The policy allows it again: a retry of the flow runs it.
    await asyncio.to_thread(put_policy, kube, flows.namespace, {"services": [{"serviceId": svc}]})
    await asyncio.sleep(1.0)
    await flows.patch("f", {"spec": {"retry": {"id": "r1", "failedOnly": True}}})
    done = await flows.wait(
        "f",
        until=lambda b: (
            (b.get("status") or {}).get("retry") and b["status"]["phase"] in ("SUCCEEDED", "FAILED")
        ),
    )
    assert done["status"]["phase"] == "SUCCEEDED" and len(later.requests) == 1


# -- one account per team ------------------------------------------------------------------------

TEMPLATE = "{namespace}.{serviceId}.{actionName}"
TEAMS = {
    "team-a": Team(services=("svc", "private")),
    "team-b": Team(services=("svc", "shared"), exports=("shared",)),
}
CREDENTIALS_NS = "taskflow-system"


class Tenancy:
    def __init__(
        self, stack: DevStack, auth: TenantAuth, api: client.ApiClient, operator: OperatorProcess
    ) -> None:
        self.stack, self.auth, self.api, self.operator = stack, auth, api, operator

    async def connect(self, user: str) -> nats.NATS:
        return await nats.connect(self.auth.url(self.stack.nats.url, user))

    def flows(self, namespace: str) -> Flows:
        return Flows(self.api, namespace)


def secret(api: client.ApiClient, name: str, data: dict[str, str], namespaces: str) -> None:
    client.CoreV1Api(api).create_namespaced_secret(
        CREDENTIALS_NS,
        {
            "metadata": {"name": name, "annotations": {SECRET_NAMESPACES: namespaces}},
            "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()},
        },
    )


@pytest.fixture(scope="module")
def tenancy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tenancy]:
    auth = TenantAuth.make(TEAMS, template=TEMPLATE)
    with DevStack(tmp_path_factory.mktemp("tenants"), nats_auth=auth) as stack:
        api = config.new_client_from_config(str(stack.kubeconfig))
        core = client.CoreV1Api(api)
        for ns in (CREDENTIALS_NS, "team-a", "team-b", "team-c", "loose", "wrong"):
            core.create_namespace(client.V1Namespace(metadata={"name": ns}))
        for team in TEAMS:
            name = f"{team}-operator"
            secret(
                api,
                f"nats-{team}",
                {"user": name, "password": auth.passwords[name]},
                namespaces=team,
            )
            put_policy(api, team, {"natsCredentials": {"secretName": f"nats-{team}"}})
        # team-c names team-a's Secret, which does not list it; "wrong" a bad password.
        put_policy(api, "team-c", {"natsCredentials": {"secretName": "nats-team-a"}})
        secret(
            api, "nats-wrong", {"user": "team-a-operator", "password": "not-it"}, namespaces="wrong"
        )
        put_policy(api, "wrong", {"natsCredentials": {"secretName": "nats-wrong"}})
        # The NATS API: team-a's NATS users may create and read flows in team-a, by RBAC on
        # the group the operator maps their account to.
        rbac = client.RbacAuthorizationV1Api(api)
        rbac.create_namespaced_role(
            "team-a",
            {
                "metadata": {"name": "nats-callers"},
                "rules": [
                    {"apiGroups": [GROUP], "resources": ["taskflows"], "verbs": ["create", "get"]}
                ],
            },
        )
        rbac.create_namespaced_role_binding(
            "team-a",
            {
                "metadata": {"name": "nats-callers"},
                "roleRef": {
                    "apiGroup": "rbac.authorization.k8s.io",
                    "kind": "Role",
                    "name": "nats-callers",
                },
                "subjects": [
                    {
                        "apiGroup": "rbac.authorization.k8s.io",
                        "kind": "Group",
                        "name": "nats:team-a",
                    }
                ],
            },
        )
        workdir = tmp_path_factory.mktemp("tenants-operator")
        password = Path(workdir / "nats-password")
        password.write_text(auth.passwords[OPERATOR_USER])
        operator = OperatorProcess(
            stack,
            workdir,
            extra=[
                "--nats-user",
                OPERATOR_USER,
                "--nats-password-file",
                str(password),
                "--subject-template",
                TEMPLATE,
                "--credentials-namespace",
                CREDENTIALS_NS,
                "--require-policy",
                "--nats-api",
                "on",
                "--nats-api-users",
            ],
        )
        operator.start()
        try:
            yield Tenancy(stack, auth, api, operator)
        finally:
            operator.stop()
            api.close()


def connected(api: client.ApiClient, namespace: str) -> dict[str, Any] | None:
    conditions = (get_policy(api, namespace).get("status") or {}).get("conditions") or []
    return next((c for c in conditions if c["type"] == "Connected"), None)


async def wait_connected(tenancy: Tenancy, namespace: str, status: str = "True") -> dict[str, Any]:
    found: dict[str, Any] | None = None
    for _ in range(300):
        found = await asyncio.to_thread(connected, tenancy.api, namespace)
        if found and found["status"] == status:
            return found
        await asyncio.sleep(0.1)
    raise AssertionError(f"the policy of {namespace} is not Connected={status}: {found}")


async def test_each_namespace_dispatches_in_its_own_account(tenancy: Tenancy) -> None:
    a = await tenancy.connect("team-a-svc")
    b = await tenancy.connect("team-b-svc")
    try:
        seen_a = await serve(a, "*.svc.do", lambda m: {"success": True, "data": {"team": "a"}})
        seen_b = await serve(b, "*.svc.do", lambda m: {"success": True, "data": {"team": "b"}})
        for ns in ("team-a", "team-b"):
            await wait_connected(tenancy, ns)
            await tenancy.flows(ns).create(flow("svc", ["t"]), "f")
        done_a = await tenancy.flows("team-a").wait("f")
        done_b = await tenancy.flows("team-b").wait("f")
        assert task_status(done_a, "s1", "t")["response"] == {"team": "a"}
        assert task_status(done_b, "s1", "t")["response"] == {"team": "b"}
        # {namespace} in the template: each request went to its own namespace's subject.
        assert [m.subject for m in seen_a.requests] == ["team-a.svc.do"]
        assert [m.subject for m in seen_b.requests] == ["team-b.svc.do"]
    finally:
        await a.drain()
        await b.drain()
    # The events are in the team's account, not in the operator's.
    uid = done_a["metadata"]["uid"]
    team_js = await tenancy.connect("team-a-operator")
    own = await tenancy.connect(OPERATOR_USER)
    try:
        last = await team_js.jetstream().get_last_msg("TASKFLOW_EVENTS", f"taskflow.events.{uid}")
        assert json.loads(last.data)["data"]["taskflowStatus"] == "SUCCEEDED"
        with pytest.raises(NotFoundError):
            await own.jetstream().get_last_msg("TASKFLOW_EVENTS", f"taskflow.events.{uid}")
    finally:
        await team_js.drain()
        await own.drain()


async def test_exports_and_imports_decide_who_may_call_what(tenancy: Tenancy) -> None:
    """team-b's account exports "shared" (team-a's imports it); team-a's "private" is its
    own."""
    a = await tenancy.connect("team-a-svc")
    b = await tenancy.connect("team-b-svc")
    try:
        shared = await serve(b, "*.shared.do", lambda m: {"success": True, "data": "from b"})
        private = await serve(a, "*.private.do")
        await wait_connected(tenancy, "team-a")
        await wait_connected(tenancy, "team-b")
        await tenancy.flows("team-a").create(flow("shared", ["t"]), "uses-shared")
        done = await tenancy.flows("team-a").wait("uses-shared")
        assert done["status"]["phase"] == "SUCCEEDED"
        assert task_status(done, "s1", "t")["response"] == "from b"
        assert [m.subject for m in shared.requests] == ["team-a.shared.do"]
        await tenancy.flows("team-b").create(
            flow("private", ["t"], options={"timeout": "3s"}), "uses-private"
        )
        done = await tenancy.flows("team-b").wait("uses-private", timeout=30)
        t = task_status(done, "s1", "t")
        assert t["status"] == "TIMED_OUT" and "no service was listening" in t["error"]["message"]
        assert private.requests == []
    finally:
        await a.drain()
        await b.drain()


async def test_a_namespace_without_a_policy_runs_no_task_when_one_is_required(
    tenancy: Tenancy,
) -> None:
    await tenancy.flows("loose").create(flow("svc", ["t"]), "f")
    done = await tenancy.flows("loose").wait("f")
    t = task_status(done, "s1", "t")
    assert t["status"] == "FAILED" and t["error"]["reason"] == "PolicyDenied"
    assert "has no TaskflowPolicy" in t["error"]["message"]


async def test_credentials_a_namespace_may_not_use_are_not_used(tenancy: Tenancy) -> None:
    """team-c names team-a's Secret, which does not list team-c: nothing goes out as team-a,
    and nothing falls back to the operator's own user."""
    a = await tenancy.connect("team-a-svc")
    try:
        seen = await serve(a, "*.svc.do")
        condition = await wait_connected(tenancy, "team-c", status="False")
        assert condition["reason"] == "NotAllowed" and SECRET_NAMESPACES in condition["message"]
        await tenancy.flows("team-c").create(flow("svc", ["t"], options={"timeout": "3s"}), "f")
        done = await tenancy.flows("team-c").wait("f", timeout=30)
        assert task_status(done, "s1", "t")["status"] == "TIMED_OUT"
        assert seen.requests == []
    finally:
        await a.drain()


async def test_bad_credentials_say_so_on_the_policy_and_leak_nothing(tenancy: Tenancy) -> None:
    condition = await wait_connected(tenancy, "wrong", status="False")
    assert condition["reason"] == "ConnectFailed"
    assert "authorization" in condition["message"].lower()
    assert "not-it" not in json.dumps(get_policy(tenancy.api, "wrong"))
    assert "not-it" not in tenancy.operator.log_path.read_text()


async def test_the_nats_api_acts_as_the_nats_user_the_server_stamps(tenancy: Tenancy) -> None:
    """A call through team-a's import of taskflow.api.> is made by nats:team-a:team-a-app,
    whatever the caller writes in the header; RBAC on its group decides."""
    a = await tenancy.connect("team-a-app")
    b = await tenancy.connect("team-b-app")

    async def produce(
        nc: nats.NATS, namespace: str, name: str, headers: dict[str, str] | None = None
    ) -> dict[str, Any]:
        request = {"namespace": namespace, "name": name, "schema": flow("svc", ["t"])}
        answer = await nc.request(
            "taskflow.api.produce", json.dumps(request).encode(), timeout=15, headers=headers
        )
        result: dict[str, Any] = json.loads(answer.data)
        return result

    try:
        made = await produce(a, "team-a", "by-nats-user")
        assert made["success"] is True, made
        body = await tenancy.flows("team-a").get("by-nats-user")
        assert body["metadata"]["uid"] == made["data"]["taskflowId"]
        refused = await produce(a, "team-b", "elsewhere")
        assert refused["error"]["code"] == "Forbidden"
        assert (
            "nats:team-a:team-a-app may not create taskflows in namespace team-b"
            in (refused["error"]["message"])
        )
        forged = await produce(
            a,
            "team-b",
            "forged",
            headers={"Nats-Request-Info": json.dumps({"acc": "team-b", "user": "team-b-app"})},
        )
        assert forged["error"]["code"] == "Forbidden"
        assert "nats:team-a:team-a-app" in forged["error"]["message"]
        unbound = await produce(b, "team-b", "unbound")
        assert unbound["error"]["code"] == "Forbidden"
        for name in ("elsewhere", "forged", "unbound"):
            with pytest.raises(ApiException):
                await tenancy.flows("team-b").get(name)
    finally:
        await a.drain()
        await b.drain()
