"""The faults: the operator SIGKILLed and started again, nats-server, kube-apiserver and etcd
restarted on the same ports with the same data, nats-server paused (SIGSTOP, then SIGCONT).

Faults are injected one at a time, in a shuffled order, each after a random pause, so every
fault lands at a random moment of the flows' lives and each one's recovery can be timed. The
operator runs as ``bench``'s ``Operator`` wrapper (``taskflow-operator run`` in its own process
group), one process and one log file per run, so each run's log is evidence of its own.
"""

from __future__ import annotations

import asyncio
import random
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.__main__ import Operator

KILL, NATS_RESTART, APISERVER_RESTART, ETCD_RESTART, NATS_PAUSE = (
    "operator-kill",
    "nats-restart",
    "apiserver-restart",
    "etcd-restart",
    "nats-pause",
)


@dataclass
class Run:
    """One operator process: spawned, ready ("watching taskflows"), and how it ended."""

    index: int
    log: str
    spawned: float
    ready: float | None = None
    ended: float | None = None
    how: str = ""  # "killed", "exited <code>" (on its own), "stopped"


@dataclass
class Fault:
    kind: str
    start: float
    end: float = 0.0  # when what was faulted was back (the operator: ready again)
    detail: str = ""


@dataclass
class Operators:
    """The operator, started again after each SIGKILL (blocking calls: run them in a thread)."""

    kubeconfig: Path
    nats_url: str
    tmp: Path
    flush_interval: float = 1.0
    runs: list[Run] = field(default_factory=list)
    current: Operator | None = None

    def start(self, *, tries: int = 3) -> Run:
        for _ in range(tries):
            index = len(self.runs)
            log = self.tmp / f"operator-{index:03d}.log"
            self.current = Operator(
                kubeconfig=self.kubeconfig,
                nats_url=self.nats_url,
                log_path=log,
                flush_interval=self.flush_interval,
            )
            run = Run(index=index, log=str(log), spawned=time.time())
            self.runs.append(run)
            try:
                self.current.start()
            except (RuntimeError, TimeoutError) as exc:
                self.current.server.send_signal(signal.SIGKILL)
                run.ended, run.how = time.time(), f"failed to start: {str(exc)[-300:]}"
                continue
            run.ready = time.time()
            return run
        raise RuntimeError(f"the operator did not start in {tries} tries; see {self.tmp}")

    def kill(self) -> None:
        """SIGKILL the operator's process group (says so if it had already exited)."""
        if self.current is None:
            return
        run, process = self.runs[-1], self.current.server.process
        assert process is not None
        code = process.poll()
        if code is not None:
            run.how = f"exited {code} on its own"
        else:
            self.current.server.send_signal(signal.SIGKILL)
            process.wait(30)
            run.how = "killed"
        run.ended = run.ended or time.time()
        self.current = None

    def stop(self) -> None:
        if self.current is None:
            return
        run, process = self.runs[-1], self.current.server.process
        if process is not None and process.poll() is not None:
            run.how = f"exited {process.returncode} on its own"
        else:
            self.current.stop()
            run.how = "stopped"
        run.ended = run.ended or time.time()
        self.current = None


def schedule(
    *,
    rng: random.Random,
    kills: int,
    nats_restart: bool,
    apiserver_restart: bool,
    etcd_restart: bool,
    nats_pause: bool,
) -> list[str]:
    """Every fault once (kills ``kills`` times), in a random order."""
    plan = [KILL] * kills
    for kind, wanted in (
        (NATS_RESTART, nats_restart),
        (APISERVER_RESTART, apiserver_restart),
        (ETCD_RESTART, etcd_restart),
        (NATS_PAUSE, nats_pause),
    ):
        if wanted:
            plan.append(kind)
    rng.shuffle(plan)
    return plan


@dataclass
class Injector:
    """Injects the scheduled faults into a running stack, one after another."""

    stack: Any  # taskflow.devstack.DevStack
    operators: Operators
    rng: random.Random
    plan: list[str]
    gap_s: tuple[float, float]
    pause_s: float
    restart_signal: int = signal.SIGKILL
    faults: list[Fault] = field(default_factory=list)

    @property
    def remaining(self) -> int:
        return len(self.plan) - len(self.faults)

    def mean_cycle_s(self, started: float) -> float | None:
        """Seconds per fault so far (pause + fault + recovery), once one is done."""
        if not self.faults or not self.faults[-1].end:
            return None
        return (self.faults[-1].end - started) / len(self.faults)

    async def run(self, *, stop_at: float, log: Any) -> None:
        for kind in self.plan:
            await asyncio.sleep(self.rng.uniform(*self.gap_s))
            if time.time() >= stop_at:
                log(f"deadline: {self.remaining} faults not injected")
                return
            fault = Fault(kind=kind, start=time.time())
            self.faults.append(fault)
            await self.inject(fault)
            fault.end = time.time()
            log(
                f"{kind} {len(self.faults)}/{len(self.plan)}: back after "
                f"{fault.end - fault.start:.1f} s {fault.detail}"
            )

    async def inject(self, fault: Fault) -> None:
        sig = self.restart_signal
        if fault.kind == KILL:
            await asyncio.to_thread(self.operators.kill)
            run = await asyncio.to_thread(self.operators.start)
            assert run.ready is not None
            fault.detail = f"(run {run.index} ready {run.ready - run.spawned:.1f} s after spawn)"
        elif fault.kind == NATS_RESTART:
            await asyncio.to_thread(self.stack.nats.restart, sig=sig)
        elif fault.kind in (APISERVER_RESTART, ETCD_RESTART):
            name = "kube-apiserver" if fault.kind == APISERVER_RESTART else "etcd"
            await asyncio.to_thread(self.stack.control_plane.restart, name, sig=sig)
        elif fault.kind == NATS_PAUSE:
            server = self.stack.nats.server
            server.send_signal(signal.SIGSTOP)
            try:
                await asyncio.sleep(self.pause_s)
            finally:
                server.send_signal(signal.SIGCONT)
            fault.detail = f"(paused {self.pause_s:g} s)"
        else:
            raise ValueError(fault.kind)

    def as_json(self) -> list[dict[str, Any]]:
        return [asdict(f) for f in self.faults]
