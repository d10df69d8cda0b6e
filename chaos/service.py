"""The service the chaos run's flows call, in its own process (``python -m chaos.service``).

It stands for a real service that keeps a ledger: every request it receives is written to a
JSON-lines file (one line per request, flushed at once) with its idempotency key
``<uid>/<stage>/<task>/<attempt>``, when it arrived, and exactly what it answered. The driver
compares that ledger with the flows' final status: a result the operator lost or changed, and
an attempt executed twice, both show up there.

- It answers after a small random delay with ``{"success": true, "data": {...}}``, the data
  derived from the request (its key, its params, and a random token, so two executions of a
  task never answer the same).
- A key it has seen before (a redelivery of the same attempt) is answered from its cache and
  not executed again, as an idempotent service (and the SDK) does; the line says ``repeat``.
- It reconnects to NATS forever (``max_reconnect_attempts=-1``): the run restarts and pauses
  nats-server under it.
- It is a NATS Services API service (``group-core`` and ``appliance-core``, the seed's), and
  with ``--idempotent`` (the default) it says in its metadata that it answers a repeated key
  from its cache (``taskflow.dev/idempotent``, docs/wire-protocol.md): the operator may then
  ask an attempt again whose reply may have been lost, instead of letting it time out.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import time
from typing import IO, Any

import nats
from nats.aio.msg import Msg
from nats.micro import add_service
from nats.micro.request import Request

# The seed's services and actions: (service, endpoint); the subject is "<service>.<endpoint>".
ENDPOINTS = (("group-core", "createGroup"), ("appliance-core", "AddApplianceToGroup"))
PING = "chaos-ctl.ping"
KEY_HEADER = "Taskflow-Idempotency-Key"
IDEMPOTENT = "taskflow.dev/idempotent"


class Ledger:
    """Answers requests and writes one line per request."""

    def __init__(
        self, *, nc: Any, out: IO[str], rng: random.Random, delay_ms: tuple[int, int]
    ) -> None:
        self.nc = nc
        self.out = out
        self.rng = rng
        self.delay_ms = delay_ms
        self.answers: dict[str, dict[str, Any]] = {}
        self.tasks: set[asyncio.Task[None]] = set()

    async def on_request(self, request: Request) -> None:
        # Endpoint handlers run one at a time: answer in a task of its own.
        task = asyncio.get_running_loop().create_task(self.answer(request, time.time()))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def answer(self, msg: Request, received: float) -> None:
        key = (msg.headers or {}).get(KEY_HEADER, "")
        repeat = key in self.answers
        if repeat:
            reply = self.answers[key]
        else:
            try:
                params = json.loads(msg.data or b"{}")
            except ValueError:
                params = None
            reply = {
                "success": True,
                "data": {"key": key, "params": params, "token": f"{self.rng.getrandbits(48):012x}"},
            }
            if key:
                self.answers[key] = reply
        low, high = self.delay_ms
        await asyncio.sleep(self.rng.uniform(low, high) / 1000)
        error = None
        try:
            await msg.respond(json.dumps(reply, separators=(",", ":")).encode())
        except Exception as exc:  # (a full reconnect buffer, a closed connection)
            error = f"{type(exc).__name__}: {exc}"
        line = {
            "key": key,
            "subject": msg.subject,
            "received": received,
            "sent": time.time(),
            "repeat": repeat,
            "data": reply["data"],
            "error": error,
        }
        self.out.write(json.dumps(line, separators=(",", ":")) + "\n")
        self.out.flush()


async def main(
    *, url: str, ledger_path: str, seed: int, delay_ms: tuple[int, int], idempotent: bool
) -> None:
    async def on_error(exc: Exception) -> None:
        print(f"nats: {exc!r}", flush=True)

    async def on_reconnect() -> None:
        print(f"{time.time():.3f} reconnected", flush=True)

    async def on_disconnect() -> None:
        print(f"{time.time():.3f} disconnected", flush=True)

    nc = await nats.connect(
        url,
        name="chaos-service",
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.2,
        pending_size=64 * 1024 * 1024,
        error_cb=on_error,
        reconnected_cb=on_reconnect,
        disconnected_cb=on_disconnect,
    )
    with open(ledger_path, "a", encoding="utf-8") as out:
        ledger = Ledger(nc=nc, out=out, rng=random.Random(seed), delay_ms=delay_ms)
        metadata = {IDEMPOTENT: "true"} if idempotent else {}
        for name, endpoint in ENDPOINTS:
            service = await add_service(nc, name=name, version="1.0.0", metadata=metadata)
            await service.add_endpoint(
                name=endpoint, subject=f"{name}.{endpoint}", handler=ledger.on_request
            )

        async def pong(msg: Msg) -> None:
            await msg.respond(b"pong")

        await nc.subscribe(PING, cb=pong)
        await nc.flush()
        print("chaos service ready", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        parent = os.getppid()
        while not stop.is_set() and os.getppid() == parent:  # never outlive the run
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1)
        if ledger.tasks:  # answers under way are finished and written
            await asyncio.wait(set(ledger.tasks), timeout=5)
    with contextlib.suppress(Exception):
        await asyncio.wait_for(nc.close(), 5)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m chaos.service")
    parser.add_argument("--nats-url", required=True)
    parser.add_argument("--ledger", required=True, help="the JSON-lines file to append to")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--delay-ms", type=int, nargs=2, default=(100, 3000), metavar=("MIN", "MAX")
    )
    parser.add_argument(
        "--idempotent",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="declare idempotent replies in the Services API metadata",
    )
    args = parser.parse_args()
    asyncio.run(
        main(
            url=args.nats_url,
            ledger_path=args.ledger,
            seed=args.seed,
            delay_ms=(args.delay_ms[0], args.delay_ms[1]),
            idempotent=args.idempotent,
        )
    )
