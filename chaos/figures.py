"""The figures of a chaos run, computed after the fact from four records that do not depend
on each other: the flows' final objects (API server), the service's ledger (what it received
and answered), every flow's event stream (JetStream), and the log of faults and operator runs.

Pure functions of those records (no I/O but ``scan_logs``), so tests can feed them by hand.
Each figure's meaning is in docs/reliability.md; in short:

- terminal / succeeded: the flows' final phases, per mode (exactlyOnce or at-least-once).
- results lost: a task whose final status does not carry what the service answered for its
  final attempt (a different response, a service answer that never made it, or a success the
  service never gave).
- duplicate executions: (flow, task) pairs whose service executed more than one attempt
  (distinct idempotency keys); a repeated key is a redelivery, answered from the cache.
- event streams: every flow's stored ``seq`` must be exactly 1..n, in order, n being the
  flow's ``status.lastEventSeq``, and a finished flow's stream must hold its final event.
- drain: from the end of the last fault until the last flow finished.
- restart-to-resume: from an operator's spawn (right after the previous one was killed) to
  the first request the service received or the first event published after it.
"""

from __future__ import annotations

import bisect
import datetime as dt
import itertools
import re
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from chaos.faults import KILL, Fault, Run
from chaos.load import FINAL, FlowRecord
from chaos.observe import Event

MODES = ("exactlyOnce", "atLeastOnce")
EXAMPLES = 10


def mode(flow: FlowRecord) -> str:
    return MODES[0] if flow.exactly_once else MODES[1]


def parse_time(value: str | None) -> float | None:
    if not value:
        return None
    return dt.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def status(flow: FlowRecord) -> dict[str, Any]:
    return (flow.final or {}).get("status") or {}


def phase(flow: FlowRecord) -> str:
    return str(status(flow).get("phase") or ("NOT_CREATED" if not flow.uid else "UNKNOWN"))


def completion(flow: FlowRecord) -> float | None:
    return parse_time(status(flow).get("completionTime")) if phase(flow) in FINAL else None


def spread(values: list[float]) -> dict[str, float | int | None]:
    """p50 / p95 / max (nearest rank) and count."""
    if not values:
        return {"p50": None, "p95": None, "max": None, "n": 0}
    ordered = sorted(values)

    def rank(q: float) -> float:
        return ordered[max(0, min(len(ordered) - 1, round(q * len(ordered) + 0.5) - 1))]

    return {
        "p50": round(rank(0.5), 2),
        "p95": round(rank(0.95), 2),
        "max": round(ordered[-1], 2),
        "n": len(ordered),
    }


def pct(part: int, whole: int) -> float | None:
    return round(100 * part / whole, 2) if whole else None


# -- outcomes -----------------------------------------------------------------------------


def outcomes(flows: list[FlowRecord]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, group in (("all", flows), *((m, [f for f in flows if mode(f) == m]) for m in MODES)):
        phases = Counter(phase(f) for f in group)
        terminal = sum(n for p, n in phases.items() if p in FINAL)
        out[name] = {
            "flows": len(group),
            "terminal": terminal,
            "terminal_pct": pct(terminal, len(group)),
            "succeeded": phases["SUCCEEDED"],
            "succeeded_pct": pct(phases["SUCCEEDED"], len(group)),
            "failed": phases["FAILED"],
            "phases": dict(phases),
        }
    return out


def failure_reasons(
    flows: list[FlowRecord], *, ledger: list[dict[str, Any]], faults: list[Fault]
) -> dict[str, Any]:
    """Why flows did not succeed: each unsuccessful task's status, reason and message, and
    what the service knows of its final attempt (never received it, or answered it)."""
    seen = {line["key"]: not line.get("error") for line in ledger}
    answered = {line["key"]: line["sent"] for line in ledger if not line.get("error")}
    reasons: Counter[str] = Counter()
    by_fault: Counter[str] = Counter()
    examples: list[dict[str, Any]] = []
    for flow in flows:
        if phase(flow) == "SUCCEEDED" or phase(flow) not in FINAL:
            continue
        blamed = False
        for stage in status(flow).get("stages", []):
            for task in stage.get("tasks", []):
                if task.get("status") in ("SUCCEEDED", "SKIPPED", "WAITING"):
                    continue
                error = task.get("error") or {}
                message = re.sub(
                    r"[0-9a-f]{8}-[0-9a-f-]{27}", "<uid>", str(error.get("message", ""))[:120]
                )
                key = f"{flow.uid}/{stage['name']}/{task['name']}/{task.get('attempt', 0)}"
                service = (
                    "service never received it"
                    if key not in seen
                    else "service answered it"
                    if seen[key]
                    else "service could not answer"
                )
                reason = (
                    f"{mode(flow)}: {task.get('status')} ({error.get('reason')}): "
                    f"{message}; {service}"
                )
                reasons[reason] += 1
                # What lost the attempt: the fault under way when the service answered it
                # (or the operator dispatched it, if the service never got it), else the next.
                at = answered.get(key) or parse_time(task.get("dispatchTime"))
                if not blamed:
                    by_fault[fault_at(at, faults=faults)] += 1
                    blamed = True
                if len(examples) < EXAMPLES:
                    examples.append(
                        {
                            "flow": flow.name,
                            "uid": flow.uid,
                            "mode": mode(flow),
                            "stage": stage.get("name"),
                            "task": task.get("name"),
                            "status": task.get("status"),
                            "attempt": task.get("attempt"),
                            "error": error,
                            "attempts": task.get("attempts"),
                            "lost": around(at, faults=faults),
                        }
                    )
    return {
        "reasons": dict(reasons.most_common()),
        "failed_flows_by_fault": dict(by_fault.most_common()),
        "examples": examples,
    }


def fault_at(at: float | None, *, faults: list[Fault]) -> str:
    """The kind of the fault under way at ``at``, else of the next one to begin."""
    if at is not None:
        for fault in faults:
            if at <= fault.start or at <= fault.end:
                return fault.kind
    return "no fault after it"


# -- the service's ledger ---------------------------------------------------------------


def split_key(key: str) -> tuple[str, str, str, int] | None:
    parts = key.split("/")
    if len(parts) != 4 or not parts[3].isdigit():
        return None
    return parts[0], parts[1], parts[2], int(parts[3])


def results(
    flows: list[FlowRecord], *, ledger: list[dict[str, Any]], faults: list[Fault]
) -> dict[str, Any]:
    """Final task responses against what the service answered for the final attempt."""
    answered: dict[str, Any] = {}
    delivered: set[str] = set()
    for line in ledger:
        answered.setdefault(line["key"], line["data"])
        if not line.get("error"):
            delivered.add(line["key"])
    counts: Counter[str] = Counter()
    examples: list[dict[str, Any]] = []
    checked = 0
    for flow in flows:
        if phase(flow) not in FINAL:
            continue
        for stage in status(flow).get("stages", []):
            for task in stage.get("tasks", []):
                key = f"{flow.uid}/{stage['name']}/{task['name']}/{task.get('attempt', 0)}"
                succeeded = task.get("status") == "SUCCEEDED"
                checked += succeeded or key in delivered
                if succeeded and key not in answered:
                    kind = "succeeded_without_service_answer"
                elif succeeded and task.get("response") != answered[key]:
                    kind = "response_differs"
                elif not succeeded and key in delivered:
                    kind = "answer_not_recorded"
                else:
                    continue
                counts[kind] += 1
                if len(examples) < EXAMPLES:
                    examples.append(
                        {
                            "kind": kind,
                            "flow": flow.name,
                            "mode": mode(flow),
                            "key": key,
                            "status": task.get("status"),
                            "error": task.get("error"),
                            "response": task.get("response"),
                            "service_answered": answered.get(key),
                            "dispatched": around(
                                parse_time(task.get("dispatchTime")), faults=faults
                            ),
                        }
                    )
    return {
        "tasks_checked": checked,
        "lost": sum(counts.values()),
        **{
            k: counts[k]
            for k in ("response_differs", "answer_not_recorded", "succeeded_without_service_answer")
        },
        "examples": examples,
    }


def executions(flows: list[FlowRecord], *, ledger: list[dict[str, Any]]) -> dict[str, Any]:
    """Per mode: (flow, task) pairs the service executed more than once (distinct attempt
    keys), extra executions, and redeliveries of a key it had already seen."""
    by_uid = {f.uid: f for f in flows if f.uid}
    attempts: dict[tuple[str, str, str], set[int]] = defaultdict(set)
    redeliveries: Counter[str] = Counter()
    unknown = 0
    for line in ledger:
        parsed = split_key(line["key"])
        if parsed is None or parsed[0] not in by_uid:
            unknown += 1
            continue
        uid, stage, task, attempt = parsed
        if line.get("repeat"):
            redeliveries[mode(by_uid[uid])] += 1
        else:
            attempts[(uid, stage, task)].add(attempt)
    out: dict[str, Any] = {"requests": len(ledger), "requests_of_unknown_flows": unknown}
    for m in MODES:
        pairs = {k: v for k, v in attempts.items() if mode(by_uid[k[0]]) == m}
        twice = {k: v for k, v in pairs.items() if len(v) > 1}
        out[m] = {
            "tasks_executed": len(pairs),
            "executed_more_than_once": len(twice),
            "extra_executions": sum(len(v) - 1 for v in twice.values()),
            "redeliveries_same_key": redeliveries[m],
            "examples": [
                {"flow": by_uid[k[0]].name, "key": "/".join(k), "attempts": sorted(v)}
                for k, v in list(twice.items())[:EXAMPLES]
            ],
        }
    return out


# -- event streams ---------------------------------------------------------------------


def event_streams(
    flows: list[FlowRecord], *, streams: dict[str, list[Event]], faults: list[Fault]
) -> dict[str, Any]:
    """Every created flow's stream: exactly 1..n in order, n = status.lastEventSeq."""
    counts: Counter[str] = Counter()
    missing_total = duplicate_total = 0
    examples: list[dict[str, Any]] = []
    checked = 0
    for flow in flows:
        if not flow.uid or flow.final is None:
            continue
        checked += 1
        events = streams.get(flow.uid, [])
        seqs = [s for s, _, _ in events]
        n = int(status(flow).get("lastEventSeq") or 0)
        present = set(seqs)
        top = max([n, *seqs])
        missing = [s for s in range(1, top + 1) if s not in present]
        duplicates = len(seqs) - len(present)
        disorder = sum(1 for a, b in itertools.pairwise(seqs) if b < a)
        problems = {
            "gaps": bool(missing),
            "inner_gaps": bool(missing) and missing[0] < max(seqs, default=0),
            "duplicates": duplicates > 0,
            "out_of_order": disorder > 0,
            "beyond_last_event_seq": bool(seqs) and max(seqs) > n,
            "final_event_missing": phase(flow) in FINAL
            and f"TASKFLOW:{phase(flow)}" not in {k for _, k, _ in events},
        }
        for name, bad in problems.items():
            counts[name] += bad
        missing_total += len(missing)
        duplicate_total += duplicates
        if any(problems.values()) and len(examples) < EXAMPLES:
            examples.append(
                {
                    "flow": flow.name,
                    "uid": flow.uid,
                    "mode": mode(flow),
                    "phase": phase(flow),
                    "last_event_seq": n,
                    "stored": len(seqs),
                    "missing": _ranges(missing),
                    "problems": [k for k, v in problems.items() if v],
                    "gap_after": _gap_after(events, missing=missing, faults=faults),
                    "completed": around(completion(flow), faults=faults),
                }
            )
    return {
        "flows_checked": checked,
        "events_stored": sum(len(v) for v in streams.values()),
        "flows_with_gaps": counts["gaps"],
        "events_missing": missing_total,
        "flows_with_inner_gaps": counts["inner_gaps"],
        "flows_with_duplicates": counts["duplicates"],
        "duplicate_events": duplicate_total,
        "flows_out_of_order": counts["out_of_order"],
        "flows_beyond_last_event_seq": counts["beyond_last_event_seq"],
        "flows_without_final_event": counts["final_event_missing"],
        "examples": examples,
    }


def _gap_after(events: list[Event], *, missing: list[int], faults: list[Fault]) -> str:
    """When the stream stored the last event before the first missing one."""
    if not missing:
        return ""
    before = [(s, t) for s, _, t in events if s < missing[0]]
    if not before:
        return "no event before the gap"
    seq, stored = max(before)
    return f"event {seq} stored {around(stored, faults=faults)}"


def _ranges(values: list[int]) -> str:
    """[4, 5, 6, 9] -> "4-6, 9"."""
    out: list[str] = []
    for v in values:
        if out and out[-1].split("-")[-1] == str(v - 1):
            out[-1] = f"{out[-1].split('-')[0]}-{v}"
        else:
            out.append(str(v))
    return ", ".join(out)


# -- time --------------------------------------------------------------------------------


def around(at: float | None, *, faults: list[Fault]) -> str:
    """Where ``at`` falls among the faults: "2.1 s after operator-kill #7 began"."""
    if at is None or not faults:
        return ""
    before = [(i, f) for i, f in enumerate(faults) if f.start <= at]
    if not before:
        return f"{faults[0].start - at:.1f} s before the first fault"
    i, fault = before[-1]
    return f"{at - fault.start:.2f} s after {fault.kind} #{i + 1} began"


def in_flight(flows: list[FlowRecord], *, at: float) -> int:
    """Flows created by ``at`` and not finished at ``at``."""
    count = 0
    for flow in flows:
        if flow.uid and flow.created <= at:
            done = completion(flow)
            count += done is None or done > at
    return count


def start_latency(flows: list[FlowRecord], *, ledger: list[dict[str, Any]]) -> dict[str, Any]:
    """Seconds from a flow's creation to the first request the service received for it."""
    first: dict[str, float] = {}
    for line in ledger:
        uid = line["key"].split("/")[0]
        first[uid] = min(first.get(uid, line["received"]), line["received"])
    return spread([first[f.uid] - f.created for f in flows if f.uid in first])


def fault_figures(flows: list[FlowRecord], *, faults: list[Fault]) -> dict[str, Any]:
    kills = [f for f in faults if f.kind == KILL]
    others = [f for f in faults if f.kind != KILL]
    return {
        "injected": dict(Counter(f.kind for f in faults)),
        "in_flight_at_kill": spread([float(in_flight(flows, at=f.start)) for f in kills]),
        "kill_to_ready_s": spread([f.end - f.start for f in kills]),
        "others": [
            {
                "kind": f.kind,
                "at_s_into_faults": round(f.start - faults[0].start, 1),
                "back_after_s": round(f.end - f.start, 2),
                "in_flight": in_flight(flows, at=f.start),
                "detail": f.detail,
            }
            for f in others
        ],
        "window_s": round(faults[-1].end - faults[0].start, 1) if faults else 0.0,
    }


def drain(flows: list[FlowRecord], *, faults: list[Fault], load_start: float) -> dict[str, Any]:
    last_fault = max((f.end for f in faults), default=load_start)
    ends = [completion(f) for f in flows if f.uid]
    open_ = sum(1 for e in ends if e is None)
    done = [e for e in ends if e is not None]
    return {
        "last_fault_end": last_fault,
        "flows_unfinished": open_,
        "drain_s": (round(max(0.0, max(done) - last_fault), 2) if done and not open_ else None),
    }


def resume(
    flows: list[FlowRecord], *, runs: list[Run], ledger: list[dict[str, Any]], arrivals: list[float]
) -> dict[str, Any]:
    """For every operator run after the first with flows in flight at its spawn: seconds
    from spawn to ready, and to the first request served or event published."""
    work = sorted([*(line["received"] for line in ledger), *arrivals])
    to_ready: list[float] = []
    to_work: list[float] = []
    idle = 0
    for run in runs[1:]:
        if in_flight(flows, at=run.spawned) == 0:
            continue
        if run.ready is not None:
            to_ready.append(run.ready - run.spawned)
        end = run.ended or float("inf")
        at = bisect.bisect_left(work, run.spawned)
        if at < len(work) and work[at] < end:
            to_work.append(work[at] - run.spawned)
        else:
            idle += 1
    return {
        "spawn_to_ready_s": spread(to_ready),
        "spawn_to_first_work_s": spread(to_work),
        "runs_without_work_before_killed": idle,
        "runs_ended_on_their_own": [
            r.how for r in runs if "on its own" in r.how or r.how.startswith("failed")
        ],
    }


# -- operator logs ----------------------------------------------------------------------

LOG_PATTERNS = {
    "errors": re.compile(r"\bERROR\b|Traceback"),
    "resumed_from_journal": re.compile(r"resuming from the journal"),
    "writer_failures": re.compile(r"flow writer failed"),
    "stalled": re.compile(r"Stalled"),
    "bad_replies": re.compile(r"bad reply"),
}


def scan_logs(paths: list[Path]) -> dict[str, Any]:
    """Counts of telling lines in the operator logs, and the first distinct error lines."""
    counts: Counter[str] = Counter()
    errors: dict[str, str] = {}
    for path in paths:
        try:
            lines = path.read_text(errors="replace").splitlines()
        except OSError:
            continue
        for line in lines:
            for name, pattern in LOG_PATTERNS.items():
                if pattern.search(line):
                    counts[name] += 1
                    if name == "errors" and len(errors) < EXAMPLES:
                        shape = re.sub(r"[0-9a-f-]{36}|\d+", "#", line)[-200:]
                        errors.setdefault(shape, f"{path.name}: {line[:400]}")
    return {**{k: counts[k] for k in LOG_PATTERNS}, "first_errors": list(errors.values())}
