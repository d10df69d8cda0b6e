"""``kubectl taskflow``: the kubectl plugin (console script ``kubectl-taskflow``).

::

    kubectl taskflow tree NAME            the flow and its nested children: status, attempt,
                                          duration, error (colour on a terminal)
    kubectl taskflow events NAME          live tail of the flow's events from NATS (--replay:
                                          its whole history first)
    kubectl taskflow retry NAME [--failed] [--stage S]... [--task S/T]...
    kubectl taskflow cancel NAME
    kubectl taskflow services [SERVICE]   the services that answer on NATS (Services API):
                                          instances, endpoints, stats, idempotent, capacity

Common flags: ``-n/--namespace``, ``--kubeconfig``, ``--context``, ``--nats-url`` (default
``$NATS_URL``), ``-o json``. NAME is a name in the namespace, ``namespace/name`` or a uid.
Errors are one line on stderr and a non-zero exit.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import time
import urllib.parse
from collections.abc import Sequence
from typing import Any

from taskflow.api.status import WaitingReason
from taskflow.client import (
    DEFAULT_NATS_URL,
    Envelope,
    LiveService,
    TaskflowClient,
    TaskflowError,
    is_final_event,
    list_services,
)
from taskflow.client.services import DEFAULT_TIMEOUT, Endpoint, check_request

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


class PluginError(Exception):
    """One line for stderr."""


# -- the command line --------------------------------------------------------------------------


def _common(parser: argparse.ArgumentParser, suppress: bool) -> None:
    def default(value: Any) -> Any:
        return argparse.SUPPRESS if suppress else value

    parser.add_argument(
        "-n",
        "--namespace",
        default=default(None),
        help="namespace (default: the kubeconfig context's)",
    )
    parser.add_argument(
        "--kubeconfig",
        default=default(None),
        help="kubeconfig file (default: $KUBECONFIG, then ~/.kube/config)",
    )
    parser.add_argument("--context", default=default(None), help="kubeconfig context")
    parser.add_argument(
        "--nats-url",
        default=default(None),
        help=f"NATS server (default: $NATS_URL, else {DEFAULT_NATS_URL})",
    )
    parser.add_argument(
        "-o", "--output", choices=["text", "json"], default=default("text"), help="output format"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kubectl taskflow",
        description="Inspect and steer Taskflows (taskflow.dev/v1alpha1).",
    )
    _common(parser, suppress=False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help_: str) -> argparse.ArgumentParser:
        cmd = sub.add_parser(name, help=help_, description=help_)
        cmd.add_argument("name", metavar="NAME", help="name, namespace/name or uid")
        _common(cmd, suppress=True)
        return cmd

    command("tree", "show the flow and its nested flows with status, attempt, duration, error")
    events = command("events", "tail the flow's events from NATS until it ends")
    events.add_argument(
        "--replay", action="store_true", help="print the flow's whole history first"
    )
    retry = command("retry", "retry a finished flow (all of it, failed tasks, stages, tasks)")
    retry.add_argument(
        "--failed",
        action="store_true",
        help="only FAILED, TIMED_OUT and CANCELLED tasks of the selection",
    )
    retry.add_argument(
        "--stage", action="append", default=[], metavar="STAGE", help="retry this stage (repeat)"
    )
    retry.add_argument(
        "--task", action="append", default=[], metavar="STAGE/TASK", help="retry this task (repeat)"
    )
    retry.add_argument(
        "--no-wait", action="store_true", help="do not wait for the operator to accept the retry"
    )
    cancel = command("cancel", "cancel a running flow")
    cancel.add_argument(
        "--no-wait", action="store_true", help="do not wait for the operator to act"
    )
    run_cmd = sub.add_parser(
        "run",
        help="start a Taskflow from a TaskflowTemplate of the namespace",
        description="start a Taskflow from a TaskflowTemplate of the namespace",
    )
    run_cmd.add_argument("template", metavar="TEMPLATE", help="the TaskflowTemplate's name")
    run_cmd.add_argument(
        "--arg",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an argument (repeat); VALUE is read as JSON when it is JSON, else as a string",
    )
    run_cmd.add_argument("--name", help="the new flow's name (default: <template>-<random>)")
    _common(run_cmd, suppress=True)
    command("suspend", "hold a flow's new dispatches back (attempts in flight finish)")
    command("resume", "let a suspended flow go on")
    history = sub.add_parser(
        "history",
        help="flows deleted after their TTL, from the history the operator keeps in NATS",
        description="flows deleted after their TTL, from the history the operator keeps in NATS",
    )
    _common(history, suppress=True)
    history.add_argument("-A", "--all-namespaces", action="store_true", help="every namespace")
    history.add_argument("--phase", help="SUCCEEDED, FAILED, CANCELLED or COMPLETED_WITH_FAILURES")
    history.add_argument("--service", help="flows with a task that called this serviceId")
    history.add_argument("--since", help="completed within this long (e.g. 1h, 30m)")
    services_help = "the services that answer on NATS (Services API), by name"
    services_cmd = sub.add_parser("services", help=services_help, description=services_help)
    _common(services_cmd, suppress=True)
    services_cmd.add_argument(
        "service", nargs="?", metavar="SERVICE", help="only this service (its Services API name)"
    )
    services_cmd.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help=f"how long to collect answers (default {DEFAULT_TIMEOUT:g}; all answer at once)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return asyncio.run(run(args))
    except KeyboardInterrupt:
        return 130
    except PluginError as exc:
        return _error(str(exc))
    except TaskflowError as exc:
        return _error(exc.message)
    except Exception as exc:  # one clear line, never a traceback
        return _error(_describe(exc))


def _error(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 1


def _describe(exc: Exception) -> str:
    from kubernetes.client.exceptions import ApiException
    from kubernetes.config import ConfigException

    if isinstance(exc, ConfigException):
        return f"cannot load the kubeconfig: {exc}"
    if isinstance(exc, ApiException):
        return TaskflowError.from_api(exc).message
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


async def run(args: argparse.Namespace) -> int:
    nats_url = args.nats_url or os.environ.get("NATS_URL") or DEFAULT_NATS_URL
    if args.command == "services":
        return await services(args, nats_url=nats_url)  # NATS only: no kubeconfig needed
    nc = await connect_nats(nats_url) if args.command in ("events", "history") else None
    client = TaskflowClient(
        kubeconfig=args.kubeconfig,
        context=args.context,
        namespace=args.namespace,
        nats_url=nats_url,
        nc=nc,
    )
    try:
        if args.command == "tree":
            return await tree(client, args)
        if args.command == "events":
            return await events(client, args)
        if args.command == "retry":
            return await retry(client, args)
        if args.command in ("suspend", "resume"):
            data = _data(await client.suspend(args.name, suspend=args.command == "suspend"))
            if args.output == "json":
                print(json.dumps(data))
            else:
                print(
                    f"taskflow {data['namespace']}/{data['name']} "
                    f"{'suspended' if data['suspend'] else 'resumed'}"
                )
            return 0
        if args.command == "history":
            return await history(client, args)
        if args.command == "run":
            return await run_template(client, args)
        return await cancel(client, args)
    finally:
        await client.close()
        if nc is not None:
            with contextlib.suppress(Exception):
                await nc.close()


async def connect_nats(url: str) -> Any:
    import nats

    try:

        async def quiet(_: Exception) -> None:
            pass

        # One attempt (nats-py counts reconnects from the first failure), then a clear error.
        return await nats.connect(
            url,
            connect_timeout=3,
            allow_reconnect=False,
            max_reconnect_attempts=1,
            reconnect_time_wait=0.2,
            error_cb=quiet,
            name="kubectl-taskflow",
        )
    except Exception as exc:
        raise PluginError(f"cannot connect to NATS at {url}: {_describe(exc)}") from exc


def _data(result: Envelope) -> Any:
    if not result.get("success"):
        raise PluginError((result.get("error") or {}).get("message") or "failed")
    return result.get("data")


# -- tree --------------------------------------------------------------------------------------


async def tree(client: TaskflowClient, args: argparse.Namespace) -> int:
    json_out = args.output == "json"
    node = _data(await client.get_details(args.name, fetch_responses=json_out))
    if json_out:
        print(json.dumps(node, indent=2))
        return 0
    emit(render_tree(node))
    return 0


def duration(ms: int | None) -> str:
    if ms is None:
        return ""
    if ms < 1000:
        return f"{ms}ms"
    if ms < 60_000:
        return f"{ms / 1000:.1f}s"
    minutes, rest = divmod(ms // 1000, 60)
    if minutes < 60:
        return f"{minutes}m{rest}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes}m"


def _status(value: str) -> Segment:
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
        _status(node["status"]),
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
            _status(item["status"]),
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
    line: Line = [(lead, "dim"), (task["name"], None), ("  ", None), _status(task["status"])]
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
        _status(child["status"]),
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


# -- events ------------------------------------------------------------------------------------


async def events(client: TaskflowClient, args: argparse.Namespace) -> int:
    body = await client.fetch(args.name)
    uid = body["metadata"]["uid"]
    status = body.get("status") or {}
    if not args.replay and status.get("phase") in {
        "SUCCEEDED",
        "FAILED",
        "CANCELLED",
        "COMPLETED_WITH_FAILURES",
    }:
        meta = body["metadata"]
        print(
            f"taskflow {meta['namespace']}/{meta['name']} already ended {status['phase']}; "
            "use --replay to see its events",
            file=sys.stderr,
        )
        return 0
    async for event in client.subscribe_events(uid, replay=args.replay):
        if args.output == "json":
            print(json.dumps(event, separators=(",", ":")), flush=True)
        else:
            emit([event_line(event)])
            sys.stdout.flush()
        if is_final_event(event) and not args.replay:
            break
    return 0


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
        _status(status),
    ]
    if kind == "TASK":
        line.append((f"  attempt {data.get('attempt', 0)}", None))
        error = _error_text(data.get("taskError"))
        if error:
            line.append((f"  {error}", "red"))
    return line


# -- run ---------------------------------------------------------------------------------------


async def run_template(client: TaskflowClient, args: argparse.Namespace) -> int:
    arguments: dict[str, Any] = {}
    for item in args.arg:
        name, sep, raw = item.partition("=")
        if not sep or not name:
            raise PluginError(f"--arg takes NAME=VALUE, not {item!r}")
        try:
            arguments[name] = json.loads(raw)
        except ValueError:
            arguments[name] = raw
    spec = {"templateRef": {"name": args.template, "arguments": arguments}}
    manifest = {"metadata": {"generateName": f"{args.template[:50]}-"}, "spec": spec}
    data = _data(await client.produce(manifest if not args.name else spec, name=args.name))
    if args.output == "json":
        print(json.dumps(data))
    else:
        print(
            f"taskflow {data.get('taskflowId')} started from TaskflowTemplate {args.template} "
            f"(kubectl taskflow tree {data.get('taskflowId')})"
        )
    return 0


# -- history -----------------------------------------------------------------------------------


async def history(client: TaskflowClient, args: argparse.Namespace) -> int:
    from taskflow.api.durations import parse_duration_ms

    since = None
    if args.since:
        try:
            since = int(time.time() * 1000) - parse_duration_ms(args.since)
        except ValueError as exc:
            raise PluginError(f"--since takes a duration like 1h or 30m: {exc}") from exc
    items = await client.history(
        namespace=None if args.all_namespaces else client.namespace,
        phase=args.phase,
        service=args.service,
        since_ms=since,
    )
    if args.output == "json":
        print(json.dumps(items))
        return 0
    lines: list[Line] = [
        [
            ("NAMESPACE/NAME".ljust(48), "bold"),
            ("PHASE".ljust(26), "bold"),
            ("PROGRESS".ljust(10), "bold"),
            ("COMPLETED", "bold"),
        ]
    ]
    for item in items:
        lines.append(
            [
                (f"{item.get('namespace')}/{item.get('name')}".ljust(48), None),
                _status(str(item.get("phase"))),
                (" " * max(1, 26 - len(str(item.get("phase")))), None),
                (str(item.get("progress") or "").ljust(10), None),
                (str(item.get("completionTime") or ""), "dim"),
            ]
        )
    emit(lines)
    return 0


# -- services ----------------------------------------------------------------------------------


async def services(args: argparse.Namespace, *, nats_url: str) -> int:
    """The listing of ``taskflow.client.list_services``, formatted; nothing found is an answer."""
    try:
        check_request(name=args.service, timeout=args.timeout)  # before connecting
    except ValueError as exc:
        raise PluginError(str(exc)) from exc
    nc = await connect_nats(nats_url)
    try:
        found = await list_services(nc, name=args.service, timeout=args.timeout)
    finally:
        with contextlib.suppress(Exception):
            await nc.close()
    if args.output == "json":
        print(json.dumps([s.as_json() for s in found], indent=2))
    elif not found:
        print(nothing_answers(service=args.service, nats_url=nats_url))
    else:
        emit(render_services(found))
    return 0


def nothing_answers(*, service: str | None, nats_url: str) -> str:
    """An empty listing is an answer, not an error: say what was asked and where."""
    what = f"no instance of service {service}" if service else "no service"
    return (
        f"{what} answers on NATS at {_without_credentials(nats_url)} (NATS Services API, $SRV.INFO)"
    )


def _without_credentials(url: str) -> str:
    """A URL fit for stdout: ``nats://user:password@host`` loses its user and password."""
    parts = urllib.parse.urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


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


# -- retry and cancel --------------------------------------------------------------------------


async def retry(client: TaskflowClient, args: argparse.Namespace) -> int:
    for task in args.task:
        stage, _, name = task.partition("/")
        if not stage or not name:
            raise PluginError(f"--task takes STAGE/TASK, not {task!r}")
    result = await client.retry(
        args.name,
        stages=args.stage or None,
        tasks=args.task or None,
        failed_only=args.failed,
        wait=None if args.no_wait else 15.0,
    )
    data = _data(result)
    if args.output == "json":
        print(json.dumps(result, indent=2))
        return 0
    if not data.get("acknowledged"):
        print(
            f"retry {data['retryId']} of {args.name} requested "
            "(not yet acknowledged by the operator)"
        )
    else:
        print(f"retry {data['retryId']} of {args.name} accepted: {data.get('message', '')}")
    return 0


async def cancel(client: TaskflowClient, args: argparse.Namespace) -> int:
    result = await client.cancel(args.name, wait=None if args.no_wait else 15.0)
    data = _data(result)
    if args.output == "json":
        print(json.dumps(result, indent=2))
        return 0
    where = f"{data['namespace']}/{data['name']}"
    if data.get("acknowledged"):
        print(f"taskflow {where} cancelled (phase {data.get('phase')})")
    else:
        print(f"cancel of taskflow {where} requested (not yet acknowledged by the operator)")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())


__all__ = ["build_parser", "event_line", "main", "render_services", "render_tree"]
