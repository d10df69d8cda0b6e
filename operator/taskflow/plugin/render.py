"""What the plugin prints: the tree of a flow, event lines and the services table, as lines of
styled segments (``rich`` styles), so the same rendering serves a terminal and a plain pipe.

Pure: each function takes what the client returned and gives lines; ``emit`` writes them.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from taskflow.api.durations import human_ms as duration
from taskflow.api.status import WaitingReason
from taskflow.client import (
    LiveService,
)
from taskflow.client.services import Endpoint

STYLES = {
    "SUCCEEDED": "green",
    "RUNNING": "cyan",
    "WAITING": "dim",
    "PENDING": "dim",
    "SKIPPED": "dim",
    "FAILED": "bold red",
    "TIMED_OUT": "bold red",
    "CANCELLED": "magenta",
    "COMPLETED_WITH_FAILURES": "yellow",
}
Segment = tuple[str, str | None]  # text and its rich style
Line = list[Segment]


def status_segment(value: str) -> Segment:
    return value, STYLES.get(value)


def _error_text(error: Any) -> str:
    if not isinstance(error, dict):
        return ""
    code = f" [{error['code']}]" if error.get("code") else ""
    return f"error: {error.get('message', '')}{code}"


def render_tree(node: dict[str, Any]) -> list[Line]:
    """The flow as lines of styled segments, children indented under their task."""
    head: Line = [
        (f"{node['namespace']}/{node['name']}", "bold"),
        ("  ", None),
        status_segment(node["status"]),
    ]
    if node.get("progress"):
        head.append((f"  {node['progress']}", None))
    if node.get("durationMs") is not None:
        head.append((f"  {duration(node['durationMs'])}", "dim"))
    lines = [head]
    lines.extend(_flow_body(node, ""))
    return lines


def _flow_body(node: dict[str, Any], prefix: str) -> list[Line]:
    lines: list[Line] = []
    items: list[tuple[str, Any]] = [("stage", s) for s in node["stages"]]
    items += [("orphan", c) for c in node.get("children", [])]
    for i, (kind, item) in enumerate(items):
        last = i == len(items) - 1
        branch, indent = ("└── ", "    ") if last else ("├── ", "│   ")
        if kind == "orphan":
            lines.extend(_child(item, prefix + branch, prefix + indent))
            continue
        stage_line: Line = [
            (prefix + branch, "dim"),
            (f"stage {item['name']}", "bold"),
            ("  ", None),
            status_segment(item["status"]),
        ]
        if item.get("durationMs") is not None:
            stage_line.append((f"  {duration(item['durationMs'])}", "dim"))
        lines.append(stage_line)
        tasks = item["tasks"]
        for j, task in enumerate(tasks):
            tlast = j == len(tasks) - 1
            tbranch, tindent = ("└── ", "    ") if tlast else ("├── ", "│   ")
            lines.append(_task_line(task, prefix + indent + tbranch))
            children = task.get("children") or []
            for k, child in enumerate(children):
                clast = k == len(children) - 1
                cbranch, cindent = ("└── ", "    ") if clast else ("├── ", "│   ")
                base = prefix + indent + tindent
                lines.extend(_child(child, base + cbranch, base + cindent))
    return lines


def _task_line(task: dict[str, Any], lead: str) -> Line:
    line: Line = [(lead, "dim"), (task["name"], None), ("  ", None), status_segment(task["status"])]
    if task.get("type") == "TASKFLOW":
        line.append(("  (nested flow)", "dim"))
    line.append((f"  attempt {task.get('attempt', 0)}", None))
    if task.get("durationMs") is not None:
        line.append((f"  {duration(task['durationMs'])}", "dim"))
    if task.get("status") == "RUNNING" and task.get("waitingReason") == WaitingReason.CHILDREN:
        active = len(task.get("nestedActiveRunningTaskFlowIds") or [])
        line.append((f"  waiting for {active} nested flow(s)", "dim"))
    elif task.get("waitingReason") and task.get("status") in ("WAITING", "RUNNING"):
        line.append((f"  ({task['waitingReason']})", "dim"))
    error = _error_text(task.get("error"))
    if error and task.get("status") != "SUCCEEDED":
        line.append((f"  {error}", "red"))
    return line


def _child(child: dict[str, Any], lead: str, indent: str) -> list[Line]:
    line: Line = [
        (lead, "dim"),
        ("flow ", "dim"),
        (f"{child['namespace']}/{child['name']}", "bold"),
        ("  ", None),
        status_segment(child["status"]),
    ]
    if child.get("progress"):
        line.append((f"  {child['progress']}", None))
    if child.get("parentAttempt") is not None:
        line.append((f"  (attempt {child['parentAttempt']})", "dim"))
    if child.get("durationMs") is not None:
        line.append((f"  {duration(child['durationMs'])}", "dim"))
    return [line, *_flow_body(child, indent)]


def emit(lines: list[Line]) -> None:
    """Colour on a terminal (rich); plain text when piped."""
    if sys.stdout.isatty() and not os.environ.get("NO_COLOR"):
        from rich.console import Console
        from rich.text import Text

        console = Console(highlight=False, soft_wrap=True)
        for line in lines:
            console.print(Text.assemble(*((t, s or "") for t, s in line)))
        return
    for line in lines:
        print("".join(text for text, _ in line))


def event_line(event: dict[str, Any]) -> Line:
    data = event.get("data") or {}
    kind = str(event.get("eventType", "?"))
    stamp = event.get("time")
    when = (
        time.strftime("%H:%M:%S", time.localtime(stamp / 1000)) + f".{stamp % 1000:03d}"
        if isinstance(stamp, int)
        else ""
    )
    if kind == "TASK":
        what = f"{data.get('stageName', '?')}/{data.get('taskName', '?')}"
        status = str(data.get("taskStatus"))
    elif kind == "STAGE":
        what = str(data.get("stageName", "?"))
        status = str(data.get("stageStatus"))
    else:
        what = str((data.get("taskflowObject") or {}).get("name", data.get("taskflowId")))
        status = str(data.get("taskflowStatus"))
    line: Line = [
        (f"{when}  ", "dim"),
        (f"#{event.get('seq', '?'):<4} ", "dim"),
        (f"{kind:<9}", "bold"),
        (f"{what:<40} ", None),
        status_segment(status),
    ]
    if kind == "TASK":
        line.append((f"  attempt {data.get('attempt', 0)}", None))
        error = _error_text(data.get("taskError"))
        if error:
            line.append((f"  {error}", "red"))
    return line


def render_services(found: Sequence[LiveService]) -> list[Line]:
    """Each service's head line, then a table of its endpoints, a blank line between."""
    lines: list[Line] = []
    for i, service in enumerate(found):
        if i:
            lines.append([])
        lines.append(_service_head(service))
        lines.extend(_endpoint_table(service))
    return lines


def _service_head(service: LiveService) -> Line:
    count = len(service.instances)
    line: Line = [
        (service.name, "bold"),
        (f"  {', '.join(service.versions) or '?'}", None),
        (f"  {count} instance{'s' if count != 1 else ''}", "cyan"),
    ]
    idempotent = service.idempotent_instances
    if idempotent == count:
        line.append(("  idempotent", "green"))
    elif idempotent:
        line.append((f"  idempotent on {idempotent} of {count} instances", "yellow"))
    capacity = capacity_text(service)
    if capacity:
        line.append((f"  {capacity}", None))
    return line


def capacity_text(service: LiveService) -> str:
    """``capacity 8 (4 per instance)``; the instances' own figures when they differ or when
    some say none (unbounded); empty when none says."""
    declared = [c for c in (i.capacity for i in service.instances) if c is not None]
    count = len(service.instances)
    if not declared:
        return ""
    if len(declared) < count:
        return f"capacity unbounded ({len(declared)} of {count} instances declare one)"
    if len(set(declared)) == 1:
        return f"capacity {sum(declared)} ({declared[0]} per instance)"
    return f"capacity {sum(declared)} ({' + '.join(map(str, declared))})"


def _endpoint_table(service: LiveService) -> list[Line]:
    if not service.endpoints:
        return [[("  (no endpoints)", "dim")]]
    header = ["ENDPOINT", "SUBJECT", "QUEUE GROUP", "REQUESTS", "ERRORS", "AVG TIME"]
    rows = [_endpoint_cells(e) for e in service.endpoints]
    widths = [max(len(r[c]) for r in [header, *rows]) for c in range(len(header))]
    numeric = {3, 4, 5}

    def cells(row: list[str]) -> list[str]:
        return [
            cell.rjust(width) if c in numeric else cell.ljust(width)
            for c, (cell, width) in enumerate(zip(row, widths, strict=True))
        ]

    lines: list[Line] = [[("  " + "  ".join(cells(header)).rstrip(), "dim")]]
    for endpoint, row in zip(service.endpoints, rows, strict=True):
        text = cells(row)
        line: Line = [("  " + "  ".join(text[:4]) + "  ", None)]
        line.append((text[4], "red" if endpoint.errors else None))
        line.append(("  " + text[5], None))
        line.extend(_endpoint_notes(endpoint, service))
        lines.append(line)
    return lines


def _endpoint_cells(endpoint: Endpoint) -> list[str]:
    return [
        endpoint.name,
        endpoint.subject,
        endpoint.queue_group or "-",
        str(endpoint.requests),
        str(endpoint.errors),
        processing_time(endpoint.average_processing_ns),
    ]


def _endpoint_notes(endpoint: Endpoint, service: LiveService) -> list[Segment]:
    """What differs from the service's head line: fewer instances, its own idempotent flag."""
    notes: list[Segment] = []
    if endpoint.instances < len(service.instances):
        notes.append((f"  on {endpoint.instances} of {len(service.instances)} instances", "yellow"))
    if endpoint.idempotent and not service.idempotent:
        notes.append(("  idempotent", "green"))
    return notes


def processing_time(ns: int | None) -> str:
    """A Services API average (nanoseconds) the way a person reads it; ``-`` before any."""
    if ns is None:
        return "-"
    if ns < 1_000:
        return f"{ns}ns"
    if ns < 1_000_000:
        return f"{ns / 1_000:.0f}µs"
    if ns < 1_000_000_000:
        return f"{ns / 1_000_000:.1f}ms"
    return f"{ns / 1_000_000_000:.2f}s"
