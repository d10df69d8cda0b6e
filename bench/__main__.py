"""``make bench`` / ``python -m bench [--quick] [--profile]``.

1. Brings up its own stack (etcd, kube-apiserver, nats-server, the CRD) on free loopback ports,
   and the echo services in a separate process (``bench.echo``).
2. Measures the ceilings of the same servers before the operator starts: raw status writes
   (aiohttp, PUT /status with optimistic concurrency) and raw NATS request-reply.
3. Starts the operator (``taskflow-operator run``) as a subprocess and drives flows: 1-task
   flows, then seed-shaped flows (1 task, then 10 in parallel), first closed loop to find the
   peak, then open loop at fractions of that peak.
4. Wide stages (200 and 1,000 tasks), one flow at a time: status writes for the stage.
5. Scale: 10,000 seed-shaped flows held active by a slow service; operator RSS, and whether
   new flows still start promptly.
6. Optionally (``--profile``) samples the operator with py-spy under saturation.

Writes ``bench/results/bench.{json,md,png}`` (``quick.*`` with ``--quick``) and prints the
table. Scratch files (stack, logs) go to ``bench/results/tmp/`` (git-ignored).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Plan:
    ceiling_write_s: float
    ceiling_nats_s: float
    single_peak_s: float
    single_fractions: tuple[float, ...]
    seed_peak_s: float
    seed_fractions: tuple[float, ...]
    load_s: float
    warmup_s: float
    peak_concurrency: int
    wide: tuple[int, ...]
    wide_repeats: int
    scale_flows: int
    probe_s: float


FULL = Plan(
    ceiling_write_s=8,
    ceiling_nats_s=5,
    single_peak_s=15,
    single_fractions=(0.5,),
    seed_peak_s=20,
    seed_fractions=(0.25, 0.5, 0.75, 1.0),
    load_s=20,
    warmup_s=3,
    peak_concurrency=48,
    wide=(200, 1000),
    wide_repeats=2,
    scale_flows=10_000,
    probe_s=10,
)
QUICK = Plan(
    ceiling_write_s=4,
    ceiling_nats_s=3,
    single_peak_s=6,
    single_fractions=(0.5,),
    seed_peak_s=8,
    seed_fractions=(0.25, 0.5, 1.0),
    load_s=8,
    warmup_s=2,
    peak_concurrency=48,
    wide=(200, 1000),
    wide_repeats=1,
    scale_flows=2_000,
    probe_s=5,
)


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


class Operator:
    """``taskflow-operator run`` as a subprocess, in its own process group."""

    def __init__(
        self,
        *,
        kubeconfig: Path,
        nats_url: str,
        log_path: Path,
        flush_interval: float,
        extra: tuple[str, ...] = (),
        name: str = "operator",
    ) -> None:
        from taskflow.devstack.servers import Server, free_port

        self.port = free_port()
        self.log_path = log_path
        argv = [
            sys.executable,
            "-m",
            "taskflow.cli",
            "run",
            "--kubeconfig",
            str(kubeconfig),
            "--nats-url",
            nats_url,
            "--metrics-address",
            f"127.0.0.1:{self.port}",
            "--flush-interval",
            str(flush_interval),
            "--health-address",
            f"127.0.0.1:{free_port()}",
            *extra,
        ]
        # The same process-group handling as the stack's own servers.
        self.server = Server(name, argv, log_path)

    def start(self) -> None:
        import urllib.request

        self.server.start()
        process = self.server.process
        assert process is not None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"operator exited: {self.log_path.read_text()[-3000:]}")
            with contextlib.suppress(OSError):
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=1)
                if "watching taskflows" in self.log_path.read_text():
                    return
            time.sleep(0.2)
        raise TimeoutError("the operator did not start")

    @property
    def pid(self) -> int:
        assert self.server.pid is not None
        return self.server.pid

    def stop(self, timeout: float = 20) -> None:
        self.server.stop(timeout)


async def wait_echo(url: str, process: subprocess.Popen[bytes], timeout: float = 30) -> None:
    import nats

    nc = await nats.connect(url)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError("the echo services exited")
            with contextlib.suppress(Exception):
                await nc.request("bench.ctl.stats", b"", timeout=1)
                return
            await asyncio.sleep(0.2)
        raise TimeoutError("the echo services did not start")
    finally:
        await nc.close()


def phase_line(p: dict[str, Any]) -> str:
    offered = (
        f"{p['offered_flows_per_s']}/s offered"
        if p["mode"] == "open"
        else f"{p['concurrency']} in flight"
    )
    st = p["stage_transition_ms"]
    cd = p["create_to_first_dispatch_ms"]
    return (
        f"{p['label']}: {offered}: {p['flows_per_s']} flows/s, {p['tasks_per_s']} tasks/s, "
        f"{p['status_writes_per_flow']} writes/flow, create→dispatch p50 {cd['p50']} ms, "
        f"stage p50/p99 {st['p50']}/{st['p99']} ms, "
        f"CPU {p['operator_cpu_s_per_1000_tasks']} s/1k tasks, "
        f"RSS {p['operator_peak_rss_mb']} MB, completed {p['flows_completed']}/"
        f"{p['flows_created']}"
    )


async def run(args: argparse.Namespace) -> int:
    from bench import ceilings, procs, report
    from bench import profile as profiler
    from bench.driver import Driver
    from bench.flows import SHAPES, seed_payloads, wide_spec
    from bench.kube import Api
    from taskflow.devstack import DevStack

    plan = QUICK if args.quick else FULL
    if args.scale_flows is not None:
        plan.scale_flows = args.scale_flows
    out_dir = Path(args.out)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    tmp = out_dir / "tmp" / stamp
    tmp.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    result: dict[str, Any] = {
        "mode": "quick" if args.quick else "full",
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": f"{os.cpu_count()} cores, "
        f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB, "
        f"Python {platform.python_version()}, everything on one machine",
        "flush_interval_s": args.flush_interval,
        "phases": [],
    }
    log(f"starting the stack in {tmp}")
    stack = DevStack(tmp / "stack")
    await asyncio.to_thread(stack.start)
    echo_log = open(tmp / "echo.log", "ab")  # noqa: SIM115 (closed in the finally below)
    echo = subprocess.Popen(
        [sys.executable, "-m", "bench.echo", "--nats-url", stack.nats.url],
        stdout=echo_log,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
        start_new_session=True,
    )
    operator: Operator | None = None
    api = Api(stack.control_plane.url, stack.control_plane.workdir / "pki")
    driver: Driver | None = None
    try:
        await wait_echo(stack.nats.url, echo)
        pids = {s.name: s.pid for s in stack.control_plane.servers if s.pid}
        assert stack.nats.server is not None and stack.nats.server.pid
        pids |= {"nats-server": stack.nats.server.pid, "echo": echo.pid, "driver": os.getpid()}

        # -- ceilings, before the operator runs ------------------------------------------
        payloads = seed_payloads()
        await api.create_namespace("bench-ceiling")
        await api.create_namespace("bench")
        log("ceiling: raw status writes ...")
        cpu0 = procs.snapshot(pids) | {"machine": procs.machine_busy_seconds()}
        t_cpu = time.monotonic()
        writes = await ceilings.status_writes(
            api, "bench-ceiling", payloads["status"], duration=plan.ceiling_write_s
        )
        cpu1 = procs.snapshot(pids) | {"machine": procs.machine_busy_seconds()}
        span = time.monotonic() - t_cpu
        writes["cores_by_process"] = {k: round((cpu1[k] - cpu0[k]) / span, 2) for k in cpu1}
        log(f"ceiling: {writes['rate']} status writes/s ({writes['status_bytes']} B status)")
        log("ceiling: raw NATS request-reply ...")
        nats_c = await ceilings.nats_request_reply(
            stack.nats.url, payloads["request"], duration=plan.ceiling_nats_s
        )
        log(f"ceiling: {nats_c['rate']} NATS requests/s ({nats_c['request_bytes']} B)")
        result["ceilings"] = {"status_writes": writes, "nats": nats_c}
        await api.delete_flows("bench-ceiling")

        # -- the operator ----------------------------------------------------------------
        operator = Operator(
            kubeconfig=stack.kubeconfig,
            nats_url=stack.nats.url,
            log_path=tmp / "operator.log",
            flush_interval=args.flush_interval,
        )
        await asyncio.to_thread(operator.start)
        log(f"operator started (pid {operator.pid})")
        driver = Driver(
            api=api,
            nats_url=stack.nats.url,
            namespace="bench",
            tmp=tmp,
            operator_pid=operator.pid,
            operator_metrics_port=operator.port,
            pids=pids,
        )
        await driver.start()
        rss_start = procs.memory_kb(operator.pid).get("VmRSS", 0) / 1024

        def shape(name: str) -> tuple[Any, int, list[str]]:
            build, tasks, _ = SHAPES[name]
            stages = [s["name"] for s in build("x")["stages"]]
            return (lambda i: build(f"g-{i:06d}")), tasks, stages

        make, tasks, stages = shape("seed")
        warm = await driver.phase(
            "warmup", "seed", make, tasks=tasks, stages=stages, concurrency=8, duration=3, warmup=0
        )
        log(phase_line(warm))

        for name, peak_s, fractions in (
            ("single", plan.single_peak_s, plan.single_fractions),
            ("seed", plan.seed_peak_s, plan.seed_fractions),
        ):
            make, tasks, stages = shape(name)
            peak = await driver.phase(
                f"{name}-peak",
                name,
                make,
                tasks=tasks,
                stages=stages,
                concurrency=plan.peak_concurrency,
                duration=peak_s,
                warmup=plan.warmup_s,
            )
            log(phase_line(peak))
            result["phases"].append(peak)
            for fraction in fractions:
                rate = max(0.5, round(peak["flows_per_s"] * fraction, 1))
                p = await driver.phase(
                    f"{name}-x{fraction:g}",
                    name,
                    make,
                    tasks=tasks,
                    stages=stages,
                    rate=rate,
                    duration=plan.load_s,
                    warmup=plan.warmup_s,
                )
                log(phase_line(p))
                result["phases"].append(p)

        # -- flow control: the seed peak again, under a ServiceLimit that never binds ------
        result["phases"].append(await flow_control_phase(driver, api, plan, shape("seed")))
        log(phase_line(result["phases"][-1]))

        # -- wide stages -----------------------------------------------------------------
        result["wide"] = []
        for width in plan.wide:
            for _ in range(plan.wide_repeats):
                before = await driver.snapshot()
                flow = driver.new_flow(f"wide{width}", width)
                await driver.create(flow, wide_spec(f"w-{driver.seq:06d}", width))
                assert flow.future is not None
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(flow.future, 180)
                await asyncio.sleep(0.5)
                usage = driver.compare(before, await driver.snapshot())
                row = {
                    "width": width,
                    "outcome": flow.outcome,
                    "status_writes": usage["status_writes"],
                    "seconds": round(flow.t_done - flow.t_sent, 2) if flow.t_done else None,
                    "operator_cpu_s": usage["cpu"]["operator"],
                }
                result["wide"].append(row)
                log(f"wide stage of {width}: {row}")

        # -- optional profile --------------------------------------------------------------
        if args.profile:
            raw = tmp / "profile.raw"
            make, tasks, stages = shape("seed")
            spy = profiler.start(operator.pid, raw, plan.seed_peak_s + 2)
            if spy is None:
                log("py-spy not found: no profile")
            else:
                await asyncio.sleep(1)
                pprof = asyncio.get_running_loop().create_task(
                    api.pprof(tmp / "kube-apiserver.pprof", seconds=int(plan.seed_peak_s) - 2)
                )
                p = await driver.phase(
                    "seed-profiled",
                    "seed",
                    make,
                    tasks=tasks,
                    stages=stages,
                    concurrency=plan.peak_concurrency,
                    duration=plan.seed_peak_s,
                    warmup=plan.warmup_s,
                )
                with contextlib.suppress(Exception):
                    await pprof
                    result["apiserver_profile"] = await asyncio.to_thread(
                        profiler.go_top, tmp / "kube-apiserver.pprof"
                    )
                log(phase_line(p) + " (under py-spy)")
                await asyncio.to_thread(spy.wait, 60)
                if raw.exists():
                    result["profile"] = profiler.summarise(raw)
                    result["profile"]["phase"] = p
                    (out_dir / f"{'quick' if args.quick else 'bench'}-profile.txt").write_text(
                        "\n".join(
                            f"{r['self_pct']:5.1f} {r['total_pct']:5.1f}  {r['function']}"
                            for r in result["profile"]["top_inclusive"]
                        )
                        + "\n"
                    )

        # -- scale: many active flows ----------------------------------------------------
        if plan.scale_flows:
            result["scale"] = await scale(driver, plan, result, operator)

        result["operator_peak_rss_mb"] = round(
            procs.memory_kb(operator.pid).get("VmHWM", 0) / 1024, 1
        )
        result["operator_rss_at_start_mb"] = round(rss_start, 1)
        result["create_errors"] = driver.create_errors[:20]

        # -- scale-out: the seed peak with 1, 2 and 3 active replicas ----------------------
        if args.replicas:
            # The scale phase's flows (replies held) would be resumed by every new replica:
            # delete them first, so each replica count starts from the same empty namespace.
            await api.delete_flows("bench")
            for _ in range(240):
                left = await api.request("GET", api.flows("bench") + "?limit=1")
                if not left.get("items"):
                    break
                await asyncio.sleep(0.5)
            await asyncio.sleep(2)  # (the operator stops the deleted flows' writers)
            await asyncio.to_thread(operator.stop)
            operator = None
            result["replicas"] = await replica_phases(
                driver,
                plan,
                stack=stack,
                tmp=tmp,
                flush_interval=args.flush_interval,
                seed=shape("seed"),
                counts=tuple(range(1, args.replicas + 1)),
            )
    finally:
        if driver is not None:
            await driver.close()
        await api.close()
        if operator is not None:
            await asyncio.to_thread(operator.stop)
        echo.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            echo.wait(10)
        if echo.poll() is None:
            echo.kill()
        echo_log.close()
        log("stopping the stack")
        await asyncio.to_thread(stack.stop)

    if not args.no_peer:
        await _peer(result, plan, tmp)
    result["elapsed_s"] = round(time.monotonic() - started, 1)
    result["targets"] = report.targets(result)
    name = "quick" if args.quick else "bench"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    text = report.markdown(result)
    (out_dir / f"{name}.md").write_text(text)
    try:
        report.plot(result, out_dir / f"{name}.png")
    except ImportError:
        log("matplotlib is not installed: no plot (pip install matplotlib)")
    print()
    print(text)
    log(f"wrote {out_dir}/{name}.json, {name}.md, {name}.png in {result['elapsed_s']:.0f} s")
    return 0


async def replica_phases(
    driver: Any,
    plan: Plan,
    *,
    stack: Any,
    tmp: Path,
    flush_interval: float,
    seed: tuple[Any, int, list[str]],
    counts: tuple[int, ...],
) -> list[dict[str, Any]]:
    """The seed peak with N replicas in active mode sharing 12 buckets (docs/scale-out.md):
    tasks/s and each replica's CPU, on this one machine (so the replicas share its cores
    with the apiserver, etcd and NATS: the figures show how the work splits, not a cluster's
    scaling)."""
    make, tasks, stages = seed
    rows = []
    for n in counts:
        replicas = [
            Operator(
                kubeconfig=stack.kubeconfig,
                nats_url=stack.nats.url,
                log_path=tmp / f"replica-{n}-{i}.log",
                flush_interval=flush_interval,
                extra=("--replica-mode", "active", "--buckets", "12", "--bucket-lease", "6s"),
                name=f"replica-{i}",
            )
            for i in range(n)
        ]
        try:
            await asyncio.gather(*(asyncio.to_thread(r.start) for r in replicas))
            await asyncio.sleep(3)  # (the buckets spread over the replicas)
            saved = driver.operator_pid, dict(driver.pids)
            driver.operator_pid = replicas[0].pid
            driver.pids.update({f"replica-{i}": r.pid for i, r in enumerate(replicas[1:], 1)})
            try:
                phase = await driver.phase(
                    f"seed-peak-{n}-replicas",
                    "seed",
                    make,
                    tasks=tasks,
                    stages=stages,
                    concurrency=plan.peak_concurrency,
                    duration=plan.seed_peak_s,
                    warmup=plan.warmup_s,
                )
            finally:
                driver.operator_pid, driver.pids = saved
            log(phase_line(phase))
            cpu = phase.get("cpu_s_by_process") or {}
            per = [cpu.get("operator")] + [cpu.get(f"replica-{i}") for i in range(1, n)]
            rows.append(
                {
                    "replicas": n,
                    "tasks_per_s": phase["tasks_per_s"],
                    "flows_per_s": phase["flows_per_s"],
                    "flows_completed": phase["flows_completed"],
                    "cpu_s_by_replica": per,
                    "end_to_end_ms": phase.get("end_to_end_ms"),
                }
            )
        finally:
            for replica in replicas:
                await asyncio.to_thread(replica.stop)
    return rows


async def flow_control_phase(
    driver: Any, api: Any, plan: Plan, seed: tuple[Any, int, list[str]]
) -> dict[str, Any]:
    """What flow control costs: every attempt takes a slot of a ServiceLimit (a compare-and-set
    in NATS KV) and gives it back, with a limit far above the load, so only the cost shows."""
    from bench.flows import SERVICE

    make, tasks, stages = seed
    await api.create_service_limit("bench-limit", {"serviceId": SERVICE, "maxInFlight": 100000})
    await asyncio.sleep(1.0)  # (the operator's watch sees it)
    try:
        return await driver.phase(
            "seed-limited",
            "seed",
            make,
            tasks=tasks,
            stages=stages,
            concurrency=plan.peak_concurrency,
            duration=plan.seed_peak_s,
            warmup=plan.warmup_s,
        )
    finally:
        await api.delete_service_limit("bench-limit")


async def _peer(result: dict[str, Any], plan: Plan, tmp: Path) -> None:
    """The same seed-shaped flow on Temporal (its dev server and Python SDK), on the same
    machine in the same run, once our stack is stopped (the two never share the CPU)."""
    from bench import peer

    seed_peak = next((p for p in result["phases"] if p["label"] == "seed-peak"), None)
    try:
        binary = await asyncio.to_thread(peer.temporal_binary)
        log("peer: Temporal, the same seed-shaped flow ...")
        result["peer"] = await peer.run_peer(
            temporal=binary,
            scratch=tmp / "peer",
            seconds=plan.seed_peak_s,
            warmup=plan.warmup_s,
            concurrency=plan.peak_concurrency,
        )
    except Exception as exc:  # the peer is a comparison: its failure is reported, not fatal
        log(f"peer: not measured: {exc}")
        result["peer"] = {"error": str(exc)}
        return
    if seed_peak is not None:
        result["peer"]["ratios"] = peer.compare(seed_peak, result["peer"])
    log(peer.summary(result["peer"]))


async def scale(
    driver: Any, plan: Plan, result: dict[str, Any], operator: Operator
) -> dict[str, Any]:
    from bench.driver import percentiles
    from bench.flows import seed_spec

    n = plan.scale_flows
    log(f"scale: creating {n} seed-shaped flows whose first reply is held ...")
    rss_idle = driver.sampler.sample() / 1024
    driver.sampler.reset()
    await driver.echo_records("scale-before")
    before = await driver.snapshot()
    options = {"timeout": 1_800_000}  # 30 min: the held replies never time out here
    flows = [driver.new_flow("scale", 11) for _ in range(n)]
    queue = list(reversed(flows))
    t0 = time.monotonic()

    async def creator() -> None:
        while queue:
            flow = queue.pop()
            await driver.create(flow, seed_spec(flow.name, first_action="slow", options=options))

    await asyncio.gather(*(creator() for _ in range(32)))
    t_created = time.monotonic()
    log(f"scale: created {n} in {t_created - t0:.1f} s; waiting for every first dispatch")
    held = 0
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        held = (await driver.echo_stats())["held"]
        if held >= n:
            break
        await asyncio.sleep(0.5)
    t_started = time.monotonic()
    await asyncio.sleep(3)
    after = await driver.snapshot()
    rss_active = max(driver.sampler.peak_kb, driver.sampler.sample()) / 1024
    usage = driver.compare(before, after)
    active = after["operator"].get("taskflow_active_flows", float(held))
    log(f"scale: {held} held, {active:.0f} active; RSS {rss_idle:.0f} -> {rss_active:.0f} MB")

    # New flows while those are active: do they still start promptly?
    def seed_make(i: int) -> dict[str, Any]:
        return seed_spec(f"p-{i:06d}")

    probe = await driver.phase(
        "scale-probe",
        "seed",
        seed_make,
        tasks=11,
        stages=["createGroup", "addApplianceToGroups"],
        rate=4,
        duration=plan.probe_s,
        warmup=0,
        drain_timeout=60,
    )
    log(phase_line(probe))
    rss_active = max(rss_active, driver.sampler.peak_kb / 1024)
    baseline = next((p for p in result["phases"] if p["label"] == "seed-x0.25"), None)
    budget = 150 + 20 * n / 1024
    return {
        "active_flows": int(active),
        "held_requests": held,
        "create_seconds": round(t_created - t0, 1),
        "create_rate": round(n / (t_created - t0), 1),
        "start_seconds": round(t_started - t0, 1),
        "status_writes_per_start": round(usage["status_writes"] / max(1, held), 2),
        "operator_cpu_s_per_start": round(usage["cpu"]["operator"] / max(1, held) * 1000, 2),
        "cpu_s_by_process": usage["cpu"],
        "rss_idle_mb": round(rss_idle, 1),
        "rss_active_mb": round(rss_active, 1),
        "rss_per_flow_kb": round((rss_active - rss_idle) * 1024 / max(1, held), 1),
        "rss_budget_mb": round(budget, 1),
        "probe_create_to_first_dispatch_ms": probe["create_to_first_dispatch_ms"],
        "probe_end_to_end_ms": probe["end_to_end_ms"],
        "probe_stage_transition_ms": probe["stage_transition_ms"],
        "probe": probe,
        "baseline_create_to_first_dispatch_ms": (
            baseline["create_to_first_dispatch_ms"] if baseline else percentiles([])
        ),
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="a ~2 minute run")
    parser.add_argument(
        "--no-peer", action="store_true", help="skip the same flow on Temporal (bench/peer.py)"
    )
    parser.add_argument(
        "--replicas",
        type=int,
        default=3,
        help="the seed peak again with 1..N active replicas (0: skip)",
    )
    parser.add_argument(
        "--profile", action="store_true", help="also sample the operator with py-spy at saturation"
    )
    parser.add_argument(
        "--flush-interval",
        type=float,
        default=1.0,
        help="the operator's --flush-interval (default: its own default, 1 s)",
    )
    parser.add_argument(
        "--scale-flows", type=int, default=None, help="active flows in the scale run (0 skips it)"
    )
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = parser.parse_args()
    os.chdir(ROOT)
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
