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

from taskflow.client import (
    DEFAULT_NATS_URL,
    Envelope,
    TaskflowClient,
    TaskflowError,
    is_final_event,
    list_services,
)
from taskflow.client.services import DEFAULT_TIMEOUT, check_request
from taskflow.plugin.render import (
    Line,
    capacity_text,
    emit,
    event_line,
    processing_time,
    render_services,
    render_tree,
    status_segment,
)


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
                status_segment(str(item.get("phase"))),
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


__all__ = [
    "build_parser",
    "capacity_text",
    "event_line",
    "main",
    "nothing_answers",
    "processing_time",
    "render_services",
    "render_tree",
]
