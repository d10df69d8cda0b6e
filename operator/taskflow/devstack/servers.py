"""Start and stop etcd, kube-apiserver and nats-server on free loopback ports.

Each server runs in its own process group and is killed with it, so a crashed test run leaves
nothing behind; ``DevStack`` ties them together for pytest fixtures, ``make dev`` and bench.
Each server can also be restarted on the same ports with the same data (``make chaos`` kills
and restarts them under load).
"""

from __future__ import annotations

import base64
import contextlib
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import yaml

from taskflow.devstack.certs import write_pki
from taskflow.devstack.natsauth import NatsAuth, TenantAuth

BINARIES = ("etcd", "kube-apiserver", "nats-server")


def cache_dir() -> Path:
    root = os.environ.get("TASKFLOW_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "taskflow-operator"
    )
    return Path(root)


def find_binaries(names: tuple[str, ...] = BINARIES) -> dict[str, Path]:
    """Locate each server: $TASKFLOW_BIN_DIR, $KUBEBUILDER_ASSETS, the build cache, then PATH."""
    dirs = [
        os.environ.get("TASKFLOW_BIN_DIR"),
        os.environ.get("KUBEBUILDER_ASSETS"),
        str(cache_dir() / "bin"),
    ]
    found: dict[str, Path] = {}
    for name in names:
        for directory in dirs:
            if directory and os.access(os.path.join(directory, name), os.X_OK):
                found[name] = Path(directory) / name
                break
        else:
            on_path = shutil.which(name)
            if on_path is None:
                raise FileNotFoundError(
                    f"{name} not found (looked in $TASKFLOW_BIN_DIR, $KUBEBUILDER_ASSETS, "
                    f"{cache_dir() / 'bin'} and PATH): run `make tools` to build it"
                )
            found[name] = Path(on_path)
    return found


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait(check: Any, what: str, timeout: float, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode} while starting")
        with contextlib.suppress(OSError):
            if check():
                return
        time.sleep(0.1)
    raise TimeoutError(f"{what} was not ready within {timeout:.0f}s")


@dataclass
class Server:
    """One child process in its own process group, logging to a file."""

    name: str
    argv: list[str]
    log: Path
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.process = subprocess.Popen(
                self.argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def send_signal(self, sig: int) -> None:
        """Send ``sig`` to the whole process group (e.g. SIGSTOP and SIGCONT to pause it)."""
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, sig)

    def stop(self, timeout: float = 10, *, sig: int = signal.SIGTERM) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.send_signal(sig)
        self.send_signal(signal.SIGCONT)  # a paused (SIGSTOPped) group acts on it too
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.send_signal(signal.SIGKILL)
            self.process.wait()

    def restart(self, *, sig: int = signal.SIGKILL) -> None:
        """Stop with ``sig`` (default: a crash) and start the same command line again: same
        ports, same data directory."""
        self.stop(sig=sig)
        self.start()


@dataclass
class NatsServer:
    """nats-server with JetStream, on a free loopback port, with its store in ``workdir``."""

    workdir: Path
    binary: Path
    port: int = 0
    monitor_port: int = 0
    max_payload: str = "8MB"
    # More configuration, e.g. accounts and users with permissions (devstack.natsauth).
    extra_config: str = ""
    server: Server | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        self.monitor_port = self.monitor_port or free_port()
        config = self.workdir / "nats.conf"
        config.write_text(
            f"listen: 127.0.0.1:{self.port}\n"
            f"http: 127.0.0.1:{self.monitor_port}\n"
            f"max_payload: {self.max_payload}\n"
            "jetstream {\n"
            f"  store_dir: {self.workdir / 'jetstream'}\n"
            "  max_memory_store: 256MB\n"
            "  max_file_store: 16GB\n"
            "}\n" + self.extra_config
        )
        self.server = Server(
            "nats-server", [str(self.binary), "-c", str(config)], self.workdir / "nats.log"
        )
        self.server.start()
        self.wait_ready()

    def wait_ready(self, timeout: float = 30) -> None:
        health = f"http://127.0.0.1:{self.monitor_port}/healthz?js-enabled-only=true"
        assert self.server is not None and self.server.process is not None
        _wait(
            lambda: urllib.request.urlopen(health, timeout=1).status == 200,
            "nats-server",
            timeout,
            self.server.process,
        )

    def restart(self, *, sig: int = signal.SIGKILL) -> None:
        """Kill (by default) and start again on the same port with the same JetStream store."""
        assert self.server is not None, "not started"
        self.server.restart(sig=sig)
        self.wait_ready()

    def stop(self) -> None:
        if self.server:
            self.server.stop()


@dataclass
class ControlPlane:
    """etcd + kube-apiserver with an admin kubeconfig, the way envtest runs them."""

    workdir: Path
    etcd_binary: Path
    apiserver_binary: Path
    port: int = 0
    servers: list[Server] = field(default_factory=list)
    kubeconfig: Path | None = None
    # kube-controller-manager for garbage collection (owned child flows) and namespaces.
    controller_manager_binary: Path | None = None
    etcd_port: int = 0
    etcd_peer_port: int = 0

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        pki = write_pki(self.workdir / "pki")
        self.etcd_port = etcd_port = self.etcd_port or free_port()
        self.etcd_peer_port = peer_port = self.etcd_peer_port or free_port()
        self.port = self.port or free_port()
        etcd = Server(
            "etcd",
            [
                str(self.etcd_binary),
                "--data-dir",
                str(self.workdir / "etcd"),
                "--listen-client-urls",
                f"http://127.0.0.1:{etcd_port}",
                "--advertise-client-urls",
                f"http://127.0.0.1:{etcd_port}",
                "--listen-peer-urls",
                f"http://127.0.0.1:{peer_port}",
                "--initial-advertise-peer-urls",
                f"http://127.0.0.1:{peer_port}",
                "--initial-cluster",
                f"default=http://127.0.0.1:{peer_port}",
                "--unsafe-no-fsync",
                "--quota-backend-bytes",
                str(4 * 1024**3),
            ],
            self.workdir / "etcd.log",
        )
        self.servers.append(etcd)
        etcd.start()
        self.wait_ready("etcd")
        apiserver = Server(
            "kube-apiserver",
            [
                str(self.apiserver_binary),
                "--bind-address",
                "127.0.0.1",
                "--advertise-address",
                "127.0.0.1",
                "--secure-port",
                str(self.port),
                "--etcd-servers",
                f"http://127.0.0.1:{etcd_port}",
                "--cert-dir",
                str(self.workdir / "certs"),
                "--tls-cert-file",
                str(pki["apiserver.crt"]),
                "--tls-private-key-file",
                str(pki["apiserver.key"]),
                "--client-ca-file",
                str(pki["ca.crt"]),
                "--authorization-mode",
                "RBAC",
                "--service-cluster-ip-range",
                "10.0.0.0/24",
                "--allow-privileged",
                "--disable-admission-plugins",
                "ServiceAccount",
                "--service-account-issuer",
                f"https://127.0.0.1:{self.port}/",
                "--service-account-key-file",
                str(pki["sa.pub"]),
                "--service-account-signing-key-file",
                str(pki["sa.key"]),
                "--max-requests-inflight",
                "1000",
                "--max-mutating-requests-inflight",
                "500",
                "--enable-priority-and-fairness=false",
            ],
            self.workdir / "kube-apiserver.log",
        )
        self.servers.append(apiserver)
        apiserver.start()
        self.wait_ready("kube-apiserver")
        self.kubeconfig = self.workdir / "kubeconfig"
        self.kubeconfig.write_text(yaml.safe_dump(self.kubeconfig_dict(pki)))
        self.kubeconfig.chmod(0o600)
        if self.controller_manager_binary:
            kcm = Server(
                "kube-controller-manager",
                [
                    str(self.controller_manager_binary),
                    "--kubeconfig",
                    str(self.kubeconfig),
                    "--authentication-kubeconfig",
                    str(self.kubeconfig),
                    "--authorization-kubeconfig",
                    str(self.kubeconfig),
                    "--controllers",
                    "garbage-collector-controller,namespace-controller",
                    "--leader-elect=false",
                    "--bind-address",
                    "127.0.0.1",
                    "--secure-port",
                    str(free_port()),
                    "--cert-dir",
                    str(self.workdir / "kcm-certs"),
                    "--concurrent-gc-syncs",
                    "5",
                ],
                self.workdir / "kube-controller-manager.log",
            )
            self.servers.append(kcm)
            kcm.start()

    def server(self, name: str) -> Server:
        """The running ``etcd``, ``kube-apiserver`` or ``kube-controller-manager``."""
        return next(s for s in self.servers if s.name == name)

    def wait_ready(self, name: str) -> None:
        """Until ``etcd`` answers /health or ``kube-apiserver`` /readyz."""
        process = self.server(name).process
        assert process is not None
        if name == "etcd":
            _wait(
                lambda: (
                    urllib.request.urlopen(
                        f"http://127.0.0.1:{self.etcd_port}/health", timeout=1
                    ).status
                    == 200
                ),
                "etcd",
                30,
                process,
            )
            return
        pki = self.workdir / "pki"
        context = ssl.create_default_context(cafile=str(pki / "ca.crt"))
        context.load_cert_chain(str(pki / "admin.crt"), str(pki / "admin.key"))
        _wait(
            lambda: (
                urllib.request.urlopen(f"{self.url}/readyz", timeout=2, context=context).status
                == 200
            ),
            name,
            90,
            process,
        )

    def restart(self, name: str, *, sig: int = signal.SIGKILL) -> None:
        """Kill (by default) one server and start it again on the same ports with the same
        data directory; returns once it is ready again."""
        self.server(name).restart(sig=sig)
        if name in ("etcd", "kube-apiserver"):
            self.wait_ready(name)

    def kubeconfig_dict(self, pki: dict[str, Path]) -> dict[str, Any]:
        def b64(path: Path) -> str:
            return base64.b64encode(path.read_bytes()).decode()

        return {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "taskflow-dev",
                    "cluster": {
                        "server": self.url,
                        "certificate-authority-data": b64(pki["ca.crt"]),
                    },
                }
            ],
            "users": [
                {
                    "name": "admin",
                    "user": {
                        "client-certificate-data": b64(pki["admin.crt"]),
                        "client-key-data": b64(pki["admin.key"]),
                    },
                }
            ],
            "contexts": [
                {"name": "taskflow-dev", "context": {"cluster": "taskflow-dev", "user": "admin"}}
            ],
            "current-context": "taskflow-dev",
        }

    def stop(self) -> None:
        for server in reversed(self.servers):
            server.stop()


class DevStack:
    """The whole local stack: control plane, NATS, and the Taskflow CRD applied and Established."""

    def __init__(
        self,
        workdir: Path | None = None,
        *,
        keep: bool = False,
        nats_auth: NatsAuth | TenantAuth | None = None,
    ) -> None:
        self._tmp = None if workdir else tempfile.mkdtemp(prefix="taskflow-stack-")
        self.workdir = workdir or Path(self._tmp)  # type: ignore[arg-type]
        self.keep = keep
        bins = find_binaries()
        try:
            kcm: Path | None = find_binaries(("kube-controller-manager",))[
                "kube-controller-manager"
            ]
        except FileNotFoundError:
            kcm = None  # optional: only garbage collection of deleted parents needs it
        self.control_plane = ControlPlane(
            self.workdir / "kube",
            bins["etcd"],
            bins["kube-apiserver"],
            controller_manager_binary=kcm,
        )
        # With users and permissions (the auth mode), every client connects as one of them.
        # The operator's admission webhook (expressions at apply): registered with the API
        # server at this port; the operator serves it with the API server's own serving cert.
        self.webhook_port = free_port()
        self.nats_auth = nats_auth
        self.nats = NatsServer(
            self.workdir / "nats",
            bins["nats-server"],
            extra_config=nats_auth.config() if nats_auth else "",
        )

    @property
    def kubeconfig(self) -> Path:
        assert self.control_plane.kubeconfig is not None
        return self.control_plane.kubeconfig

    @property
    def operator_args(self) -> list[str]:
        """What an operator on this stack passes to serve the registered webhook."""
        pki = self.control_plane.workdir / "pki"
        return [
            "--webhook-address",
            f"127.0.0.1:{self.webhook_port}",
            "--webhook-cert-file",
            str(pki / "apiserver.crt"),
            "--webhook-key-file",
            str(pki / "apiserver.key"),
        ]

    @property
    def pids(self) -> list[int]:
        servers = [*self.control_plane.servers, *([self.nats.server] if self.nats.server else [])]
        return [s.pid for s in servers if s.pid is not None]

    def start(self) -> DevStack:
        try:
            self.nats.start()
            self.control_plane.start()
            install_crd(self.kubeconfig)
            install_admission_policy(self.kubeconfig)
            install_webhook(
                self.kubeconfig,
                port=self.webhook_port,
                ca=self.control_plane.workdir / "pki" / "ca.crt",
            )
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        self.nats.stop()
        self.control_plane.stop()
        if self._tmp and not self.keep:
            shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> DevStack:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def install_crd(kubeconfig: Path, timeout: float = 30) -> None:
    """Apply the generated CRDs (server-side apply) and wait until they are Established."""
    from kubernetes import client, config

    from taskflow.api.crd import all_crds

    api_client = config.new_client_from_config(str(kubeconfig))
    try:
        ext = client.ApiextensionsV1Api(api_client)
        for body in all_crds().values():
            ext.patch_custom_resource_definition(
                name=body["metadata"]["name"],
                body=body,
                field_manager="taskflow-devstack",
                force=True,
                _content_type="application/apply-patch+yaml",
            )
        deadline = time.monotonic() + timeout
        for body in all_crds().values():
            while True:
                current = ext.read_custom_resource_definition(body["metadata"]["name"])
                conditions = (current.status and current.status.conditions) or []
                if any(c.type == "Established" and c.status == "True" for c in conditions):
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{body['metadata']['name']} was not Established in time")
                time.sleep(0.2)
    finally:
        api_client.close()


def install_admission_policy(kubeconfig: Path) -> None:
    """The chart's ValidatingAdmissionPolicies (taskflow.api.admission): parent links, and
    tenant policies (a namespace without a TaskflowPolicy may call anything)."""
    from kubernetes import client, config

    from taskflow.api.admission import policy, tenant_policy

    api_client = config.new_client_from_config(str(kubeconfig))
    try:
        api = client.AdmissionregistrationV1Api(api_client)
        for vap, binding in (policy(), tenant_policy()):
            api.patch_validating_admission_policy(
                name=vap["metadata"]["name"],
                body=vap,
                field_manager="taskflow-devstack",
                force=True,
                _content_type="application/apply-patch+yaml",
            )
            api.patch_validating_admission_policy_binding(
                name=binding["metadata"]["name"],
                body=binding,
                field_manager="taskflow-devstack",
                force=True,
                _content_type="application/apply-patch+yaml",
            )
    finally:
        api_client.close()


def install_webhook(kubeconfig: Path, *, port: int, ca: Path) -> None:
    """Register the operator's admission webhook (taskflow.api.admission) at 127.0.0.1:port."""
    import base64

    from kubernetes import client, config

    from taskflow.api.admission import WEBHOOK_PATH, expression_webhook

    api_client = config.new_client_from_config(str(kubeconfig))
    try:
        body = expression_webhook(
            client_config={
                "url": f"https://127.0.0.1:{port}{WEBHOOK_PATH}",
                "caBundle": base64.b64encode(ca.read_bytes()).decode(),
            }
        )
        client.AdmissionregistrationV1Api(api_client).patch_validating_webhook_configuration(
            name=body["metadata"]["name"],
            body=body,
            field_manager="taskflow-devstack",
            force=True,
            _content_type="application/apply-patch+yaml",
        )
    finally:
        api_client.close()
