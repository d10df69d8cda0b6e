"""The chaos run's outputs: a markdown table (also printed) and the JSON with every figure
and the examples behind them (flow names, idempotency keys), for whoever chases a finding."""

from __future__ import annotations

from typing import Any


def _f(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _s(d: dict[str, Any]) -> str:
    if not d.get("n"):
        return "-"
    return f"{_f(d['p50'])} / {_f(d['p95'])} / {_f(d['max'])} (n={d['n']})"


def markdown(result: dict[str, Any]) -> str:
    s, o = result["settings"], result["outcomes"]
    r, x, e = result["results"], result["executions"], result["events"]
    fa, d, rs = result["faults"], result["drain"], result["resume"]
    once, least = x["exactlyOnce"], x["atLeastOnce"]
    lines = [
        f"# Taskflow operator under faults ({result['mode']} run)",
        "",
        f"{result['started']}; {result['machine']}; {result['elapsed_s']:.0f} s in all"
        f"{'; stopped by the deadline' if result.get('deadline_hit') else ''}; operator code: "
        f"{result.get('operator', '?')}.",
        "",
        f"{s['flows']} seed-shaped flows (half exactlyOnce), service delay "
        f"{s['delay_ms'][0]}-{s['delay_ms'][1]} ms, task timeout {s['timeout_s']:g} s, "
        f"maxRetries 3; the service {'declares' if s['idempotent_service'] else 'does not declare'}"
        f" idempotent replies. Faults: {_faults(fa['injected'])}, over {fa['window_s']:g} s.",
        "",
        "| figure | all | exactlyOnce | at-least-once |",
        "|---|---|---|---|",
        _row("flows", o, "flows"),
        _row("terminal %", o, "terminal_pct"),
        _row("SUCCEEDED %", o, "succeeded_pct"),
        _row("FAILED (flows)", o, "failed"),
        f"| (flow, task) pairs executed more than once | "
        f"{once['executed_more_than_once'] + least['executed_more_than_once']} | "
        f"{once['executed_more_than_once']} | {least['executed_more_than_once']} |",
        f"| redeliveries of a key already served | "
        f"{once['redeliveries_same_key'] + least['redeliveries_same_key']} | "
        f"{once['redeliveries_same_key']} | {least['redeliveries_same_key']} |",
        "",
        "| figure | value |",
        "|---|---|",
        f"| results lost (tasks) | {r['lost']} of {r['tasks_checked']} checked: "
        f"{r['response_differs']} responses differ, {r['answer_not_recorded']} service "
        f"answers not recorded, {r['succeeded_without_service_answer']} successes the "
        f"service never gave |",
        f"| event streams checked (every flow) | {e['flows_checked']} flows, "
        f"{e['events_stored']} events |",
        f"| flows with gaps in seq 1..n | {e['flows_with_gaps']}"
        + (
            f" ({e['events_missing']} events missing; {e['flows_with_inner_gaps']} flows with "
            f"events stored after a gap, the others lost their last events)"
            if e["flows_with_gaps"]
            else ""
        )
        + " |",
        f"| flows with duplicate seq | {e['flows_with_duplicates']} "
        f"({e['duplicate_events']} duplicates) |",
        f"| flows out of order / beyond lastEventSeq / without final event | "
        f"{e['flows_out_of_order']} / {e['flows_beyond_last_event_seq']} / "
        f"{e['flows_without_final_event']} |",
        f"| drain after the last fault, s | {_f(d['drain_s'])}"
        f"{'' if not d['flows_unfinished'] else ' (' + str(d['flows_unfinished']) + ' flows unfinished)'} |",  # noqa: E501
        f"| restart-to-resume, s (spawn → first request or event) p50/p95/max | "
        f"{_s(rs['spawn_to_first_work_s'])} |",
        f"| operator spawn → ready, s p50/p95/max | {_s(rs['spawn_to_ready_s'])} |",
        f"| flow created → its first request, s p50/p95/max | "
        f"{_s(result['create_to_first_request_s'])} |",
        f"| kill → operator ready again, s p50/p95/max | {_s(fa['kill_to_ready_s'])} |",
        f"| flows in flight at a kill p50/p95/max | {_s(fa['in_flight_at_kill'])} |",
        f"| restarts with no work before the next kill | {rs['runs_without_work_before_killed']} |",
    ]
    for other in fa["others"]:
        lines.append(
            f"| {other['kind']} | back after {other['back_after_s']:g} s, "
            f"{other['in_flight']} flows in flight {other['detail']} |"
        )
    logs = result["operator_logs"]
    lines.append(
        f"| operator log | {logs['errors']} error lines, "
        f"{logs['resumed_from_journal']} resumes from the journal, "
        f"{logs['writer_failures']} writer failures |"
    )
    blamed = result["failures"].get("failed_flows_by_fault") or {}
    if blamed:
        lines.append(
            "| FAILED flows by the fault that lost their attempt | "
            + ", ".join(f"{n} {k}" for k, n in blamed.items())
            + " |"
        )
    reasons = result["failures"]["reasons"]
    if reasons:
        lines += [
            "",
            "Why tasks of unsuccessful flows did not succeed:",
            "",
            "| tasks | mode: status (reason): message |",
            "|---|---|",
        ]
        lines += [f"| {n} | {k.replace('|', '/')} |" for k, n in list(reasons.items())[:15]]
    if result.get("notes"):
        lines += ["", *(f"- {n}" for n in result["notes"])]
    return "\n".join(lines) + "\n"


def _row(label: str, outcomes: dict[str, Any], key: str) -> str:
    return (
        f"| {label} | {_f(outcomes['all'][key])} | {_f(outcomes['exactlyOnce'][key])} | "
        f"{_f(outcomes['atLeastOnce'][key])} |"
    )


def _faults(injected: dict[str, int]) -> str:
    return ", ".join(f"{n} x {k}" for k, n in injected.items()) or "none"
