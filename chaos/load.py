"""Creating the flows while the faults go on, and waiting for them to end.

Flows are created at a pace that spreads them over the fault window (``spread`` of it; 0
creates them all at once), so that faults keep landing on flows in flight. The window's length
is not known in advance (restarts take what they take): the pace follows the faults done so
far. Creates are retried while the API server or etcd is down; a create whose answer was lost
(409 on the retry) is looked up instead.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from bench.kube import Api, ApiError

from chaos.flows import body, exactly_once, flow_name
from chaos.observe import list_flows, retrying

FINAL = {"SUCCEEDED", "FAILED", "CANCELLED", "COMPLETED_WITH_FAILURES"}


@dataclass
class FlowRecord:
    index: int
    name: str
    exactly_once: bool
    created: float = 0.0  # wall clock, when the API server accepted it
    uid: str = ""
    create_tries: int = 0
    final: dict[str, Any] | None = None  # the object as read at the end


@dataclass
class Creator:
    api: Api
    namespace: str
    count: int
    timeout_s: float
    retry_delay_s: float
    flows: list[FlowRecord] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    async def create(self, index: int, *, until: float) -> None:
        record = FlowRecord(index=index, name=flow_name(index), exactly_once=exactly_once(index))
        self.flows.append(record)
        payload = body(index, timeout_s=self.timeout_s, retry_delay_s=self.retry_delay_s)

        async def once() -> dict[str, Any]:
            record.create_tries += 1
            try:
                return await self.api.create_flow(self.namespace, payload)
            except ApiError as exc:
                if exc.status != 409:
                    if len(self.errors) < 20:
                        self.errors.append(str(exc)[:200])
                    raise
                return await self.api.get_flow(self.namespace, record.name)
            except Exception as exc:
                if len(self.errors) < 20:
                    self.errors.append(f"{type(exc).__name__}: {str(exc)[:200]}")
                raise

        created = await retrying(once, until=until)
        record.created = time.time()
        record.uid = created["metadata"]["uid"]

    async def run(
        self,
        *,
        fraction_done: Callable[[], float],
        spread: float,
        until: float,
        concurrency: int = 8,
    ) -> None:
        """Create ``count`` flows, the i-th once ``fraction_done() >= spread * i / count``."""
        queue = list(range(self.count))
        queue.reverse()

        async def worker() -> None:
            while queue:
                due = spread * (self.count - len(queue)) / self.count
                if spread > 0 and fraction_done() < due:
                    await asyncio.sleep(0.05)
                    continue
                index = queue.pop()
                try:
                    await self.create(index, until=until)
                except Exception as exc:
                    self.errors.append(f"{flow_name(index)} not created: {exc}"[:300])

        await asyncio.gather(*(worker() for _ in range(concurrency)))


async def wait_terminal(
    api: Api, *, namespace: str, flows: list[FlowRecord], until: float, log: Any, every: float = 2.0
) -> list[dict[str, Any]]:
    """Poll the API until every created flow has a final phase (or ``until``); the last list."""
    names = {f.name for f in flows if f.uid}
    items: list[dict[str, Any]] = []
    last_line = 0.0
    while True:
        try:
            items = await list_flows(api, namespace=namespace, until=until)
        except Exception as exc:
            log(f"could not list the flows: {exc}")
        phase = {i["metadata"]["name"]: (i.get("status") or {}).get("phase") for i in items}
        open_ = [n for n in names if phase.get(n) not in FINAL]
        if not open_ or time.time() + every >= until:
            return items
        if time.monotonic() - last_line > 10:
            log(f"{len(open_)} of {len(names)} flows not finished yet")
            last_line = time.monotonic()
        await asyncio.sleep(every)
