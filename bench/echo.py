"""Echo services for the benchmark, run in their own process (``python -m bench.echo``).

Plain nats-py, as any service author would write it:

- ``bench.echo``: answers at once with ``{"success": true, "data": <params>}``.
- ``bench.slow``: holds the reply until ``bench.ctl.release`` (or ``holdMs`` in the params,
  default 10 minutes) -- the scale run's "services that answer slowly".

Every request is recorded (when it arrived, and when it was answered) with the flow uid, stage
and task parsed from the reply subject ``taskflow.reply.<uid>.<stage>.<task>.<attempt>``, so
the driver can compute stage transitions and dispatch latencies on the service side.
``bench.ctl.dump`` writes the records to a file the driver names and starts a new record.
All times are ``time.monotonic()``: one host clock, shared by every process on the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import time
from typing import Any

import nats
from nats.aio.msg import Msg

DEFAULT_HOLD_S = 600.0


class Echo:
    def __init__(self, nc: nats.NATS) -> None:
        self.nc = nc
        # (uid, stage, task, attempt, received, replied); replied is 0.0 until answered.
        self.records: list[list[Any]] = []
        self.held: list[tuple[Msg, list[Any], bytes]] = []
        self.release_event = asyncio.Event()
        self.tasks: set[asyncio.Task[None]] = set()

    def record(self, msg: Msg) -> list[Any]:
        now = time.monotonic()
        reply = msg.reply or ""
        parts = reply.split(".")
        if len(parts) in (6, 7) and parts[0] == "taskflow":  # (7: with the reply token)
            row = [parts[2], parts[3], parts[4], int(parts[5]), now, 0.0]
        else:  # a plain request (the raw NATS ceiling): not recorded per task
            return [None, None, None, 0, now, 0.0]
        self.records.append(row)
        return row

    async def echo(self, msg: Msg) -> None:
        row = self.record(msg)
        body = b'{"success":true,"data":' + (msg.data or b"{}") + b"}"
        row[5] = time.monotonic()
        await self.nc.publish(msg.reply, body)

    async def slow(self, msg: Msg) -> None:
        row = self.record(msg)
        body = b'{"success":true,"data":' + (msg.data or b"{}") + b"}"
        hold = DEFAULT_HOLD_S
        with contextlib.suppress(ValueError, TypeError, AttributeError):
            hold = float(json.loads(msg.data or b"{}").get("holdMs", hold * 1000)) / 1000
        self.held.append((msg, row, body))
        task = asyncio.get_running_loop().create_task(self.answer_later(msg, row, body, hold))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def answer_later(self, msg: Msg, row: list[Any], body: bytes, hold: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.release_event.wait(), hold)
        if row[5]:
            return
        row[5] = time.monotonic()
        await self.nc.publish(msg.reply, body)

    async def release(self, msg: Msg) -> None:
        count = sum(1 for _, row, _ in self.held if not row[5])
        self.release_event.set()
        self.held.clear()
        self.release_event = asyncio.Event()
        await msg.respond(json.dumps({"released": count}).encode())

    async def dump(self, msg: Msg) -> None:
        path = json.loads(msg.data)["path"]
        records, self.records = self.records, []
        # Rows of held requests stay referenced by their timers; a dump is a snapshot.
        with open(path, "w") as out:
            json.dump(records, out, separators=(",", ":"))
        await msg.respond(json.dumps({"records": len(records), "held": len(self.held)}).encode())

    async def stats(self, msg: Msg) -> None:
        await msg.respond(
            json.dumps({"records": len(self.records), "held": len(self.held)}).encode()
        )


async def main(url: str) -> None:
    nc = await nats.connect(
        url, name="bench-echo", pending_size=64 * 1024 * 1024, max_reconnect_attempts=-1
    )
    echo = Echo(nc)
    big = {"pending_msgs_limit": 2_000_000, "pending_bytes_limit": 1024 * 1024 * 1024}
    await nc.subscribe("bench.echo", cb=echo.echo, **big)
    await nc.subscribe("bench.slow", cb=echo.slow, **big)
    await nc.subscribe("bench.ctl.release", cb=echo.release)
    await nc.subscribe("bench.ctl.dump", cb=echo.dump)
    await nc.subscribe("bench.ctl.stats", cb=echo.stats)
    await nc.flush()
    print("echo services ready", flush=True)
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
    await stop.wait()
    watcher.cancel()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(nc.close(), 5)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.echo")
    parser.add_argument("--nats-url", required=True)
    args = parser.parse_args()
    asyncio.run(main(args.nats_url))
