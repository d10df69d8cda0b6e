"""``make dev``: the whole product on this machine, in the foreground.

Starts etcd, kube-apiserver, nats-server, the CRD, the operator and the seed's demo services;
writes ``.dev/kubeconfig`` and ``.dev/env``; Ctrl-C stops everything. A second ``make dev``
while one runs says so instead of clashing.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import sys
import time
from pathlib import Path

from taskflow.devstack.natsauth import OPERATOR_USER, VIEWER_USER, NatsAuth
from taskflow.devstack.servers import DevStack, Server, free_port

# The seed's demo services (taskflow.demo), served by one connection.
DEMO_SERVICES = ("group-core", "appliance-core", "hello")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def main() -> int:
    parser = argparse.ArgumentParser(prog="make dev")
    parser.add_argument("--dir", default=".dev", help="where state, logs and kubeconfig go")
    parser.add_argument("--no-operator", action="store_true")
    parser.add_argument("--no-demo", action="store_true")
    parser.add_argument("--no-ui", action="store_true", help="no web view")
    parser.add_argument(
        "--ui-port", type=int, default=8081, help="the web view's port (if taken: any free one)"
    )
    parser.add_argument(
        "--auth",
        action="store_true",
        help="NATS with users and least-privilege permissions "
        "(docs/security.md); prints the credentials",
    )
    args = parser.parse_args()

    root = Path(args.dir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    lock = root / "pid"
    if lock.exists():
        with contextlib.suppress(ValueError):
            pid = int(lock.read_text())
            if _alive(pid):
                print(
                    f"make dev is already running (pid {pid}); use `source {root}/env`, "
                    "or stop it with Ctrl-C in its terminal",
                    file=sys.stderr,
                )
                return 1
    lock.write_text(str(os.getpid()))
    for stale in ("kube", "nats", "operator.log", "demo.log", "ui.log"):
        path = root / stale
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()

    stop = False

    def on_signal(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    auth = NatsAuth.make(users={"svc-demo": DEMO_SERVICES}) if args.auth else None
    stack = DevStack(root, nats_auth=auth)
    children: list[Server] = []
    try:
        print("starting etcd, kube-apiserver and nats-server ...", flush=True)
        stack.start()
        kubeconfig = root / "kubeconfig"
        shutil.copy(stack.kubeconfig, kubeconfig)
        kubeconfig.chmod(0o600)
        env_file = root / "env"
        # With --auth, the user's NATS_URL is the viewer's (it may replay events only).
        user_url = auth.url(stack.nats.url, VIEWER_USER) if auth else stack.nats.url
        env_file.write_text(f"export KUBECONFIG={kubeconfig}\nexport NATS_URL={user_url}\n")
        env_file.chmod(0o600)
        operator_auth: list[str] = []
        if auth:
            secret = root / "nats-operator-password"
            secret.write_text(auth.passwords[OPERATOR_USER])
            secret.chmod(0o600)
            operator_auth = ["--nats-user", OPERATOR_USER, "--nats-password-file", str(secret)]
        python = sys.executable
        if not args.no_demo:
            demo_url = auth.url(stack.nats.url, "svc-demo") if auth else stack.nats.url
            children.append(
                Server(
                    "demo",
                    [python, "-m", "taskflow.demo", "--nats-url", demo_url],
                    root / "demo.log",
                )
            )
        if not args.no_operator:
            children.append(
                Server(
                    "operator",
                    [
                        python,
                        "-m",
                        "taskflow.cli",
                        "run",
                        "--kubeconfig",
                        str(kubeconfig),
                        "--nats-url",
                        stack.nats.url,
                        "--metrics-address",
                        f"127.0.0.1:{free_port()}",
                        "--nats-api",
                        "on",
                        *stack.operator_args,
                        *operator_auth,
                    ],
                    root / "operator.log",
                )
            )
        ui_url = ""
        if not args.no_ui:
            port = args.ui_port if _free(args.ui_port) else free_port()
            ui_url = f"http://127.0.0.1:{port}/"
            children.append(
                Server(
                    "ui",
                    # As the user's NATS user (with --auth: the viewer, who may replay events).
                    [
                        python,
                        "-m",
                        "taskflow.cli",
                        "ui",
                        "--kubeconfig",
                        str(kubeconfig),
                        "--nats-url",
                        user_url,
                        "--address",
                        f"127.0.0.1:{port}",
                    ],
                    root / "ui.log",
                )
            )
        for child in children:
            child.start()
        if auth:
            print(f"\nNATS users (their permissions: {root}/nats/nats.conf):")
            for user, password in auth.passwords.items():
                print(f"  {user:20} {password}")
        print(
            f"""
The taskflow dev stack is up.
  kube-apiserver  {stack.control_plane.url}
  nats-server     {stack.nats.url}
  web view        {ui_url or "(--no-ui)"}  (read-only until you sign in: docs/ui.md)
  logs            {root}/*.log

In another terminal:
  source {env_file}
  kubectl apply -f examples/configure-group.yaml
  kubectl get taskflows -w

Ctrl-C stops everything.""",
            flush=True,
        )
        while not stop:
            for child in children:
                if child.process and child.process.poll() is not None:
                    print(
                        f"{child.name} exited ({child.process.returncode}); see {child.log}",
                        file=sys.stderr,
                    )
                    stop = True
            time.sleep(0.3)
    finally:
        print("\nstopping ...", flush=True)
        for child in reversed(children):
            child.stop()
        stack.stop()
        with contextlib.suppress(FileNotFoundError):
            lock.unlink()
        with contextlib.suppress(FileNotFoundError):
            (root / "env").unlink()
        print("stopped.", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
