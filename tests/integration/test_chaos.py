"""``make chaos`` in a small setting, and the figures it computes.

The run itself (``python -m chaos --quick``: 80 flows, 5 operator SIGKILLs, one restart of
nats-server, kube-apiserver and etcd each, one nats-server pause) asserts what users rely on
and what holds since the fixes of issue #12 items 5 and 6 (and a0f5b96): the run completes and
prints its table, every flow ends and succeeds (the service declares idempotent replies, so a
reply lost in a fault is asked for again), no result is lost, nothing runs twice under
``exactlyOnceTaskExecution``, and every flow's event stream is exactly 1..n with its final
event. Timings (drain, restart-to-resume) are printed, not asserted.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from chaos.faults import KILL, Fault
from chaos.figures import event_streams, executions, failure_reasons, results
from chaos.load import FlowRecord

from conftest import ROOT

UID = "0b6f1a52-6a4e-4d0e-9a53-3f1c2d4e5f60"


@pytest.mark.integration
def test_chaos_quick_run(tmp_path: Path) -> None:
    argv = [
        sys.executable,
        "-m",
        "chaos",
        "--quick",
        "--flows",
        "80",
        "--kills",
        "5",
        "--deadline",
        "170",
        "--out",
        str(tmp_path),
    ]
    run = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=240)
    print(run.stdout[-6000:])
    assert run.returncode == 0, run.stderr[-3000:]
    assert "| terminal % |" in run.stdout
    assert (tmp_path / "quick.md").read_text() in run.stdout
    result = json.loads((tmp_path / "quick.json").read_text())
    assert result["faults"]["injected"][KILL] == 5
    assert result["faults"]["injected"]["nats-restart"] == 1
    assert result["outcomes"]["all"]["flows"] == 80
    assert result["outcomes"]["all"]["terminal_pct"] == 100, result["outcomes"]
    assert result["executions"]["exactlyOnce"]["executed_more_than_once"] == 0, result[
        "executions"
    ]["exactlyOnce"]["examples"]
    assert result["outcomes"]["all"]["succeeded_pct"] == 100, result["failures"]
    assert result["results"]["lost"] == 0, result["results"]["examples"]
    events = result["events"]
    assert events["flows_checked"] == 80
    problems = {
        k: events[k]
        for k in (
            "flows_with_gaps",
            "flows_with_duplicates",
            "flows_out_of_order",
            "flows_beyond_last_event_seq",
            "flows_without_final_event",
        )
    }
    assert set(problems.values()) == {0}, (problems, events["examples"])


# -- the figures, fed by hand ------------------------------------------------------------


def _flow(
    tasks: list[dict[str, Any]],
    *,
    last_event_seq: int = 0,
    once: bool = True,
    phase: str = "SUCCEEDED",
) -> FlowRecord:
    status = {
        "phase": phase,
        "lastEventSeq": last_event_seq,
        "completionTime": "2026-12-04T03:00:00.000Z",
        "stages": [{"name": "s", "tasks": tasks}],
    }
    return FlowRecord(
        index=1, name="cg-00001", exactly_once=once, created=1.0, uid=UID, final={"status": status}
    )


def _line(task: str, attempt: int, data: Any, *, repeat: bool = False) -> dict[str, Any]:
    return {
        "key": f"{UID}/s/{task}/{attempt}",
        "received": 2.0,
        "sent": 2.1,
        "repeat": repeat,
        "data": data,
        "error": None,
    }


def test_a_response_other_than_the_final_attempts_answer_is_a_lost_result() -> None:
    flow = _flow(
        [
            {"name": "a", "status": "SUCCEEDED", "attempt": 1, "response": {"v": 2}},
            {"name": "b", "status": "SUCCEEDED", "attempt": 0, "response": {"v": 9}},
            {"name": "c", "status": "TIMED_OUT", "attempt": 0},
            {"name": "d", "status": "SUCCEEDED", "attempt": 0, "response": {"v": 4}},
        ]
    )
    ledger = [
        _line("a", 0, {"v": 1}),
        _line("a", 1, {"v": 2}),
        _line("b", 0, {"v": 3}),
        _line("c", 0, {"v": 5}),
    ]
    figures = results([flow], ledger=ledger, faults=[])
    assert (
        figures["response_differs"],
        figures["answer_not_recorded"],
        figures["succeeded_without_service_answer"],
        figures["lost"],
    ) == (1, 1, 1, 3)


def test_duplicate_executions_count_distinct_attempts_not_redeliveries() -> None:
    flow = _flow([])
    ledger = [
        _line("a", 0, 1),
        _line("a", 1, 2),
        _line("a", 2, 3),
        _line("b", 0, 1),
        _line("b", 0, 1, repeat=True),
    ]
    once = executions([flow], ledger=ledger)["exactlyOnce"]
    assert once["executed_more_than_once"] == 1
    assert once["extra_executions"] == 2
    assert once["redeliveries_same_key"] == 1
    assert executions([flow], ledger=ledger)["atLeastOnce"]["tasks_executed"] == 0


def test_every_gap_duplicate_and_missing_final_event_is_found() -> None:
    flow = _flow([], last_event_seq=6)
    events = [
        (1, "TASKFLOW:RUNNING", 1.0),
        (2, "TASK:RUNNING", 1.1),
        (2, "TASK:RUNNING", 1.2),
        (5, "TASK:SUCCEEDED", 1.3),
        (4, "STAGE:SUCCEEDED", 1.4),
    ]
    fault = Fault(kind=KILL, start=1.15, end=1.5)
    figures = event_streams([flow], streams={UID: events}, faults=[fault])
    assert figures["flows_with_gaps"] == 1 and figures["events_missing"] == 2  # 3 and 6
    assert figures["duplicate_events"] == 1
    assert figures["flows_out_of_order"] == 1
    assert figures["flows_without_final_event"] == 1
    example = figures["examples"][0]
    assert example["missing"] == "3, 6"
    assert example["gap_after"] == "event 2 stored 0.05 s after operator-kill #1 began"
    complete = [(i, "TASK:RUNNING", 1.0) for i in range(1, 6)] + [(6, "TASKFLOW:SUCCEEDED", 2.0)]
    clean = event_streams([flow], streams={UID: complete}, faults=[])
    assert (
        clean["flows_with_gaps"],
        clean["flows_with_duplicates"],
        clean["flows_without_final_event"],
    ) == (0, 0, 0)


def test_a_failed_flow_is_blamed_on_the_fault_that_lost_its_attempt() -> None:
    timed_out = {
        "status": "TIMED_OUT",
        "attempt": 0,
        "dispatchTime": "1970-01-01T00:00:02Z",
        "error": {"reason": "Timeout", "message": "no reply"},
    }
    answered = _flow([{"name": "a", **timed_out}], phase="FAILED")
    never_sent = _flow([{"name": "b", **timed_out}], phase="FAILED")
    ledger = [{**_line("a", 0, 1), "sent": 5.0}]
    # Dispatched at 2.0 and never received: lost by the kill at 3.0. Answered at 5.0, while
    # nats-server was being restarted: lost by the restart.
    faults = [
        Fault(kind=KILL, start=1.0, end=1.5),
        Fault(kind=KILL, start=3.0, end=3.5),
        Fault(kind="nats-restart", start=4.9, end=5.1),
    ]
    figures = failure_reasons([answered, never_sent], ledger=ledger, faults=faults)
    assert figures["failed_flows_by_fault"] == {"nats-restart": 1, KILL: 1}
    assert list(figures["reasons"].values()) == [1, 1]
    assert {k.rsplit("; ", 1)[1] for k in figures["reasons"]} == {
        "service answered it",
        "service never received it",
    }
