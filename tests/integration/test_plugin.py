"""``kubectl taskflow`` as users run it: a subprocess with the kubeconfig, against a real flow."""

from __future__ import annotations

import asyncio
import json
import os
import pty
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from conftest import Flows, task_status

PLUGIN = str(Path(sys.executable).parent / "kubectl-taskflow")
ANSI = re.compile(r"\x1b\[[0-9;]*m")


class Plugin:
    def __init__(self, stack: Any, namespace: str) -> None:
        self.env = {**os.environ, "NATS_URL": stack.nats.url}
        self.env.pop("NO_COLOR", None)
        self.env.pop("KUBECONFIG", None)
        self.base = ["--kubeconfig", str(stack.kubeconfig), "-n", namespace]

    async def __call__(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return await asyncio.to_thread(
            subprocess.run,
            [PLUGIN, *args, *self.base],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )


@pytest.fixture
def plugin(stack, namespace: str) -> Plugin:  # type: ignore[no-untyped-def]
    return Plugin(stack, namespace)


@pytest.fixture
async def service(nc, svc: str) -> AsyncIterator[dict[str, Any]]:  # type: ignore[no-untyped-def]
    """``<svc>.act``: fails tasks with params.fail until healed; holds params.hold ones."""
    state: dict[str, Any] = {"heal": False, "gate": asyncio.Event()}

    async def reply(msg: Any) -> None:
        params = json.loads(msg.data)
        if params.get("hold"):
            await state["gate"].wait()
        if params.get("fail") and not state["heal"]:
            body: dict[str, Any] = {
                "success": False,
                "error": {"message": f"{params['name']} broke", "code": "BROKEN"},
            }
        else:
            body = {"success": True, "data": params["name"]}
        await msg.respond(json.dumps(body).encode())

    async def cb(msg: Any) -> None:
        asyncio.get_running_loop().create_task(reply(msg))

    sub = await nc.subscribe(f"{svc}.act", cb=cb)
    yield state
    state["gate"].set()
    await sub.unsubscribe()


def task(svc: str, name: str, **params: Any) -> dict[str, Any]:
    return {
        "name": name,
        "params": {"name": name, **params},
        "taskDetails": {"serviceId": svc, "actionName": "act"},
    }


def mixed_flow(svc: str) -> dict[str, Any]:
    """A success, a failure after one retry, and an inline nested flow."""
    return {
        "spec": {
            "options": {"continueOnTaskFailure": True, "retryDelay": 0},
            "stages": [
                {"name": "prepare", "tasks": [task(svc, "ok")]},
                {
                    "name": "work",
                    "tasks": [
                        {**task(svc, "bad", fail=True), "options": {"maxRetries": 1}},
                        {
                            "name": "sub",
                            "type": "TASKFLOW",
                            "taskflow": {
                                "stages": [{"name": "inner", "tasks": [task(svc, "deep")]}]
                            },
                        },
                    ],
                },
            ],
        }
    }


@pytest.fixture
async def finished(operator, flows: Flows, service: dict[str, Any], svc: str) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    await flows.create(mixed_flow(svc), name="mixed")
    return await flows.wait("mixed")


async def test_tree_shows_stages_tasks_errors_and_nested_flows_plain_when_piped(
    plugin: Plugin, finished: dict[str, Any], namespace: str
) -> None:
    result = await plugin("tree", "mixed")

    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert not ANSI.search(out)
    lines = out.splitlines()
    assert re.match(rf"^{namespace}/mixed  COMPLETED_WITH_FAILURES  3/3  \S+$", lines[0]), out
    assert re.match(r"^├── stage prepare  SUCCEEDED  \S+$", lines[1]), out
    assert re.match(
        r"^│   └── ok  SUCCEEDED  attempt 0  \d+ms$|^│   └── ok  SUCCEEDED  "
        r"attempt 0  [\d.]+s$",
        lines[2],
    ), out
    assert lines[3].startswith("└── stage work  FAILED")
    assert re.match(
        r"^    ├── bad  FAILED  attempt 1  \S+  error: bad broke \[BROKEN\]$", lines[4]
    ), out
    assert lines[5].startswith("    └── sub  SUCCEEDED  (nested flow)  attempt 0")
    child = task_status(finished, "work", "sub")["nestedTaskflows"][0]
    assert lines[6].startswith(f"        └── flow {child}  SUCCEEDED  1/1  (attempt 0)")
    assert lines[7].startswith("            └── stage inner  SUCCEEDED")
    assert lines[8].startswith("                └── deep  SUCCEEDED  attempt 0")
    assert len(lines) == 9


async def test_tree_is_coloured_on_a_terminal(plugin: Plugin, finished: dict[str, Any]) -> None:
    leader, follower = pty.openpty()
    try:
        proc = await asyncio.to_thread(
            subprocess.run,
            [PLUGIN, "tree", "mixed", *plugin.base],
            env=plugin.env,
            stdout=follower,
            stderr=subprocess.PIPE,
            timeout=60,
        )
        os.close(follower)
        chunks = []
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:
                break
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(leader)
    out = b"".join(chunks).decode()
    assert proc.returncode == 0, proc.stderr
    assert ANSI.search(out), out
    assert "COMPLETED_WITH_FAILURES" in ANSI.sub("", out)


async def test_tree_as_json_is_the_clients_details(
    plugin: Plugin, finished: dict[str, Any]
) -> None:
    result = await plugin("tree", "mixed", "-o", "json")

    assert result.returncode == 0, result.stderr
    tree = json.loads(result.stdout)
    assert tree["taskflowId"] == finished["metadata"]["uid"]
    sub = tree["stages"][1]["tasks"][1]
    assert sub["children"][0]["stages"][0]["tasks"][0]["response"] == "deep"


async def test_events_replay_prints_the_history_and_ends(
    plugin: Plugin, finished: dict[str, Any]
) -> None:
    result = await plugin("events", "mixed", "--replay")

    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert re.search(r"#1\s+TASKFLOW\s+mixed\s+RUNNING", lines[0]), lines[0]
    assert re.search(r"TASKFLOW\s+mixed\s+COMPLETED_WITH_FAILURES$", lines[-1]), lines[-1]
    assert any(
        re.search(r"TASK\s+work/bad\s+FAILED  attempt 1  error: bad broke \[BROKEN\]", ln)
        for ln in lines
    ), result.stdout
    as_json = await plugin("events", "mixed", "--replay", "-o", "json")
    events = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert len(events) == len(lines)
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))


async def test_events_without_replay_on_a_finished_flow_says_so(
    plugin: Plugin, finished: dict[str, Any]
) -> None:
    result = await plugin("events", "mixed")
    assert result.returncode == 0
    assert result.stdout == ""
    assert "already ended COMPLETED_WITH_FAILURES; use --replay" in result.stderr


async def test_events_tails_a_running_flow_live(
    operator, plugin: Plugin, flows: Flows, service: dict[str, Any], svc: str, nc
) -> None:
    created = await flows.create(
        {"spec": {"stages": [{"name": "s", "tasks": [task(svc, "held", hold=True)]}]}}, name="live"
    )
    await flows.wait("live", until=lambda b: (b.get("status") or {}).get("phase") == "RUNNING")
    proc = await asyncio.create_subprocess_exec(
        PLUGIN,
        "events",
        "live",
        *plugin.base,
        env=plugin.env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    subject = f"taskflow.events.{created['metadata']['uid']}"
    js = nc.jetstream()
    for _ in range(200):  # until the plugin's consumer exists: then nothing can be missed
        consumers = await js.consumers_info("TASKFLOW_EVENTS")
        if any(c.config.filter_subject == subject for c in consumers):
            break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError("the plugin never subscribed")
    service["gate"].set()
    out, err = await asyncio.wait_for(proc.communicate(), 30)

    assert proc.returncode == 0, err
    lines = out.decode().splitlines()
    assert re.search(r"TASK\s+s/held\s+SUCCEEDED  attempt 0", lines[0]), lines
    assert re.search(r"TASKFLOW\s+live\s+SUCCEEDED$", lines[-1]), lines


async def test_retry_failed_tasks_then_stages_and_tasks(
    plugin: Plugin, finished: dict[str, Any], flows: Flows, service: dict[str, Any]
) -> None:
    service["heal"] = True

    result = await plugin("retry", "mixed", "--failed")

    assert result.returncode == 0, result.stderr
    assert re.match(
        r"^retry r-[0-9a-f]{12} of mixed accepted: retry r-[0-9a-f]{12}: "
        r"1 task\(s\) to run again$",
        result.stdout.strip(),
    ), result.stdout
    done = await flows.wait("mixed", until=lambda b: b["status"]["phase"] == "SUCCEEDED")
    assert task_status(done, "work", "bad")["response"] == "bad"

    result = await plugin("retry", "mixed", "--stage", "prepare", "--task", "work/bad")
    assert result.returncode == 0, result.stderr
    assert "accepted" in result.stdout
    body = await flows.get("mixed")
    assert body["spec"]["retry"]["stages"] == [
        {"name": "prepare"},
        {"name": "work", "tasks": ["bad"]},
    ]
    await flows.wait(
        "mixed",
        until=lambda b: (
            b["status"]["phase"] == "SUCCEEDED"
            and b["status"]["retry"]["id"] == body["spec"]["retry"]["id"]
        ),
    )


async def test_cancel_a_running_flow_then_refuse_a_second_cancel(
    operator, plugin: Plugin, flows: Flows, service: dict[str, Any], svc: str, namespace: str
) -> None:
    await flows.create(
        {"spec": {"stages": [{"name": "s", "tasks": [task(svc, "held", hold=True)]}]}},
        name="stop-me",
    )
    await flows.wait("stop-me", until=lambda b: (b.get("status") or {}).get("phase") == "RUNNING")

    result = await plugin("cancel", "stop-me")

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"taskflow {namespace}/stop-me cancelled (phase CANCELLED)"
    again = await plugin("cancel", "stop-me")
    assert again.returncode == 1
    assert again.stdout == ""
    assert again.stderr == (
        f"error: taskflow {namespace}/stop-me already ended CANCELLED: nothing to cancel\n"
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["tree", "nope"], "error: taskflow {ns}/nope not found"),
        (["retry", "nope"], "error: taskflow {ns}/nope not found"),
        (
            ["retry", "nope", "--task", "justastage"],
            "error: --task takes STAGE/TASK, not 'justastage'",
        ),
        (
            ["tree", "nope", "--kubeconfig", "/does/not/exist"],
            "error: cannot load the kubeconfig: ",
        ),
        (
            ["events", "nope", "--nats-url", "nats://127.0.0.1:1"],
            "error: cannot connect to NATS at nats://127.0.0.1:1",
        ),
    ],
    ids=["unknown-flow", "unknown-flow-retry", "bad-task", "bad-kubeconfig", "no-nats"],
)
async def test_errors_are_one_clear_line_and_a_non_zero_exit(
    plugin: Plugin, namespace: str, args: list[str], message: str
) -> None:
    # flags given twice: the last wins, as kubectl users expect
    result = await asyncio.to_thread(
        subprocess.run,
        [PLUGIN, *plugin.base, *args],
        env=plugin.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(message.format(ns=namespace)), result.stderr


async def test_kubectl_finds_the_plugin(
    kubectl, finished: dict[str, Any], stack, namespace: str
) -> None:
    env = {**os.environ, "PATH": f"{Path(PLUGIN).parent}:{os.environ['PATH']}"}
    result = await asyncio.to_thread(
        subprocess.run,
        [
            "kubectl",
            "taskflow",
            "tree",
            "mixed",
            "--kubeconfig",
            str(stack.kubeconfig),
            "-n",
            namespace,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"{namespace}/mixed  COMPLETED_WITH_FAILURES")
