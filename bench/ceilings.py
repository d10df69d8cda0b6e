"""Ceilings measured in the same run, so the operator's figures can be read as ratios.

- Raw status writes: PUT /status with optimistic concurrency (the resourceVersion last seen),
  of a finished seed-shaped flow's status, from one aiohttp client with many requests in
  flight over many objects: what this apiserver (and etcd) can take, with nothing else to do.
- Raw NATS request-reply: the same params and headers the operator sends for a seed task, to
  the same echo service, many requests in flight, from one nats-py client.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from typing import Any

import nats

from bench.flows import KIND, seed_spec
from bench.kube import Api

_RV = re.compile(rb'"resourceVersion":"(\d+)"')


async def status_writes(
    api: Api,
    namespace: str,
    status: dict[str, Any],
    *,
    objects: int = 256,
    concurrency: int = 64,
    duration: float = 8.0,
) -> dict[str, Any]:
    spec = seed_spec("g-ceiling")  # the same object a seed-shaped flow is
    names = [f"ceiling-{i:05d}" for i in range(objects)]
    sem = asyncio.Semaphore(concurrency)

    async def create(name: str) -> tuple[str, dict[str, Any]]:
        async with sem:
            body = json.dumps({**KIND, "metadata": {"name": name}, "spec": spec}).encode()
            created = await api.create_flow(namespace, body)
            return name, created

    created = dict(await asyncio.gather(*(create(n) for n in names)))
    queue: asyncio.Queue[tuple[str, dict[str, Any], str]] = asyncio.Queue()
    for name, obj in created.items():
        queue.put_nowait((name, obj["metadata"], obj["metadata"]["resourceVersion"]))
    latencies: list[float] = []
    errors = 0
    stop_at = time.monotonic() + duration
    prefix = {**KIND}

    async def worker() -> None:
        nonlocal errors
        while time.monotonic() < stop_at:
            name, meta, rv = await queue.get()
            body = json.dumps(
                {
                    **prefix,
                    "metadata": {**meta, "resourceVersion": rv},
                    "spec": spec,
                    "status": status,
                },
                separators=(",", ":"),
            ).encode()
            t0 = time.monotonic()
            try:
                raw = await api.put_status(namespace, name, body)
            except Exception:
                errors += 1
                fresh = await api.get_flow(namespace, name)
                queue.put_nowait((name, meta, fresh["metadata"]["resourceVersion"]))
                continue
            latencies.append(time.monotonic() - t0)
            match = _RV.search(raw)
            queue.put_nowait((name, meta, match.group(1).decode() if match else rv))

    t0 = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.monotonic() - t0
    latencies.sort()
    return {
        "writes": len(latencies),
        "errors": errors,
        "seconds": round(elapsed, 2),
        "rate": round(len(latencies) / elapsed, 1),
        "status_bytes": len(json.dumps(status)),
        "concurrency": concurrency,
        "objects": objects,
        "p50_ms": round(latencies[len(latencies) // 2] * 1000, 2) if latencies else None,
    }


async def nats_request_reply(
    url: str, request: dict[str, Any], *, concurrency: int = 64, duration: float = 5.0
) -> dict[str, Any]:
    nc = await nats.connect(url, name="bench-ceiling", pending_size=64 * 1024 * 1024)
    params: bytes = request["params"]
    headers: dict[str, str] = request["headers"]
    count = 0
    errors = 0
    stop_at = time.monotonic() + duration

    async def worker() -> None:
        nonlocal count, errors
        while time.monotonic() < stop_at:
            try:
                await nc.request("bench.echo", params, timeout=10, headers=headers)
                count += 1
            except Exception:
                errors += 1

    t0 = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.monotonic() - t0
    await nc.close()
    return {
        "requests": count,
        "errors": errors,
        "seconds": round(elapsed, 2),
        "rate": round(count / elapsed, 1),
        "request_bytes": len(params) + sum(len(k) + len(v) for k, v in headers.items()),
        "concurrency": concurrency,
    }
