"""The peer benchmark: the same seed-shaped flow (1 task, then 10 in parallel) on Temporal.

``run_peer(temporal=..., scratch=..., seconds=..., warmup=..., concurrency=...)`` starts
Temporal's dev server (``temporal server start-dev``, built by ``hack/build-temporal.sh``) on
free loopback ports (headless, a SQLite file in ``scratch`` in WAL mode without fsync, as our
stack's etcd runs with ``--unsafe-no-fsync``; one task-queue partition; log in
``scratch/temporal.log``), starts the
worker in its own process (``bench.peer_worker``: the workflow and its echo activities), and
drives workflows from this process with the ``temporalio`` client, measured as our driver
measures its closed-loop peak phase (``bench.driver``): a warmup phase (8 in flight, 3 s, not
kept), then ``concurrency`` in flight for ``warmup + seconds``, each ``start_workflow`` then
``result``; rates count the workflows done after the first ``warmup`` seconds, over the
phase's end (once its last workflows are done) minus that warmup; latencies and CPU cover the
whole phase, CPU per 1,000 tasks divides by every task done in it. It returns flows/s,
tasks/s (activities/s), end-to-end latency (start_workflow sent -> result received) and the
CPU seconds of the server, of the worker and of this driver.

``compare(ours, peer)`` turns one of our phases (the ``seed-peak`` phase of ``bench``) and
this result into ratios (ours / Temporal's).

``python -m bench.peer [--seconds N]`` runs it alone and prints the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench import procs
from bench.driver import percentiles

ROOT = Path(__file__).resolve().parent.parent
TASKS = 11  # activities per flow: 1, then 10 in parallel
# SQLite without fsync (WAL, synchronous=off): our stack's etcd runs with --unsafe-no-fsync.
SQLITE_PRAGMAS = {"journal_mode": "wal", "synchronous": "off"}
# One task-queue partition (the server's default is 4, for many workers): with our one worker
# it doubles the throughput here and takes a quarter less CPU per task.
DYNAMIC_CONFIG: dict[str, Any] = {
    "matching.numTaskqueueReadPartitions": 1,
    "matching.numTaskqueueWritePartitions": 1,
}
WORKFLOW = "SeedFlow"  # bench.peer_worker's names (not imported: the worker is not ours)
TASK_QUEUE = "bench"


def log(message: str) -> None:
    print(f"[peer {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def temporal_binary() -> Path:
    """Build (first time, ~5 min) or reuse the Temporal CLI; its path."""
    out = subprocess.run(
        ["bash", str(ROOT / "hack" / "build-temporal.sh")],
        check=True,
        stdout=subprocess.PIPE,
        text=True,
    ).stdout
    return Path(out.strip().splitlines()[-1])


def _tail(path: Path, n: int = 3000) -> str:
    with contextlib.suppress(OSError):
        return path.read_text(errors="replace")[-n:]
    return ""


def _stop(process: subprocess.Popen[bytes], timeout: float = 15) -> None:
    """SIGTERM the process group, then SIGKILL it if it is still there after ``timeout``."""
    from taskflow.devstack.servers import Server

    server = Server("peer", [], Path(os.devnull))
    server.process = process
    server.stop(timeout)


async def _connect(address: str, server: subprocess.Popen[bytes], log_path: Path) -> Any:
    from temporalio.client import Client

    deadline = time.monotonic() + 90
    last: Exception | None = None
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"temporal exited ({server.returncode}): {_tail(log_path)}")
        try:
            client = await Client.connect(address)
            await client.count_workflows()  # the default namespace exists and answers
            return client
        except Exception as exc:
            last = exc
            await asyncio.sleep(0.3)
    raise TimeoutError(f"the Temporal dev server did not answer on {address}: {last}")


async def _wait_worker(process: subprocess.Popen[bytes], log_path: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the peer worker exited: {_tail(log_path)}")
        if "worker ready" in _tail(log_path, 100_000):
            return
        await asyncio.sleep(0.2)
    raise TimeoutError("the peer worker did not start")


async def _closed_loop(
    client: Any, label: str, concurrency: int, duration: float, errors: list[str]
) -> list[tuple[float, float, bool]]:
    """``concurrency`` workflows in flight for ``duration`` s: (sent, done, ok) of each."""
    flows: list[tuple[float, float, bool]] = []
    stop_at = time.monotonic() + duration
    seq = 0

    async def worker() -> None:
        nonlocal seq
        while time.monotonic() < stop_at:
            seq += 1
            wf_id = f"{label}-{seq:06d}"
            t_sent = time.monotonic()
            ok = False
            try:
                handle = await client.start_workflow(
                    WORKFLOW, f"g-{seq:06d}", id=wf_id, task_queue=TASK_QUEUE
                )
                result = await asyncio.wait_for(handle.result(), 120)
                ok = len(result) == TASKS
            except Exception as exc:
                errors.append(f"{type(exc).__name__}: {exc}"[:200])
                await asyncio.sleep(0.1)
            flows.append((t_sent, time.monotonic(), ok))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return flows


def _version(binary: Path) -> str:
    with contextlib.suppress(Exception):
        out = subprocess.run(
            [str(binary), "--version"], capture_output=True, text=True, timeout=30
        ).stdout
        return out.strip()
    return "unknown"


async def run_peer(
    *,
    temporal: Path | str,
    scratch: Path | str,
    seconds: float = 20,
    warmup: float = 3,
    concurrency: int = 48,
    persist: bool = True,
    sqlite_pragmas: dict[str, str] | None = None,
    dynamic_config: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run the seed-shaped flow on Temporal; see the module's docstring. Keys of the result:
    ``peer``, ``version``, ``persistence``, ``dynamic_config``, ``concurrency``,
    ``duration_s``, ``warmup_s``, ``flows_created``, ``flows_completed``, ``flows_succeeded``,
    ``flows_failed``, ``flows_per_s``,
    ``tasks_per_s``, ``end_to_end_ms`` ({p50, p95, p99, n}), ``cpu_s`` (by process:
    ``temporal-server``, ``peer-worker``, ``driver``, and ``machine`` for the whole machine),
    ``cores`` (the same per second), ``cpu_s_per_1000_tasks`` (``temporal-server``,
    ``peer-worker``, and ``total``: server + worker), ``peak_rss_mb`` (server, worker),
    ``errors`` (the first 20)."""
    from temporalio.client import Client

    from taskflow.devstack.servers import free_port

    binary = Path(temporal)
    scratch = Path(scratch)
    scratch.mkdir(parents=True, exist_ok=True)
    port, http_port, metrics_port = free_port(), free_port(), free_port()
    address = f"127.0.0.1:{port}"
    argv = [
        str(binary),
        "server",
        "start-dev",
        "--ip",
        "127.0.0.1",
        "--port",
        str(port),
        "--http-port",
        str(http_port),
        "--metrics-port",
        str(metrics_port),
        "--headless",
        "--log-format",
        "json",
        "--log-level",
        "warn",
    ]
    pragmas = SQLITE_PRAGMAS if sqlite_pragmas is None else sqlite_pragmas
    if persist:
        db = scratch / "temporal.db"
        for stale in scratch.glob("temporal.db*"):
            stale.unlink()
        argv += ["--db-filename", str(db)]
        for key, value in pragmas.items():
            argv += ["--sqlite-pragma", f"{key}={value}"]
    dynamic = DYNAMIC_CONFIG | (dynamic_config or {})
    for key, value in dynamic.items():
        argv += ["--dynamic-config-value", f"{key}={json.dumps(value)}"]
    server_log = scratch / "temporal.log"
    worker_log = scratch / "peer-worker.log"
    errors: list[str] = []
    server: subprocess.Popen[bytes] | None = None
    worker: subprocess.Popen[bytes] | None = None
    client: Client | None = None
    try:
        with open(server_log, "ab") as out:
            server = subprocess.Popen(
                argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        client = await _connect(address, server, server_log)
        log(f"temporal dev server up on {address} (pid {server.pid})")
        with open(worker_log, "ab") as out:
            worker = subprocess.Popen(
                [sys.executable, "-m", "bench.peer_worker", "--address", address],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=ROOT,
                start_new_session=True,
            )
        await _wait_worker(worker, worker_log)
        log(f"peer worker up (pid {worker.pid}); warmup: 8 in flight for 3 s")
        pids = {"temporal-server": server.pid, "peer-worker": worker.pid, "driver": os.getpid()}
        await _closed_loop(client, "warmup", 8, 3, errors)
        log(f"closed loop: {concurrency} in flight for {warmup:g} + {seconds:g} s")
        cpu0 = procs.snapshot(pids) | {"machine": procs.machine_busy_seconds()}
        t0 = time.monotonic()
        flows = await _closed_loop(client, "seed", concurrency, warmup + seconds, errors)
        t1 = time.monotonic()  # the loop returns once its last workflows are done
        cpu1 = procs.snapshot(pids) | {"machine": procs.machine_busy_seconds()}
        rss = {
            name: round(procs.memory_kb(pid).get("VmHWM", 0) / 1024, 1)
            for name, pid in pids.items()
            if name != "driver"
        }
    finally:
        if worker is not None:
            await asyncio.to_thread(_stop, worker)
        if server is not None:
            await asyncio.to_thread(_stop, server)

    done = [f for f in flows if f[2]]
    window = max(0.001, t1 - t0 - warmup)
    in_window = [f for f in done if f[1] >= t0 + warmup]
    cpu = {k: round(cpu1[k] - cpu0[k], 2) for k in cpu1}
    completed_tasks = len(done) * TASKS

    def per_1k(value: float) -> float | None:
        return round(value / completed_tasks * 1000, 3) if completed_tasks else None

    return {
        "peer": "temporal",
        "version": _version(binary),
        "persistence": (
            "sqlite file" + "".join(f", {k}={v}" for k, v in pragmas.items())
            if persist
            else "in memory"
        ),
        "dynamic_config": dynamic,
        "concurrency": concurrency,
        "duration_s": round(t1 - t0, 2),
        "warmup_s": warmup,
        "flows_created": len(flows),
        "flows_completed": len(done),
        "flows_succeeded": len(done),
        "flows_failed": len(flows) - len(done),
        "flows_per_s": round(len(in_window) / window, 2),
        "tasks_per_s": round(len(in_window) * TASKS / window, 1),
        "end_to_end_ms": percentiles([f[1] - f[0] for f in done]),
        "cpu_s": cpu,
        "cores": {k: round(v / max(0.001, t1 - t0), 2) for k, v in cpu.items()},
        "cpu_s_per_1000_tasks": {
            "temporal-server": per_1k(cpu["temporal-server"]),
            "peer-worker": per_1k(cpu["peer-worker"]),
            "total": per_1k(cpu["temporal-server"] + cpu["peer-worker"]),
        },
        "peak_rss_mb": rss,
        "errors": errors[:20],
    }


def compare(ours: dict[str, Any], peer: dict[str, Any]) -> dict[str, Any]:
    """Ratios ours / Temporal's, from one of our phases (``bench``'s ``seed-peak``: the keys
    ``flows_per_s``, ``tasks_per_s``, ``end_to_end_ms``, ``cpu_s_by_process``,
    ``flows_completed``) and ``run_peer``'s result. Our side's CPU is every process of the
    stack but the driver (operator, kube-apiserver, etcd, nats-server, echo); Temporal's is
    the server and the worker. Above 1 for rates: we are faster; above 1 for latency and CPU:
    we take more."""

    def ratio(a: float | None, b: float | None) -> float | None:
        return round(a / b, 2) if a is not None and b else None

    by_process = ours.get("cpu_s_by_process") or {}
    our_cpu = sum(v for k, v in by_process.items() if k not in ("driver", "machine"))
    our_tasks = (ours.get("flows_completed") or 0) * TASKS
    our_per_1k = our_cpu / our_tasks * 1000 if our_tasks else None
    e_ours, e_peer = ours.get("end_to_end_ms") or {}, peer["end_to_end_ms"]
    return {
        "flows_per_s": ratio(ours.get("flows_per_s"), peer["flows_per_s"]),
        "tasks_per_s": ratio(ours.get("tasks_per_s"), peer["tasks_per_s"]),
        "end_to_end_p50": ratio(e_ours.get("p50"), e_peer.get("p50")),
        "end_to_end_p99": ratio(e_ours.get("p99"), e_peer.get("p99")),
        "cpu_per_1000_tasks": ratio(our_per_1k, peer["cpu_s_per_1000_tasks"]["total"]),
        "our_cpu_s_per_1000_tasks": round(our_per_1k, 3) if our_per_1k is not None else None,
        "peer_cpu_s_per_1000_tasks": peer["cpu_s_per_1000_tasks"]["total"],
    }


def summary(r: dict[str, Any]) -> str:
    e = r["end_to_end_ms"]
    per = r["cpu_s_per_1000_tasks"]
    return (
        f"temporal ({r['version']}, {r['persistence']}), {r['concurrency']} in flight: "
        f"{r['flows_per_s']} flows/s, {r['tasks_per_s']} tasks/s, end to end p50/p99 "
        f"{e['p50']}/{e['p99']} ms; CPU s/1k tasks: server {per['temporal-server']}, "
        f"worker {per['peer-worker']}, total {per['total']}; cores {r['cores']}; "
        f"completed {r['flows_completed']}/{r['flows_created']}, errors {len(r['errors'])}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.peer", description=__doc__)
    parser.add_argument("--seconds", type=float, default=20, help="measured, after the warmup")
    parser.add_argument("--warmup", type=float, default=3, help="start of the phase not counted")
    parser.add_argument("--concurrency", type=int, default=48, help="workflows in flight")
    parser.add_argument("--temporal", help="the temporal binary (default: build or reuse it)")
    parser.add_argument("--scratch", help="scratch dir (default: bench/results/tmp/peer-*)")
    parser.add_argument("--memory", action="store_true", help="in-memory store, no SQLite file")
    parser.add_argument(
        "--sqlite-pragma",
        action="append",
        default=[],
        help="KEY=VALUE for start-dev, instead of journal_mode=wal, synchronous=off",
    )
    parser.add_argument(
        "--dynamic-config",
        action="append",
        default=[],
        help="KEY=JSON for start-dev (added to the defaults, DYNAMIC_CONFIG)",
    )
    parser.add_argument("--json", action="store_true", help="print the whole result as JSON")
    args = parser.parse_args()
    binary = Path(args.temporal) if args.temporal else temporal_binary()
    scratch = Path(
        args.scratch
        or ROOT / "bench" / "results" / "tmp" / f"peer-{time.strftime('%Y%m%d-%H%M%S')}"
    )
    result = asyncio.run(
        run_peer(
            temporal=binary,
            scratch=scratch,
            seconds=args.seconds,
            warmup=args.warmup,
            concurrency=args.concurrency,
            persist=not args.memory,
            sqlite_pragmas=dict(p.split("=", 1) for p in args.sqlite_pragma) or None,
            dynamic_config={
                k: json.loads(v) for k, v in (d.split("=", 1) for d in args.dynamic_config)
            },
        )
    )
    print(json.dumps(result, indent=1) if args.json else summary(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
