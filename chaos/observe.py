"""What the run watches: event arrivals as they happen, every flow's event stream afterwards,
and the flows themselves through the API server.

- ``EventTap`` subscribes (core NATS) to ``taskflow.events.>`` and notes when each event
  arrives: the first one after an operator restart tells when it resumed work.
- ``read_streams`` reads the whole ``TASKFLOW_EVENTS`` stream once, at the end, and returns
  every flow's ``seq`` numbers in stream order: all flows, not a sample.
- ``list_flows`` reads every flow of the namespace, retrying while the API server is down.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import nats
from bench.kube import Api
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

EVENT_STREAM = "TASKFLOW_EVENTS"
EVENT_PREFIX = "taskflow.events."
T = TypeVar("T")


async def retrying(call: Callable[[], Awaitable[T]], *, until: float, pause: float = 0.5) -> T:
    """``call()`` until it succeeds or the wall clock passes ``until`` (then its last error)."""
    while True:
        try:
            return await call()
        except Exception:
            if time.time() + pause >= until:
                raise
            await asyncio.sleep(pause)


class EventTap:
    """Arrival times (wall clock) of every event, as a live subscriber sees them."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.arrivals: list[float] = []
        self.nc: Any = None

    async def start(self) -> None:
        async def quiet(_: Exception) -> None:
            pass

        self.nc = await nats.connect(
            self.url,
            name="chaos-tap",
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.2,
            error_cb=quiet,
        )
        await self.nc.subscribe(
            f"{EVENT_PREFIX}>",
            cb=self._on_event,
            pending_msgs_limit=5_000_000,
            pending_bytes_limit=1024 * 1024 * 1024,
        )
        await self.nc.flush()

    async def _on_event(self, _: Any) -> None:
        self.arrivals.append(time.time())

    async def close(self) -> None:
        if self.nc is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.nc.close(), 5)


# seq, kind ("TASK:SUCCEEDED", "TASKFLOW:FAILED", ...), when the stream stored it (epoch s)
Event = tuple[int, str, float]


def _event(msg: Any) -> Event:
    stored = msg.metadata.timestamp.timestamp()
    try:
        event = json.loads(msg.data)
        info = event["data"]
        status = info.get("taskStatus") or info.get("stageStatus") or info.get("taskflowStatus")
        return int(event["seq"]), f"{event['eventType']}:{status}", stored
    except (ValueError, KeyError, TypeError, AttributeError):
        return -1, "unreadable", stored


async def read_streams(url: str, *, timeout: float = 120) -> dict[str, list[Event]]:
    """Every flow's events (``seq`` and kind), in the order the stream keeps them, by uid."""
    nc = await nats.connect(url, name="chaos-streams")
    seqs: dict[str, list[Event]] = defaultdict(list)
    try:
        js = nc.jetstream()
        state = (await js.stream_info(EVENT_STREAM)).state
        last, stored = state.last_seq, state.messages
        sub = await js.pull_subscribe(
            f"{EVENT_PREFIX}>",
            stream=EVENT_STREAM,
            config=ConsumerConfig(
                ack_policy=AckPolicy.NONE, deliver_policy=DeliverPolicy.ALL, inactive_threshold=60.0
            ),
            pending_msgs_limit=1_000_000,
            pending_bytes_limit=1024 * 1024 * 1024,
        )
        deadline = time.monotonic() + timeout
        seen = received = 0
        while seen < last and received < stored and time.monotonic() < deadline:
            try:
                batch = await sub.fetch(5000, timeout=5)
            except TimeoutError:
                continue
            for msg in batch:
                received += 1
                seen = max(seen, msg.metadata.sequence.stream)
                seqs[msg.subject[len(EVENT_PREFIX) :]].append(_event(msg))
        if seen < last and received < stored:
            raise TimeoutError(f"read {received} of {stored} stored events in {timeout:.0f} s")
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(nc.close(), 5)
    return dict(seqs)


async def list_flows(api: Api, *, namespace: str, until: float) -> list[dict[str, Any]]:
    """Every Taskflow in ``namespace`` (one list call, retried while the API is away)."""

    async def call() -> list[dict[str, Any]]:
        result = await api.request("GET", api.flows(namespace))
        items: list[dict[str, Any]] = result["items"]
        return items

    return await retrying(call, until=until)
