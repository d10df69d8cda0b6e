"""`make dev` and the server fixtures: a second instance says so, Ctrl-C leaves nothing behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from taskflow.devstack.servers import NatsServer, find_binaries


def _processes_mentioning(text: str) -> list[str]:
    out = subprocess.run(["ps", "-ww", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if text in line and "ps -ww" not in line]


def test_make_dev_refuses_a_second_instance_and_stops_everything(tmp_path: Path) -> None:
    state = tmp_path / "dev"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "taskflow.devstack", "--dir", str(state), "--no-demo"]
    first = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True
    )
    try:
        deadline = time.monotonic() + 90
        while not (state / "env").exists():
            assert first.poll() is None, first.stdout.read() if first.stdout else ""
            assert time.monotonic() < deadline, "make dev did not come up"
            time.sleep(0.2)
        env_lines = (state / "env").read_text().splitlines()
        assert env_lines[0] == f"export KUBECONFIG={state / 'kubeconfig'}"
        assert env_lines[1].startswith("export NATS_URL=nats://127.0.0.1:")
        kube = subprocess.run(
            [
                "kubectl",
                "--kubeconfig",
                str(state / "kubeconfig"),
                "get",
                "crd",
                "taskflows.taskflow.dev",
            ],
            capture_output=True,
            text=True,
        )
        assert kube.returncode == 0, kube.stderr
        assert _processes_mentioning(str(state)), "servers should be running"

        second = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=30)
        assert second.returncode == 1
        assert "already running" in second.stderr
    finally:
        first.send_signal(signal.SIGINT)
        first.wait(60)
    assert first.returncode == 0
    leftovers = []
    for _ in range(50):
        leftovers = _processes_mentioning(str(state))
        if not leftovers:
            break
        time.sleep(0.1)
    assert leftovers == [], f"processes left behind: {leftovers}"
    assert not (state / "env").exists()


@pytest.mark.parametrize("kill", [False, True])
def test_a_server_is_stopped_with_its_process_group(tmp_path: Path, kill: bool) -> None:
    nats = NatsServer(tmp_path / "nats", find_binaries(("nats-server",))["nats-server"])
    nats.start()
    assert nats.server is not None and nats.server.pid is not None
    pid = nats.server.pid
    if kill:  # a crashed test run: the process group still goes with it
        os.killpg(pid, signal.SIGKILL)
    nats.stop()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
