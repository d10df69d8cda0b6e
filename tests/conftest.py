"""Fixtures: real etcd + kube-apiserver + nats-server (session), the operator as a real process,
a namespace per test, and small helpers to create flows and wait on them.

Nothing here fakes the Kubernetes API or NATS. ``tests/unit`` holds the pure tests (no I/O,
seconds in all: ``make unit``); ``tests/integration`` the tests on the real servers, marked
``integration``.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import nats
import pytest
import yaml
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from taskflow.devstack import DevStack
from taskflow.devstack.servers import free_port

ROOT = Path(__file__).resolve().parent.parent
GROUP, VERSION, PLURAL = "taskflow.dev", "v1alpha1", "taskflows"
SERVER_FIXTURES = {"stack", "kube", "namespace", "operator", "nc", "flows", "kubectl"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # tests/unit: pure, no I/O; tests/integration: the real servers. A unit test that asks
    # for a server fixture is a mistake, and says so.
    for item in items:
        uses_servers = bool(SERVER_FIXTURES & set(getattr(item, "fixturenames", ())))
        if "unit" in item.path.parent.parts[-1:] and uses_servers:
            raise pytest.UsageError(f"{item.nodeid}: a unit test may not use the servers")
        if uses_servers or "integration" in item.path.parts:
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevStack]:
    with DevStack(tmp_path_factory.mktemp("stack")) as running:
        yield running


@pytest.fixture(scope="session")
def kube(stack: DevStack) -> Iterator[client.ApiClient]:
    api = config.new_client_from_config(str(stack.kubeconfig))
    yield api
    api.close()


@pytest.fixture
def namespace(kube: client.ApiClient, request: pytest.FixtureRequest) -> str:
    name = f"t-{request.node.name[:40].lower()}".replace("_", "-").replace("[", "-")
    name = "".join(c for c in name if c.isalnum() or c == "-").strip("-")
    name = f"{name[:50]}-{uuid.uuid4().hex[:6]}"
    client.CoreV1Api(kube).create_namespace(client.V1Namespace(metadata={"name": name}))
    return name


class Kubectl:
    def __init__(self, kubeconfig: Path) -> None:
        self.kubeconfig = kubeconfig

    def __call__(
        self, *args: str, input: str | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            ["kubectl", "--kubeconfig", str(self.kubeconfig), *args],
            input=input,
            capture_output=True,
            text=True,
            timeout=60,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed: {result.stderr}")
        return result


@pytest.fixture(scope="session")
def kubectl(stack: DevStack) -> Kubectl:
    return Kubectl(stack.kubeconfig)


class OperatorProcess:
    """``taskflow-operator run`` as a child process, so tests can SIGKILL and restart it."""

    def __init__(self, stack: DevStack, log_dir: Path, extra: list[str] | None = None) -> None:
        self.stack = stack
        self.log_path = log_dir / "operator.log"
        self.metrics_port = free_port()
        self.extra = extra or []
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "taskflow.cli",
                    "run",
                    "--kubeconfig",
                    str(self.stack.kubeconfig),
                    "--nats-url",
                    self.stack.nats.url,
                    "--metrics-address",
                    f"127.0.0.1:{self.metrics_port}",
                    "--flush-interval",
                    "0.5",
                    *getattr(self.stack, "operator_args", []),
                    *self.extra,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        self.wait_ready()

    def wait_ready(self, timeout: float = 30) -> None:
        import urllib.request

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"operator exited: {self.log_path.read_text()[-3000:]}")
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=1)
                if "watching taskflows" in self.log_path.read_text():
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise TimeoutError("operator did not start")

    def metrics(self) -> dict[str, float]:
        import urllib.request

        text = (
            urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5)
            .read()
            .decode()
        )
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                out[key] = float(value)
        return out

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, sig)
            self.process.wait(30)

    def stop(self) -> None:
        self.kill(signal.SIGTERM)


@pytest.fixture(scope="session")
def operator(
    stack: DevStack, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OperatorProcess]:
    proc = OperatorProcess(
        stack,
        tmp_path_factory.mktemp("operator"),
        extra=["--nats-api", "on", "--slot-lease", "3s", "--service-poll", "1s"],
    )
    proc.start()
    yield proc
    proc.stop()


async def eventually(predicate: Callable[[], Any], *, timeout: float = 5.0) -> None:
    """Wait until ``predicate()`` holds (e.g. a held request reached the test's service)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "the condition did not hold in time"
        await asyncio.sleep(0.05)


def service_account_token(
    kube: client.ApiClient, namespace: str, name: str, *, verbs: list[str] | None = None
) -> str:
    """A TokenRequest token of a new ServiceAccount that may ``verbs`` taskflows in
    ``namespace`` (none: a ServiceAccount with no rights on them)."""
    core = client.CoreV1Api(kube)
    core.create_namespaced_service_account(namespace, {"metadata": {"name": name}})
    if verbs:
        rbac = client.RbacAuthorizationV1Api(kube)
        rbac.create_namespaced_role(
            namespace,
            {
                "metadata": {"name": name},
                "rules": [{"apiGroups": [GROUP], "resources": [PLURAL], "verbs": verbs}],
            },
        )
        rbac.create_namespaced_role_binding(
            namespace,
            {
                "metadata": {"name": name},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
                "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": namespace}],
            },
        )
    token = core.create_namespaced_service_account_token(
        name, namespace, {"spec": {"expirationSeconds": 3600}}
    )
    return str(token.status.token)


@pytest.fixture
def api_token(kube: client.ApiClient, namespace: str) -> str:
    """A caller of the NATS API that may do everything with taskflows in the test's namespace."""
    return service_account_token(
        kube, namespace, "caller", verbs=["get", "list", "watch", "create", "patch"]
    )


@pytest.fixture
async def nc(stack: DevStack) -> AsyncIterator[nats.NATS]:
    conn = await nats.connect(stack.nats.url)
    yield conn
    await conn.drain()


class Flows:
    """Create Taskflows and wait on them through the real API server."""

    def __init__(self, api: client.ApiClient, namespace: str) -> None:
        self.custom = client.CustomObjectsApi(api)
        self.namespace = namespace

    async def _run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return await asyncio.to_thread(fn, *args, **kwargs)

    async def create(self, body: dict[str, Any] | str, name: str | None = None) -> dict[str, Any]:
        if isinstance(body, str):
            body = yaml.safe_load(body)
        assert isinstance(body, dict)
        if "spec" not in body:
            body = {"spec": body}
        body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "Taskflow", **body}
        body.setdefault("metadata", {})
        if name:
            body["metadata"]["name"] = name
        body["metadata"].setdefault("name", f"flow-{uuid.uuid4().hex[:8]}")
        result: dict[str, Any] = await self._run(
            self.custom.create_namespaced_custom_object,
            GROUP,
            VERSION,
            self.namespace,
            PLURAL,
            body,
        )
        return result

    async def get(self, name: str) -> dict[str, Any]:
        result: dict[str, Any] = await self._run(
            self.custom.get_namespaced_custom_object, GROUP, VERSION, self.namespace, PLURAL, name
        )
        return result

    async def patch(self, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = await self._run(
            self.custom.patch_namespaced_custom_object,
            GROUP,
            VERSION,
            self.namespace,
            PLURAL,
            name,
            patch,
        )
        return result

    async def list(self) -> list[dict[str, Any]]:
        result = await self._run(
            self.custom.list_namespaced_custom_object, GROUP, VERSION, self.namespace, PLURAL
        )
        items: list[dict[str, Any]] = result["items"]
        return items

    async def wait(
        self,
        name: str,
        until: Callable[[dict[str, Any]], bool] | None = None,
        timeout: float = 30,
    ) -> dict[str, Any]:
        """Wait until ``until(body)`` (default: the flow reached a final phase)."""
        until = until or (lambda b: (b.get("status") or {}).get("phase") in FINAL)
        deadline = time.monotonic() + timeout
        body: dict[str, Any] = {}
        while time.monotonic() < deadline:
            try:
                body = await self.get(name)
            except ApiException as exc:
                if exc.status != 404:
                    raise
            else:
                if until(body):
                    return body
            await asyncio.sleep(0.1)
        raise AssertionError(
            f"timed out waiting on {name}: {json.dumps(body.get('status'), indent=1)[:4000]}"
        )


FINAL = {"SUCCEEDED", "FAILED", "CANCELLED", "COMPLETED_WITH_FAILURES"}


@pytest.fixture
def flows(kube: client.ApiClient, namespace: str) -> Flows:
    return Flows(kube, namespace)


def task_status(body: dict[str, Any], stage: str, task: str) -> dict[str, Any]:
    for s in body["status"]["stages"]:
        if s["name"] == stage:
            for t in s["tasks"]:
                if t["name"] == task:
                    return dict(t)
    raise KeyError(f"{stage}/{task}")


@pytest.fixture
def svc() -> str:
    """A service id unique to the test, so services of different tests never meet."""
    return f"svc-{uuid.uuid4().hex[:10]}"


class Recorder:
    """A plain nats-py service for tests: records every request and answers via ``reply``."""

    def __init__(self) -> None:
        self.requests: list[Any] = []

    def keys(self) -> list[str]:
        return [m.headers.get("Taskflow-Idempotency-Key", "") for m in self.requests]

    def contexts(self) -> list[dict[str, Any]]:
        return [json.loads(m.headers["taskflowExecutionContext"]) for m in self.requests]


async def serve(
    nc: nats.NATS,
    subject: str,
    reply: Callable[[Any], Any] | None = None,
    *,
    delay: float = 0.0,
) -> Recorder:
    """Answer ``subject``: ``reply(msg)`` returns a dict (sent as JSON), bytes, a
    ``(bytes, headers)`` pair, or None (no answer). Default: success with the params."""
    recorder = Recorder()

    async def handle(msg: Any) -> None:
        recorder.requests.append(msg)
        if delay:
            await asyncio.sleep(delay)
        out = reply(msg) if reply else {"success": True, "data": json.loads(msg.data or b"{}")}
        if asyncio.iscoroutine(out):
            out = await out
        if out is None:
            return
        headers = None
        if isinstance(out, tuple):
            out, headers = out
        data = out if isinstance(out, bytes) else json.dumps(out).encode()
        await nc.publish(msg.reply, data, headers=headers)

    tasks: set[asyncio.Task[None]] = set()

    async def dispatch(msg: Any) -> None:
        # nats-py runs one callback at a time per subscription: answer concurrently.
        task = asyncio.create_task(handle(msg))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    await nc.subscribe(subject, cb=dispatch)
    await nc.flush()
    return recorder


def flow(
    svc: str,
    *stages: list[str],
    options: dict[str, Any] | None = None,
    task_options: dict[str, Any] | None = None,
    action: str = "do",
) -> dict[str, Any]:
    """A spec with the given stages of task names, every task calling ``<svc>.<action>``."""
    spec: dict[str, Any] = {
        "stages": [
            {
                "name": f"s{i + 1}",
                "tasks": [
                    {
                        "name": name,
                        "params": {"task": name},
                        "taskDetails": {"serviceId": svc, "actionName": action},
                        **({"options": task_options} if task_options else {}),
                    }
                    for name in names
                ],
            }
            for i, names in enumerate(stages)
        ]
    }
    if options:
        spec["options"] = options
    return spec
