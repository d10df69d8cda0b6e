"""``python -m chaos.flood``: floods of replies stay bounded (issue #12, item 4).

On its own stack, while one flow waits for a real answer: a burst of replies at the size cap
(1 MiB) and of small ones for attempts that do not exist, then a storm of forged replies on
the flow's own reply subjects. It prints the operator's memory before, at its peak and after,
against the stated bound (the memory before + the reply buffer, ``--reply-pending-bytes``,
64 MiB by default + 64 MiB of slack for the rest), what the operator counted (dropped as a
slow consumer, forged), and how long the real answer took to be recorded in the middle of it.
Figures, not pass/fail.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

PENDING_MB = 64
SLACK_MB = 64


async def flood(args: argparse.Namespace) -> dict[str, Any]:
    import nats
    from bench.__main__ import Operator
    from bench.driver import operator_metrics
    from bench.procs import Sampler
    from kubernetes import client, config

    from taskflow.devstack.servers import DevStack

    tmp = Path(tempfile.mkdtemp(prefix="taskflow-flood-"))
    with DevStack(tmp / "stack") as stack:
        api = config.new_client_from_config(str(stack.kubeconfig))
        custom = client.CustomObjectsApi(api)
        operator = Operator(
            kubeconfig=stack.kubeconfig,
            nats_url=stack.nats.url,
            log_path=tmp / "operator.log",
            flush_interval=1.0,
        )
        operator.start()
        nc = await nats.connect(stack.nats.url, pending_size=512 * 1024 * 1024)
        held: list[Any] = []

        async def hold(msg: Any) -> None:
            held.append(msg)

        await nc.subscribe("flood.hold", cb=hold)
        body = {
            "apiVersion": "taskflow.dev/v1alpha1",
            "kind": "Taskflow",
            "metadata": {"name": "victim"},
            "spec": {
                "options": {"timeout": "10m"},
                "stages": [
                    {
                        "name": "s",
                        "tasks": [
                            {
                                "name": "t",
                                "taskDetails": {"serviceId": "flood", "actionName": "hold"},
                            }
                        ],
                    }
                ],
            },
        }
        created = await asyncio.to_thread(
            custom.create_namespaced_custom_object,
            "taskflow.dev",
            "v1alpha1",
            "default",
            "taskflows",
            body,
        )
        uid = created["metadata"]["uid"]
        while not held:
            await asyncio.sleep(0.05)
        sampler = Sampler(pid=operator.pid, interval=0.05)
        await asyncio.sleep(1.0)
        before = sampler.sample()
        sampler.start()
        started = time.monotonic()

        big = b'{"success": true, "data": "' + b"x" * (1024 * 1024 - 64) + b'"}'
        for i in range(args.big):  # at the cap, for flows that do not exist
            await nc.publish(f"taskflow.reply.{i:08d}-0000-0000-0000-000000000000.s.t.0.x", big)
        small = json.dumps({"success": True, "data": {"n": 1}}).encode()
        for i in range(args.small):  # stale and unknown attempts
            await nc.publish(f"taskflow.reply.{uid}.s.t.{i + 1}", small)
        for _ in range(args.storm // 2):  # forged: the flow's own subject, a made-up token
            await nc.publish(f"taskflow.reply.{uid}.s.t.0", small)
            await nc.publish(f"taskflow.reply.{uid}.s.t.0.{'0' * 32}", small)
        await held[0].respond(json.dumps({"success": True, "data": "real"}).encode())
        answered = time.monotonic()
        await nc.flush()
        published = time.monotonic() - started
        recorded_s = None
        while time.monotonic() - answered < 120:
            flow = await asyncio.to_thread(
                custom.get_namespaced_custom_object,
                "taskflow.dev",
                "v1alpha1",
                "default",
                "taskflows",
                "victim",
            )
            if (flow.get("status") or {}).get("phase") == "SUCCEEDED":
                recorded_s = time.monotonic() - answered
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(3.0)
        metrics = operator_metrics(operator.port)
        after = sampler.sample()
        if sampler.task:
            sampler.task.cancel()
        await nc.close()
        operator.stop()
        api.close()
    mb = 1024.0
    return {
        "replies": {
            "at the cap (1 MiB), unknown flows": args.big,
            "small, stale or unknown attempts": args.small,
            "forged, on the flow's subjects": args.storm,
        },
        "published in s": round(published, 2),
        "operator RSS MB": {
            "before": round(before / mb, 1),
            "peak": round(sampler.peak_kb / mb, 1),
            "after": round(after / mb, 1),
        },
        "stated bound MB": round(before / mb + PENDING_MB + SLACK_MB, 1),
        "within the bound": sampler.peak_kb / mb <= before / mb + PENDING_MB + SLACK_MB,
        "dropped as a slow consumer": metrics.get("taskflow_dropped_replies_total", 0.0),
        "forged replies counted": metrics.get("taskflow_forged_replies_total", 0.0),
        "real answer recorded after s": None if recorded_s is None else round(recorded_s, 2),
    }


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m chaos.flood", description=__doc__)
    parser.add_argument("--big", type=int, default=300, help="replies at the 1 MiB cap")
    parser.add_argument("--small", type=int, default=50_000, help="stale or unknown attempts")
    parser.add_argument("--storm", type=int, default=100_000, help="forged replies on one flow")
    parser.add_argument("--out", default="chaos/results", help="where flood.json goes")
    args = parser.parse_args()
    figures = asyncio.run(flood(args))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "flood.json").write_text(json.dumps(figures, indent=2) + "\n")
    for key, value in figures.items():
        print(f"{key:32} {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
