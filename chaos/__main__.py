"""``make chaos`` / ``python -m chaos [--quick] [--flows N] [--kills K] ...``.

1. Brings up its own stack (etcd, kube-apiserver, nats-server, the CRD) on loopback ports,
   the recording service (``chaos.service``) and the operator, each in a process of its own.
2. Creates N seed-shaped flows (examples/configure-group.yaml; half exactlyOnce), spread over
   the fault window, while it injects, one at a time at random moments: K operator SIGKILLs
   (the operator is started again right after each), one nats-server restart (same port, same
   JetStream store), one kube-apiserver and one etcd restart (same ports, same data), and one
   nats-server pause (SIGSTOP for a few seconds, then SIGCONT).
3. Waits until every flow has ended (or the deadline), then checks every flow against the
   service's ledger and its own event stream, and prints the figures.

Figures, not pass/fail: it exits 0 whenever it could report. Writes
``<out>/chaos.{json,md}`` (``quick.*`` with ``--quick``); scratch files (stack, logs, the
ledger) go to ``<out>/tmp/`` (git-ignored). Everything listens on 127.0.0.1 only and every
process it starts is stopped at the end, on Ctrl-C too, and at the global deadline.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
NAMESPACE = "chaos"


def log(message: str) -> None:
    print(f"[chaos {time.strftime('%H:%M:%S')}] {message}", flush=True)


class Service:
    """``python -m chaos.service`` in its own process group, writing its ledger to a file."""

    def __init__(
        self, *, nats_url: str, tmp: Path, seed: int, delay_ms: tuple[int, int], idempotent: bool
    ) -> None:
        self.ledger = tmp / "ledger.jsonl"
        self.log = tmp / "service.log"
        self.argv = [
            sys.executable,
            "-m",
            "chaos.service",
            "--nats-url",
            nats_url,
            "--ledger",
            str(self.ledger),
            "--seed",
            str(seed),
            "--delay-ms",
            str(delay_ms[0]),
            str(delay_ms[1]),
            "--idempotent" if idempotent else "--no-idempotent",
        ]
        self.process: subprocess.Popen[bytes] | None = None

    async def start(self, nats_url: str, timeout: float = 30) -> None:
        import nats

        from chaos.service import PING

        with open(self.log, "ab") as out:
            self.process = subprocess.Popen(
                self.argv, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True
            )
        nc = await nats.connect(nats_url)
        try:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(f"the service exited: {self.log.read_text()[-2000:]}")
                with contextlib.suppress(Exception):
                    await nc.request(PING, b"", timeout=1)
                    return
                await asyncio.sleep(0.2)
            raise TimeoutError("the service did not start")
        finally:
            await nc.close()

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def records(self) -> list[dict[str, Any]]:
        lines: list[dict[str, Any]] = []
        if self.ledger.exists():
            for line in self.ledger.read_text().splitlines():
                with contextlib.suppress(ValueError):
                    lines.append(json.loads(line))
        return lines


class Started:
    """Every process the run started, so they can be stopped from anywhere, more than once
    (a fault restarting a server in a thread when Ctrl-C comes: again once it is done)."""

    def __init__(self) -> None:
        self.stack: Any = None
        self.service: Service | None = None
        self.operators: Any = None

    def stop(self) -> None:
        if self.operators is not None:
            self.operators.stop()
        if self.service is not None:
            self.service.stop()
        if self.stack is not None:
            self.stack.stop()


def operator_source() -> str:
    """Which operator code ran: the package's directory, and its git commit when it has one."""
    import taskflow

    where = Path(taskflow.__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(where), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(where), "status", "--porcelain", "."],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = dirty = ""
    if not commit:
        return str(where)
    return f"{where} at {commit}{' with uncommitted changes' if dirty else ''}"


async def run(args: argparse.Namespace, started_: Started) -> int:
    from bench.kube import Api

    from chaos import figures, report
    from chaos.faults import Injector, Operators, schedule
    from chaos.load import Creator, wait_terminal
    from chaos.observe import EventTap, read_streams
    from taskflow.devstack import DevStack

    started = time.time()
    deadline = started + args.deadline
    collect_s = min(60.0, max(25.0, args.deadline / 12))  # kept for reading and reporting
    min_drain_s = min(120.0, args.timeout_s * 2)
    name = "quick" if args.quick else "chaos"
    out_dir = Path(args.out)
    tmp = out_dir / "tmp" / time.strftime("%Y%m%d-%H%M%S")
    tmp.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    log(
        f"{args.flows} flows, {args.kills} operator kills, deadline {args.deadline:.0f} s; "
        f"scratch files in {tmp}"
    )
    stack = started_.stack = DevStack(tmp / "stack")
    service: Service | None = None
    operators: Operators | None = None
    tap: EventTap | None = None
    api: Api | None = None
    creating: asyncio.Task[None] | None = None
    notes: list[str] = []
    try:
        await asyncio.to_thread(stack.start)
        nats_url = stack.nats.url
        service = started_.service = Service(
            nats_url=nats_url,
            tmp=tmp,
            seed=args.seed,
            delay_ms=(args.delay_ms[0], args.delay_ms[1]),
            idempotent=args.idempotent_service,
        )
        await service.start(nats_url)
        operators = started_.operators = Operators(
            kubeconfig=stack.kubeconfig,
            nats_url=nats_url,
            tmp=tmp,
            flush_interval=args.flush_interval,
        )
        first = await asyncio.to_thread(operators.start)
        log(
            f"stack, service and operator up (operator ready "
            f"{(first.ready or 0) - first.spawned:.1f} s after spawn)"
        )
        tap = EventTap(nats_url)
        await tap.start()
        api = Api(stack.control_plane.url, stack.control_plane.workdir / "pki")
        await api.create_namespace(NAMESPACE)

        plan = schedule(
            rng=rng,
            kills=args.kills,
            nats_restart=args.nats_restart,
            apiserver_restart=args.apiserver_restart,
            etcd_restart=args.etcd_restart,
            nats_pause=args.nats_pause,
        )
        injector = Injector(
            stack=stack,
            operators=operators,
            rng=rng,
            plan=plan,
            gap_s=(args.gap_s[0], args.gap_s[1]),
            pause_s=args.pause_s,
            restart_signal=getattr(signal, f"SIG{args.restart_signal}"),
        )
        creator = Creator(
            api=api,
            namespace=NAMESPACE,
            count=args.flows,
            timeout_s=args.timeout_s,
            retry_delay_s=args.retry_delay_s,
        )
        load_start = time.time()
        faults_over = False
        guess = sum(args.gap_s) / 2 + 1.5  # seconds per fault until one is measured

        def fraction_done() -> float:
            if faults_over or not plan:
                return 1.0
            elapsed = time.time() - load_start
            cycle = injector.mean_cycle_s(load_start) or guess
            return elapsed / (elapsed + injector.remaining * cycle)

        creating = asyncio.get_running_loop().create_task(
            creator.run(fraction_done=fraction_done, spread=args.spread, until=deadline - collect_s)
        )
        log(f"faults: {len(plan)} in a random order ({', '.join(sorted(set(plan)))})")
        await injector.run(stop_at=deadline - collect_s - min_drain_s, log=log)
        faults_over = True
        if injector.remaining:
            notes.append(
                f"the deadline stopped the faults: {injector.remaining} of {len(plan)} not injected"
            )
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(
                asyncio.shield(creating), max(1.0, deadline - collect_s - time.time())
            )
        created = sum(1 for f in creator.flows if f.uid)
        log(f"faults done; {created} flows created; waiting for every flow to end")
        items = await wait_terminal(
            api, namespace=NAMESPACE, flows=creator.flows, until=deadline - collect_s, log=log
        )
        by_name = {i["metadata"]["name"]: i for i in items}
        for flow in creator.flows:
            flow.final = by_name.get(flow.name)

        # -- collect: nothing moves any more --------------------------------------------
        assert service.process is not None
        if service.process.poll() is not None:
            notes.append(
                f"the service exited on its own ({service.process.returncode}); see {service.log}"
            )
        await asyncio.to_thread(operators.stop)
        await asyncio.to_thread(service.stop)
        ledger = service.records()
        try:
            streams = await read_streams(nats_url, timeout=max(10.0, deadline - time.time()))
        except Exception as exc:
            streams = {}
            notes.append(f"the event streams could not be read: {exc}")
        flows = creator.flows
        # The evidence behind the figures, for whoever chases a finding.
        (tmp / "flows.json").write_text(json.dumps(items, separators=(",", ":")))
        (tmp / "streams.json").write_text(json.dumps(streams, separators=(",", ":")))
        result: dict[str, Any] = {
            "mode": "quick" if args.quick else "full",
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(started)),
            "machine": f"{os.cpu_count()} cores, Python {platform.python_version()}, "
            "everything on one machine",
            "settings": settings,
            "operator": operator_source(),
            "deadline_hit": time.time() >= deadline - collect_s or bool(injector.remaining),
            "outcomes": figures.outcomes(flows),
            "failures": figures.failure_reasons(flows, ledger=ledger, faults=injector.faults),
            "results": figures.results(flows, ledger=ledger, faults=injector.faults),
            "executions": figures.executions(flows, ledger=ledger),
            "events": figures.event_streams(flows, streams=streams, faults=injector.faults),
            "faults": figures.fault_figures(flows, faults=injector.faults),
            "drain": figures.drain(flows, faults=injector.faults, load_start=load_start),
            "resume": figures.resume(
                flows, runs=operators.runs, ledger=ledger, arrivals=tap.arrivals
            ),
            "create_to_first_request_s": figures.start_latency(flows, ledger=ledger),
            "operator_logs": figures.scan_logs([Path(r.log) for r in operators.runs]),
            "operator_runs": len(operators.runs),
            "create_errors": creator.errors,
            "fault_log": injector.as_json(),
            "scratch": str(tmp),
            "notes": notes,
        }
        result["elapsed_s"] = round(time.time() - started, 1)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / f"{name}.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
        text = report.markdown(result)
        (out_dir / f"{name}.md").write_text(text)
        print()
        print(text, flush=True)
        log(f"wrote {out_dir}/{name}.json and {name}.md in {result['elapsed_s']:.0f} s")
        return 0
    finally:
        if creating is not None:
            creating.cancel()
        if tap is not None:
            await tap.close()
        if api is not None:
            await api.close()
        log("stopping everything")
        started_.stop()


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m chaos",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--quick", action="store_true", help="a small run: 100 flows, 5 kills, 3 minute deadline"
    )
    parser.add_argument("--flows", type=int, help="flows to run (default 1000; quick 100)")
    parser.add_argument("--kills", type=int, help="operator SIGKILLs (default 50; quick 5)")
    parser.add_argument(
        "--seed",
        type=int,
        default=1,
        help="seeds the fault order, the pauses and the service's delays",
    )
    parser.add_argument(
        "--deadline",
        type=float,
        help="seconds after which it reports what it has and stops (default 900; quick 180)",
    )
    parser.add_argument("--out", default=str(ROOT / "chaos" / "results"))
    for fault, what in (
        ("nats-restart", "kill and restart nats-server once"),
        ("apiserver-restart", "kill and restart kube-apiserver once"),
        ("etcd-restart", "kill and restart etcd once"),
        ("nats-pause", "SIGSTOP nats-server for --pause-s, then SIGCONT"),
    ):
        parser.add_argument(
            f"--{fault}",
            action=argparse.BooleanOptionalAction,
            default=True,
            help=f"{what} (default: on)",
        )
    parser.add_argument(
        "--restart-signal",
        choices=("KILL", "TERM"),
        default="KILL",
        help="how servers are stopped before their restart (default KILL)",
    )
    parser.add_argument("--pause-s", type=float, default=4.0)
    parser.add_argument(
        "--gap-s",
        type=float,
        nargs=2,
        default=(0.2, 2.0),
        metavar=("MIN", "MAX"),
        help="random pause before each fault",
    )
    parser.add_argument(
        "--spread",
        type=float,
        default=1.0,
        help="create the flows over this fraction of the fault window (0: all at once)",
    )
    parser.add_argument(
        "--delay-ms",
        type=int,
        nargs=2,
        default=(100, 3000),
        metavar=("MIN", "MAX"),
        help="the service's random delay",
    )
    parser.add_argument(
        "--timeout-s", type=float, help="every task's timeout (default 30; quick 15)"
    )
    parser.add_argument(
        "--idempotent-service",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the service declares idempotent replies (Services API metadata "
        "taskflow.dev/idempotent), so the operator may ask it again "
        "(default: on)",
    )
    parser.add_argument("--retry-delay-s", type=float, default=1.0)
    parser.add_argument(
        "--flush-interval", type=float, default=1.0, help="the operator's --flush-interval"
    )
    args = parser.parse_args(argv)
    quick = args.quick
    for key, full, small in (
        ("flows", 1000, 100),
        ("kills", 50, 5),
        ("deadline", 900.0, 180.0),
        ("timeout_s", 30.0, 15.0),
    ):
        if getattr(args, key) is None:
            setattr(args, key, small if quick else full)
    return args


def main() -> int:
    args = parse()
    os.chdir(ROOT)
    loop = asyncio.new_event_loop()
    started = Started()
    task = loop.create_task(run(args, started))
    for sig in (signal.SIGINT, signal.SIGTERM):  # Ctrl-C: the finally above stops everything
        loop.add_signal_handler(sig, task.cancel)
    # Every phase keeps to the deadline; should one hang anyway, stop everything a minute on.
    loop.call_later(args.deadline + 60, task.cancel)
    try:
        return loop.run_until_complete(task)
    except asyncio.CancelledError:
        log("interrupted; everything it started is stopped")
        return 130
    finally:
        loop.run_until_complete(loop.shutdown_default_executor())
        loop.close()
        started.stop()  # what a thread (re)started while the run was being stopped


if __name__ == "__main__":
    sys.exit(main())
