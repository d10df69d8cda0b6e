"""The benchmark's outputs: a markdown table (also printed), the JSON, and a PNG plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _p(d: dict[str, Any] | None) -> str:
    if not d or d.get("p50") is None:
        return "-"
    return f"{d['p50']:g} / {d['p95']:g} / {d['p99']:g}"


def _f(value: Any, fmt: str = "g") -> str:
    return "-" if value is None else format(value, fmt)


def load_table(phases: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| phase | offered flows/s | flows/s | tasks/s | status writes/flow | "
        "create→first dispatch ms p50/p95/p99 | dispatch→recorded ms p50/p95/p99 | "
        "stage transition ms p50/p95/p99 | operator CPU s/1k tasks | operator peak RSS MB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in phases:
        offered = (
            _f(p["offered_flows_per_s"])
            if p["mode"] == "open"
            else f"closed, {p['concurrency']} in flight"
        )
        lines.append(
            f"| {p['label']} | {offered} | {_f(p['flows_per_s'])} | {_f(p['tasks_per_s'])} | "
            f"{_f(p['status_writes_per_flow'])} | {_p(p['create_to_first_dispatch_ms'])} | "
            f"{_p(p['dispatch_to_recorded_ms'])} | {_p(p['stage_transition_ms'])} | "
            f"{_f(p['operator_cpu_s_per_1000_tasks'])} | {_f(p['operator_peak_rss_mb'])} |"
        )
    return lines


def markdown(result: dict[str, Any]) -> str:
    c = result["ceilings"]
    out = [
        f"# Taskflow operator benchmark ({result['mode']} run)",
        "",
        f"{result['started']}; {result['machine']}; flush interval "
        f"{result['flush_interval_s']} s; {result['elapsed_s']:.0f} s in all.",
        "",
        "## Ceilings (same run, same servers)",
        "",
        "| ceiling | rate/s | detail |",
        "|---|---|---|",
        f"| raw status writes (PUT /status, optimistic concurrency) | "
        f"{c['status_writes']['rate']} | {c['status_writes']['status_bytes']} B status, "
        f"{c['status_writes']['concurrency']} in flight over "
        f"{c['status_writes']['objects']} objects, p50 {c['status_writes']['p50_ms']} ms; "
        f"cores used: {c['status_writes'].get('cores_by_process')} |",
        f"| raw NATS request-reply | {c['nats']['rate']} | "
        f"{c['nats']['request_bytes']} B request (params + headers), "
        f"{c['nats']['concurrency']} in flight |",
        "",
        "## Load",
        "",
        "Latencies in milliseconds; status writes counted by the apiserver "
        "(`apiserver_request_total`, taskflows/status).",
        "",
    ]
    out += load_table(result["phases"])
    wide = result.get("wide") or []
    if wide:
        out += [
            "",
            "## Wide stages (one flow at a time)",
            "",
            "| tasks in the stage | status writes for the flow | stage duration s | "
            "operator CPU s |",
            "|---|---|---|---|",
        ]
        for w in wide:
            out.append(
                f"| {w['width']} | {w['status_writes']:g} | {w['seconds']} | "
                f"{w['operator_cpu_s']} |"
            )
    scale = result.get("scale")
    if scale:
        out += ["", "## Scale: concurrently active flows", "", "| figure | value |", "|---|---|"]
        for key, label in (
            ("active_flows", "flows active at once (replies held by a slow service)"),
            ("create_seconds", "seconds to create them"),
            ("start_seconds", "seconds until every one had its first dispatch"),
            ("status_writes_per_start", "status writes per flow started"),
            ("rss_idle_mb", "operator RSS before, MB"),
            ("rss_active_mb", "operator RSS with all active, MB"),
            ("rss_per_flow_kb", "RSS per active flow, KB"),
            ("rss_budget_mb", "budget 150 MB + 20 KB per active flow, MB"),
            ("probe_create_to_first_dispatch_ms", "new flows meanwhile: create→first dispatch"),
            ("probe_end_to_end_ms", "new flows meanwhile: create→done"),
            ("baseline_create_to_first_dispatch_ms", "same, at low load without them"),
        ):
            value = scale.get(key)
            out.append(f"| {label} | {_p(value) if isinstance(value, dict) else _f(value)} |")
    out += flow_control_table(result["phases"])
    out += replica_table(result.get("replicas"))
    out += peer_table(result.get("peer"))
    out += ["", "## Targets (issue 8)", "", "| target | figure | met |", "|---|---|---|"]
    for t in result["targets"]:
        out.append(f"| {t['target']} | {t['figure']} | {'yes' if t['met'] else 'NO'} |")
    profile = result.get("profile")
    if profile:
        out += [
            "",
            "## Profile (py-spy, operator, seed flows at saturation)",
            "",
            "| function | self % | inclusive % |",
            "|---|---|---|",
        ]
        for row in profile["top"][:25]:
            out.append(f"| `{row['function']}` | {row['self_pct']} | {row['total_pct']} |")
    return "\n".join(out) + "\n"


def replica_table(rows: list[dict[str, Any]] | None) -> list[str]:
    """The seed peak with 1..N replicas in active mode."""
    if not rows:
        return []
    out = [
        "",
        "## Scale-out: the seed peak with N active replicas (12 buckets)",
        "",
        "All on this machine: the replicas share its cores with the apiserver, etcd and NATS.",
        "",
        "| replicas | tasks/s | flows/s | CPU s per replica over the phase | end to end p50 ms |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        cpu = ", ".join(_f(c) for c in row["cpu_s_by_replica"])
        e2e = (row.get("end_to_end_ms") or {}).get("p50")
        out.append(
            f"| {row['replicas']} | {row['tasks_per_s']} | {row['flows_per_s']} | {cpu} | "
            f"{_f(e2e)} |"
        )
    return out


def flow_control_table(phases: list[dict[str, Any]]) -> list[str]:
    """The seed peak with and without a ServiceLimit on its service (one that never binds)."""
    plain = next((p for p in phases if p["label"] == "seed-peak"), None)
    gated = next((p for p in phases if p["label"] == "seed-limited"), None)
    if plain is None or gated is None:
        return []

    def cpu_per_task(p: dict[str, Any]) -> float | None:
        cpu = (p.get("cpu_s_by_process") or {}).get("operator")
        done = p.get("tasks_per_s", 0) * p.get("duration_s", 0)
        return round(cpu / done * 1000, 3) if cpu and done else None

    rows = [
        ("tasks/s", plain["tasks_per_s"], gated["tasks_per_s"]),
        ("flows/s", plain["flows_per_s"], gated["flows_per_s"]),
        ("operator CPU ms per task", cpu_per_task(plain), cpu_per_task(gated)),
    ]
    out = [
        "",
        "## Flow control: the seed peak under a ServiceLimit that never binds",
        "",
        "Every attempt takes a slot (a compare-and-set in NATS KV) and gives it back.",
        "",
        "| figure | without | with the ServiceLimit | ratio |",
        "|---|---|---|---|",
    ]
    for label, a, b in rows:
        ratio = f"{b / a:.2f}" if a and b else "-"
        out.append(f"| {label} | {_f(a)} | {_f(b)} | {ratio} |")
    return out


def peer_table(peer: dict[str, Any] | None) -> list[str]:
    """Our seed-peak beside Temporal's, as ratios (ours / theirs)."""
    if not peer:
        return []
    if "error" in peer:
        return ["", "## Peer: Temporal", "", f"Not measured: {peer['error']}"]
    e, per, ratios = peer["end_to_end_ms"], peer["cpu_s_per_1000_tasks"], peer.get("ratios") or {}
    out = [
        "",
        f"## Peer: Temporal {peer['version']} (dev server, {peer['persistence']}), same flow",
        "",
        f"{peer['concurrency']} flows in flight for {peer['duration_s']} s, a Python worker "
        "(temporalio) whose activities echo their input, like our echo service.",
        "",
        "| figure | Temporal | ours / Temporal |",
        "|---|---|---|",
        f"| flows/s | {peer['flows_per_s']} | {_f(ratios.get('flows_per_s'))} |",
        f"| tasks/s | {peer['tasks_per_s']} | {_f(ratios.get('tasks_per_s'))} |",
        f"| end to end p50 ms | {e['p50']} | {_f(ratios.get('end_to_end_p50'))} |",
        f"| end to end p99 ms | {e['p99']} | {_f(ratios.get('end_to_end_p99'))} |",
        f"| CPU s per 1,000 tasks (all server-side processes) | {per['total']} | "
        f"{_f(ratios.get('cpu_per_1000_tasks'))} |",
    ]
    return out


def targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    seed = [p for p in result["phases"] if p["shape"] == "seed"]
    raw = result["ceilings"]["status_writes"]["rate"]
    out: list[dict[str, Any]] = []
    if seed:
        best = max(seed, key=lambda p: p["tasks_per_s"])
        out.append(
            {
                "target": "tasks/s ≥ 1.5 x raw status-write rate",
                "figure": f"{best['tasks_per_s']} tasks/s ({best['label']}) vs 1.5 x {raw} = "
                f"{1.5 * raw:.0f} (ratio {best['tasks_per_s'] / raw:.2f})",
                "met": best["tasks_per_s"] >= 1.5 * raw,
            }
        )
        worst = max(p["status_writes_per_flow"] or 0 for p in seed)
        out.append(
            {
                "target": "≤ 4 status writes per seed-shaped flow",
                "figure": ", ".join(f"{p['label']}: {p['status_writes_per_flow']}" for p in seed),
                "met": worst <= 4,
            }
        )
    for w in result.get("wide") or []:
        if w["width"] == 200:
            out.append(
                {
                    "target": "≤ 4 status writes for a stage of 200 tasks",
                    "figure": f"{w['status_writes']:g}",
                    "met": w["status_writes"] <= 4,
                }
            )
            break
    half = next((p for p in seed if p["label"].endswith("x0.5")), None)
    if half:
        st = half["stage_transition_ms"]
        out.append(
            {
                "target": "stage transition p50 < 10 ms and p99 < 100 ms at half of peak load",
                "figure": f"p50 {st['p50']} ms, p99 {st['p99']} ms at "
                f"{half['offered_flows_per_s']} flows/s",
                "met": st["p50"] is not None and st["p50"] < 10 and st["p99"] < 100,
            }
        )
    scale = result.get("scale")
    if scale and scale.get("rss_active_mb") is not None:
        out.append(
            {
                "target": "operator RSS < 150 MB + 20 KB per active flow",
                "figure": f"{scale['rss_active_mb']} MB with {scale['active_flows']} active "
                f"(budget {scale['rss_budget_mb']} MB)",
                "met": scale["rss_active_mb"] < scale["rss_budget_mb"],
            }
        )
    return out


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seed = [p for p in result["phases"] if p["shape"] == "seed" and p["mode"] == "open"]
    if not seed:
        return
    seed.sort(key=lambda p: p["offered_flows_per_s"])
    x = [p["offered_flows_per_s"] for p in seed]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 9), sharex=True)
    tasks = [p["tasks_per_s"] for p in seed]
    top.plot(x, tasks, "o-", label="tasks/s completed")
    top.plot(x, [xi * 11 for xi in x], "--", color="grey", label="tasks/s offered")
    raw = result["ceilings"]["status_writes"]["rate"]
    top.axhline(raw, color="tab:red", linestyle="--", label=f"raw status-write rate ({raw}/s)")
    top.axhline(1.5 * raw, color="tab:red", linestyle=":", label="target: 1.5 x raw write rate")
    peak = next((p for p in result["phases"] if p["label"] == "seed-peak"), None)
    if peak:
        top.axhline(
            peak["tasks_per_s"],
            color="tab:green",
            linestyle="-.",
            label=f"peak, closed loop ({peak['tasks_per_s']} tasks/s)",
        )
    top.set_ylabel("tasks/s")
    top2 = top.twinx()
    top2.plot(
        x,
        [p["flows_per_s"] for p in seed],
        "s",
        color="tab:orange",
        markersize=4,
        label="flows/s completed",
    )
    low, high = top.get_ylim()
    top2.set_ylim(low / 11, high / 11)  # aligned: a seed-shaped flow is 11 tasks
    top2.set_ylabel("flows/s (same curve: 11 tasks per flow)")
    lines = top.get_legend_handles_labels()
    lines2 = top2.get_legend_handles_labels()
    top.legend(lines[0] + lines2[0], lines[1] + lines2[1], fontsize=8, loc="upper left")
    top.set_title("Seed-shaped flows (1 task, then 10 in parallel): throughput")
    top.grid(alpha=0.3)
    styles = {"p50": "-", "p95": "--", "p99": ":"}
    colors = {
        "create_to_first_dispatch_ms": "tab:blue",
        "dispatch_to_recorded_ms": "tab:green",
        "stage_transition_ms": "tab:purple",
    }
    names = {
        "create_to_first_dispatch_ms": "create→first dispatch",
        "dispatch_to_recorded_ms": "dispatch→recorded",
        "stage_transition_ms": "stage transition",
    }
    for key, color in colors.items():
        for q, style in styles.items():
            ys = [p[key][q] for p in seed]
            bottom.plot(
                x, ys, style, color=color, marker="o", markersize=3, label=f"{names[key]} {q}"
            )
    bottom.axhline(10, color="grey", linewidth=0.8)
    bottom.axhline(100, color="grey", linewidth=0.8)
    bottom.set_yscale("log")
    bottom.set_ylabel("ms (log)")
    bottom.set_xlabel("offered load, flows/s")
    bottom.set_title("Latency percentiles")
    bottom.legend(fontsize=7, ncol=3)
    bottom.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
