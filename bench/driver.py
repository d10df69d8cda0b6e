"""The load driver: creates flows at an offered rate (open loop) or keeps N in flight (closed
loop), follows them on their event subjects, and turns the phase's records into figures.

Where each time comes from (all ``time.monotonic()``, one clock for every process here):
- created: the driver, just before it sends the create request to the apiserver;
- dispatched / replied: the echo service, when a request arrives and when it answers;
- recorded: the driver, when the task's final event (published by the operator once the
  flow's writer has applied the reply) arrives;
- done: the driver, when the flow's final TASKFLOW event arrives (sent after the status
  write that records the final phase).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
import urllib.request
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats

from bench import procs
from bench.flows import body
from bench.kube import Api, delta, status_writes

FINAL = {"SUCCEEDED", "FAILED", "CANCELLED", "COMPLETED_WITH_FAILURES"}
TASK_FINAL = {"SUCCEEDED", "FAILED", "TIMED_OUT", "CANCELLED", "SKIPPED"}


@dataclass
class Flow:
    name: str
    phase: str
    tasks: int
    t_sent: float = 0.0
    t_created: float = 0.0
    t_done: float = 0.0
    uid: str = ""
    outcome: str = ""
    future: asyncio.Future[None] | None = field(default=None, repr=False)


def percentiles(values: list[float], qs: tuple[float, ...] = (50, 95, 99)) -> dict[str, Any]:
    """Nearest-rank percentiles in milliseconds (values in seconds)."""
    if not values:
        return {f"p{int(q)}": None for q in qs} | {"n": 0}
    ordered = sorted(values)
    out: dict[str, Any] = {}
    for q in qs:
        rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
        out[f"p{int(q)}"] = round(ordered[rank] * 1000, 2)
    out["n"] = len(ordered)
    return out


def operator_metrics(port: int) -> dict[str, float]:
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
    except OSError:
        return {}
    out: dict[str, float] = {}
    for line in text.decode().splitlines():
        if line.startswith("taskflow_") and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            with contextlib.suppress(ValueError):
                out[key] = float(value)
    return out


class Driver:
    def __init__(
        self,
        *,
        api: Api,
        nats_url: str,
        namespace: str,
        tmp: Path,
        operator_pid: int,
        operator_metrics_port: int,
        pids: dict[str, int],
    ) -> None:
        self.api = api
        self.nats_url = nats_url
        self.namespace = namespace
        self.tmp = tmp
        self.operator_pid = operator_pid
        self.metrics_port = operator_metrics_port
        self.pids = pids
        self.flows: dict[str, Flow] = {}
        self.task_done: dict[tuple[str, str, str], float] = {}
        self.create_errors: list[str] = []
        self.background: set[asyncio.Task[Any]] = set()
        self.sampler = procs.Sampler(operator_pid)
        self.nc: Any = None
        self.seq = 0

    async def start(self) -> None:
        self.nc = await nats.connect(
            self.nats_url, name="bench-driver", pending_size=64 * 1024 * 1024
        )
        await self.nc.subscribe(
            "taskflow.events.>",
            cb=self.on_event,
            pending_msgs_limit=5_000_000,
            pending_bytes_limit=2 * 1024 * 1024 * 1024,
        )
        await self.nc.flush()
        self.sampler.start()

    async def close(self) -> None:
        self.sampler.stop()
        if self.nc is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.nc.close(), 5)

    # -- events ------------------------------------------------------------------------------

    async def on_event(self, msg: Any) -> None:
        now = time.monotonic()
        data = msg.data
        if b'"eventType":"STAGE"' in data:
            return
        event = json.loads(data)
        info = event["data"]
        if event["eventType"] == "TASK":
            if info.get("taskStatus") in TASK_FINAL:
                key = (info["taskflowId"], info["stageName"], info["taskName"])
                self.task_done.setdefault(key, now)
            return
        status = info.get("taskflowStatus")
        if status not in FINAL:
            return
        flow = self.flows.get(info["taskflowObject"]["name"])
        if flow is None or flow.t_done:
            return
        flow.t_done = now
        flow.outcome = status
        flow.uid = flow.uid or info["taskflowId"]
        if flow.future is not None and not flow.future.done():
            flow.future.set_result(None)

    # -- creating flows ----------------------------------------------------------------------

    def new_flow(self, phase: str, tasks: int) -> Flow:
        self.seq += 1
        flow = Flow(
            name=f"{phase}-{self.seq:06d}",
            phase=phase,
            tasks=tasks,
            future=asyncio.get_running_loop().create_future(),
        )
        self.flows[flow.name] = flow
        return flow

    async def create(self, flow: Flow, spec: dict[str, Any]) -> None:
        payload = body(flow.name, spec)
        flow.t_sent = time.monotonic()
        try:
            created = await self.api.create_flow(self.namespace, payload)
        except Exception as exc:
            self.create_errors.append(str(exc)[:200])
            flow.outcome = "CREATE_FAILED"
            if flow.future is not None and not flow.future.done():
                flow.future.set_result(None)
            return
        flow.t_created = time.monotonic()
        flow.uid = created["metadata"]["uid"]

    def spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    async def offer_open(
        self,
        phase: str,
        make: Callable[[int], dict[str, Any]],
        tasks: int,
        rate: float,
        duration: float,
    ) -> list[Flow]:
        """Create ``rate`` flows per second for ``duration`` seconds, whatever happens to them."""
        flows: list[Flow] = []
        t0 = time.monotonic()
        i = 0
        while True:
            due = t0 + i / rate
            if due - t0 >= duration:
                break
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            flow = self.new_flow(phase, tasks)
            flows.append(flow)
            self.spawn(self.create(flow, make(self.seq)))
            i += 1
        return flows

    async def offer_closed(
        self,
        phase: str,
        make: Callable[[int], dict[str, Any]],
        tasks: int,
        concurrency: int,
        duration: float,
    ) -> list[Flow]:
        """Keep ``concurrency`` flows in flight for ``duration`` seconds."""
        flows: list[Flow] = []
        stop_at = time.monotonic() + duration

        async def worker() -> None:
            while time.monotonic() < stop_at:
                flow = self.new_flow(phase, tasks)
                flows.append(flow)
                await self.create(flow, make(self.seq))
                assert flow.future is not None
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(flow.future), 120)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return flows

    async def drain(self, flows: list[Flow], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(f.outcome for f in flows):
                return True
            await asyncio.sleep(0.1)
        return False

    # -- the echo service's records ----------------------------------------------------------

    async def echo_records(self, label: str) -> list[list[Any]]:
        path = self.tmp / f"echo-{label}.json"
        await self.nc.request(
            "bench.ctl.dump", json.dumps({"path": str(path)}).encode(), timeout=60
        )
        records: list[list[Any]] = json.loads(path.read_text())
        path.unlink()
        return records

    async def echo_stats(self) -> dict[str, Any]:
        reply = await self.nc.request("bench.ctl.stats", b"", timeout=10)
        result: dict[str, Any] = json.loads(reply.data)
        return result

    # -- snapshots ---------------------------------------------------------------------------

    async def snapshot(self) -> dict[str, Any]:
        return {
            "t": time.monotonic(),
            "api": await self.api.metrics(),
            "cpu": procs.snapshot({"operator": self.operator_pid, **self.pids})
            | {"machine": procs.machine_busy_seconds()},
            "operator": await asyncio.to_thread(operator_metrics, self.metrics_port),
        }

    def compare(self, before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
        api = delta(after["api"], before["api"])
        cpu = {k: round(after["cpu"][k] - before["cpu"].get(k, 0.0), 2) for k in after["cpu"]}
        op_b, op_a = before["operator"], after["operator"]

        def op(key: str) -> float:
            return op_a.get(key, 0.0) - op_b.get(key, 0.0)

        return {
            "seconds": after["t"] - before["t"],
            "status_writes": status_writes(api),
            "status_conflicts": api.get("status", {}).get("code_409", 0.0),
            "api_requests": api,
            "cpu": cpu,
            "operator_status_writes": op("taskflow_status_writes_total"),
            "operator_dispatches": op("taskflow_dispatches_total"),
        }

    # -- one load phase ----------------------------------------------------------------------

    async def phase(
        self,
        label: str,
        shape: str,
        make: Callable[[int], dict[str, Any]],
        *,
        tasks: int,
        stages: list[str],
        rate: float | None = None,
        concurrency: int | None = None,
        duration: float,
        warmup: float,
        drain_timeout: float = 60.0,
    ) -> dict[str, Any]:
        await self.echo_records(f"{label}-before")  # start a fresh record
        before = await self.snapshot()
        self.sampler.reset()
        t0 = time.monotonic()
        if rate is not None:
            flows = await self.offer_open(label, make, tasks, rate, duration)
        else:
            assert concurrency is not None
            flows = await self.offer_closed(label, make, tasks, concurrency, duration)
        t1 = time.monotonic()
        drained = await self.drain(flows, drain_timeout)
        after = await self.snapshot()
        records = await self.echo_records(label)
        usage = self.compare(before, after)
        return self.figures(
            label=label,
            shape=shape,
            flows=flows,
            records=records,
            usage=usage,
            tasks=tasks,
            stages=stages,
            rate=rate,
            concurrency=concurrency,
            t0=t0,
            t1=t1,
            warmup=warmup,
            drained=drained,
        )

    def figures(
        self,
        *,
        label: str,
        shape: str,
        flows: list[Flow],
        records: list[list[Any]],
        usage: dict[str, Any],
        tasks: int,
        stages: list[str],
        rate: float | None,
        concurrency: int | None,
        t0: float,
        t1: float,
        warmup: float,
        drained: bool,
    ) -> dict[str, Any]:
        done = [f for f in flows if f.t_done]
        window = max(0.001, t1 - t0 - warmup)
        in_window = [f for f in done if t0 + warmup <= f.t_done <= t1]
        succeeded = sum(1 for f in done if f.outcome == "SUCCEEDED")
        by_uid: dict[str, dict[str, list[list[Any]]]] = defaultdict(lambda: defaultdict(list))
        for row in records:
            by_uid[row[0]][row[1]].append(row)
        create_to_dispatch: list[float] = []
        stage_transition: list[float] = []
        for flow in flows:
            per_stage = by_uid.get(flow.uid)
            if not per_stage or not flow.t_sent:
                continue
            first = min(r[4] for rows in per_stage.values() for r in rows)
            create_to_dispatch.append(first - flow.t_sent)
            for prev, nxt in itertools.pairwise(stages):
                if per_stage.get(prev) and per_stage.get(nxt):
                    last_reply = max(r[5] for r in per_stage[prev])
                    first_next = min(r[4] for r in per_stage[nxt])
                    stage_transition.append(first_next - last_reply)
        dispatch_to_recorded = [
            self.task_done[(r[0], r[1], r[2])] - r[4]
            for r in records
            if (r[0], r[1], r[2]) in self.task_done and r[3] == 0
        ]
        end_to_end = [f.t_done - f.t_sent for f in done]
        completed_tasks = len(done) * tasks
        cpu = usage["cpu"]["operator"]
        writes = usage["status_writes"]
        result = {
            "label": label,
            "shape": shape,
            "mode": "open" if rate is not None else "closed",
            "offered_flows_per_s": round(rate, 2) if rate is not None else None,
            "concurrency": concurrency,
            "duration_s": round(t1 - t0, 2),
            "flows_created": len(flows),
            "flows_completed": len(done),
            "flows_succeeded": succeeded,
            "drained": drained,
            "flows_per_s": round(len(in_window) / window, 2),
            "tasks_per_s": round(len(in_window) * tasks / window, 1),
            "status_writes": writes,
            "status_writes_per_flow": round(writes / len(done), 2) if done else None,
            "status_conflicts": usage["status_conflicts"],
            "create_to_first_dispatch_ms": percentiles(create_to_dispatch),
            "dispatch_to_recorded_ms": percentiles(dispatch_to_recorded),
            "stage_transition_ms": percentiles(stage_transition),
            "end_to_end_ms": percentiles(end_to_end),
            "operator_cpu_s": cpu,
            "operator_cpu_s_per_1000_tasks": (
                round(cpu / completed_tasks * 1000, 3) if completed_tasks else None
            ),
            "operator_peak_rss_mb": round(self.sampler.peak_kb / 1024, 1),
            "cpu_s_by_process": usage["cpu"],
            "api_requests": usage["api_requests"],
            "operator_status_writes": usage["operator_status_writes"],
        }
        return result
