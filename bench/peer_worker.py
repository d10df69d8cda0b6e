"""The Temporal peer's worker, run in its own process (``python -m bench.peer_worker``).

The seed-shaped flow as a Temporal user would write it with the ``temporalio`` SDK: a workflow
that runs one activity (``createGroup``), then 10 in parallel (``addApplianceToGroups``).
The activity answers at once with ``{"success": true, "data": <params>}``, as the echo service
(``bench.echo``) does for ours. Workflow and activities share this one worker process, as is
usual with Temporal; the default (sandboxed) workflow runner.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
from datetime import timedelta
from typing import Any

from temporalio import activity, workflow

WORKFLOW = "SeedFlow"
TASK_QUEUE = "bench"
WIDTH = 10  # tasks in the second stage


@activity.defn(name="echo")
async def echo(params: dict[str, Any]) -> dict[str, Any]:
    return {"success": True, "data": params}


@workflow.defn(name=WORKFLOW)
class SeedFlow:
    @workflow.run
    async def run(self, group: str) -> list[dict[str, Any]]:
        timeout = timedelta(seconds=60)
        first = await workflow.execute_activity(
            echo, {"groupId": group, "name": f"Room {group}"}, start_to_close_timeout=timeout
        )
        rest = await asyncio.gather(
            *(
                workflow.execute_activity(
                    echo,
                    {"groupId": group, "applianceId": f"appl-{i:04d}x"},
                    start_to_close_timeout=timeout,
                )
                for i in range(WIDTH)
            )
        )
        return [first, *rest]


async def main(address: str, task_queue: str) -> None:
    from temporalio.client import Client
    from temporalio.worker import Worker

    client = await Client.connect(address)
    worker = Worker(client, task_queue=task_queue, workflows=[SeedFlow], activities=[echo])
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    parent = os.getppid()

    async def watch_parent() -> None:
        while os.getppid() == parent:  # never outlive the benchmark that started us
            await asyncio.sleep(1)
        stop.set()

    watcher = loop.create_task(watch_parent())
    async with worker:
        print("worker ready", flush=True)
        await stop.wait()
        watcher.cancel()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(worker.shutdown(), 5)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.peer_worker")
    parser.add_argument("--address", required=True, help="the Temporal frontend, host:port")
    parser.add_argument("--task-queue", default=TASK_QUEUE)
    args = parser.parse_args()
    asyncio.run(main(args.address, args.task_queue))
