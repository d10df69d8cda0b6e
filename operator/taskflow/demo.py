"""The seed's demo services, served with plain nats-py (no SDK needed to serve tasks).

``group-core.createGroup`` creates a group; ``appliance-core.AddApplianceToGroup`` adds an
appliance, and fails the first attempt for one appliance so that retries are visible.
Run: ``python -m taskflow.demo --nats-url nats://127.0.0.1:4222``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal

import nats
from nats.aio.msg import Msg

log = logging.getLogger("taskflow.demo")
FLAKY_APPLIANCE = "vions56x"  # fails its first attempt, as in a real network glitch


def context_of(msg: Msg) -> dict[str, object]:
    raw = (msg.headers or {}).get("taskflowExecutionContext", "{}")
    value = json.loads(raw)
    return value if isinstance(value, dict) else {}


async def serve(url: str) -> None:
    nc = await nats.connect(url, name="taskflow-demo-services")
    groups: dict[str, dict[str, object]] = {}

    async def create_group(msg: Msg) -> None:
        params = json.loads(msg.data or b"{}")
        groups[params.get("groupId", "")] = {**params, "appliances": []}
        log.info("createGroup %s", params.get("groupId"))
        await msg.respond(
            json.dumps(
                {"success": True, "data": {"groupId": params.get("groupId"), "created": True}}
            ).encode()
        )

    async def add_appliance(msg: Msg) -> None:
        params = json.loads(msg.data or b"{}")
        info = context_of(msg).get("taskflow", {})
        attempt = info.get("taskInfo", {}).get("attempt", 0) if isinstance(info, dict) else 0
        appliance = params.get("applianceId")
        await asyncio.sleep(0.05)
        if appliance == FLAKY_APPLIANCE and attempt == 0:
            log.info("AddApplianceToGroup %s: failing attempt 0 on purpose", appliance)
            reply = {
                "success": False,
                "error": {"code": "UNREACHABLE", "message": f"appliance {appliance} unreachable"},
            }
        else:
            group = groups.setdefault(params.get("groupId", ""), {"appliances": []})
            appliances = group.setdefault("appliances", [])
            if isinstance(appliances, list):
                appliances.append(appliance)
            reply = {
                "success": True,
                "data": {"applianceId": appliance, "groupId": params.get("groupId")},
            }
        await msg.respond(json.dumps(reply).encode())

    async def describe_group(msg: Msg) -> None:
        params = json.loads(msg.data or b"{}")
        group = groups.get(params.get("groupId", ""), {})
        data = {"group": group, "asked": params}
        await msg.respond(json.dumps({"success": True, "data": data}).encode())

    await nc.subscribe("group-core.createGroup", queue="group-core", cb=create_group)
    await nc.subscribe("group-core.describeGroup", queue="group-core", cb=describe_group)
    await nc.subscribe(
        "appliance-core.AddApplianceToGroup", queue="appliance-core", cb=add_appliance
    )
    await nc.subscribe("hello.greet", queue="hello", cb=_greet)
    log.info("demo services listening on %s", url)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await nc.drain()


async def _greet(msg: Msg) -> None:
    params = json.loads(msg.data or b"{}")
    name = params.get("name", "world")
    await msg.respond(json.dumps({"success": True, "data": f"hello, {name}"}).encode())


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m taskflow.demo")
    parser.add_argument("--nats-url", default=os.environ.get("NATS_URL", "nats://127.0.0.1:4222"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s demo: %(message)s")
    asyncio.run(serve(args.nats_url))


if __name__ == "__main__":
    main()
