"""etcd's growth with and without a TTL on finished flows (``python -m bench.growth``).

Runs the seed's flow N times on the real servers (the dev stack, the operator as a process,
the demo services), first without a TTL and then with ``ttl.afterSucceeded``, and prints what
stays in etcd (the Taskflow objects as the API server serves them, which is how etcd keeps a
custom resource: JSON) and what the history stream keeps instead; then the growth at a given
rate of flows (the measured peak, 31 flows/s, by default) and the time to etcd's default quota.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import nats
import yaml
from kubernetes import client, config

from taskflow.devstack.servers import DevStack, free_port

ROOT = Path(__file__).resolve().parent.parent
GROUP, VERSION, PLURAL = "taskflow.dev", "v1alpha1", "taskflows"
ETCD_QUOTA = 2 * 1024**3  # etcd's default backend quota


def seed(name: str, ttl: str | None) -> dict[str, Any]:
    body = yaml.safe_load((ROOT / "examples/configure-group.yaml").read_text())
    body["metadata"] = {"name": name}
    if ttl:
        body["spec"]["ttl"] = {"afterSucceeded": ttl}
    return dict(body)


async def run_flows(custom: Any, namespace: str, count: int, ttl: str | None) -> float:
    started = time.monotonic()
    for i in range(count):
        await asyncio.to_thread(
            custom.create_namespaced_custom_object,
            GROUP,
            VERSION,
            namespace,
            PLURAL,
            seed(f"f{i}", ttl),
        )
    while True:
        items = (
            await asyncio.to_thread(
                custom.list_namespaced_custom_object, GROUP, VERSION, namespace, PLURAL
            )
        )["items"]
        done = sum(1 for b in items if (b.get("status") or {}).get("phase") == "SUCCEEDED")
        if ttl is None and done == count:
            return time.monotonic() - started
        if ttl is not None and not items:
            return time.monotonic() - started
        if time.monotonic() - started > 300:
            raise TimeoutError(f"{done}/{count} done, {len(items)} left after 300 s")
        await asyncio.sleep(0.5)


def stored(custom: Any, namespace: str) -> tuple[int, int]:
    items = custom.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)["items"]
    return len(items), sum(len(json.dumps(i, separators=(",", ":"))) for i in items)


async def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.growth")
    parser.add_argument("--flows", type=int, default=100)
    parser.add_argument("--ttl", default="2s")
    parser.add_argument("--rate", type=float, default=31.0, help="flows per second to project")
    args = parser.parse_args()
    with DevStack(Path(tempfile.mkdtemp(prefix="growth-"))) as stack:
        api = config.new_client_from_config(str(stack.kubeconfig))
        core, custom = client.CoreV1Api(api), client.CustomObjectsApi(api)
        for ns in ("plain", "ttl"):
            core.create_namespace(client.V1Namespace(metadata={"name": ns}))
        log = open(stack.workdir / "operator.log", "ab")  # noqa: SIM115
        operator = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "taskflow.cli",
                "run",
                "--kubeconfig",
                str(stack.kubeconfig),
                "--nats-url",
                stack.nats.url,
                "--metrics-address",
                f"127.0.0.1:{free_port()}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        demo = subprocess.Popen(
            [sys.executable, "-m", "taskflow.demo", "--nats-url", stack.nats.url],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            await asyncio.sleep(3)
            plain_s = await run_flows(custom, "plain", args.flows, None)
            count, size = stored(custom, "plain")
            ttl_s = await run_flows(custom, "ttl", args.flows, args.ttl)
            left, left_size = stored(custom, "ttl")
            nc = await nats.connect(stack.nats.url)
            info = await nc.jetstream().stream_info("TASKFLOW_HISTORY")
            await nc.close()
        finally:
            operator.terminate()
            demo.terminate()
            operator.wait(10)
            demo.wait(10)
    per_flow = size / max(count, 1)
    history_per_flow = info.state.bytes / max(info.state.messages, 1)
    ttl_ms = int(args.ttl.rstrip("s")) * 1000 if args.ttl.endswith("s") else None
    growth = args.rate * per_flow
    result = {
        "flows": args.flows,
        "without_ttl": {
            "objects_in_etcd": count,
            "bytes_in_etcd": size,
            "bytes_per_flow": round(per_flow),
            "seconds": round(plain_s, 1),
        },
        "with_ttl": {
            "ttl": args.ttl,
            "objects_in_etcd": left,
            "bytes_in_etcd": left_size,
            "history_messages": info.state.messages,
            "history_bytes_per_flow": round(history_per_flow),
            "seconds_until_all_deleted": round(ttl_s, 1),
        },
        "projection": {
            "rate_flows_per_s": args.rate,
            "etcd_growth_without_ttl_bytes_per_s": round(growth),
            "hours_to_etcd_quota_without_ttl": round(ETCD_QUOTA / growth / 3600, 1),
            "etcd_steady_state_with_ttl_bytes": (
                round(args.rate * (ttl_ms / 1000) * per_flow) if ttl_ms else None
            ),
            "etcd_steady_state_with_1h_ttl_bytes": round(args.rate * 3600 * per_flow),
        },
    }
    print(json.dumps(result, indent=2))
    out = ROOT / "bench/results"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"growth-{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    asyncio.run(main())
