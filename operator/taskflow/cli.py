"""``taskflow-operator``: the operator's command line.

Every flag has an environment variable so the Helm chart can set it from values and Secrets;
credentials are read from files (mounted Secrets) so they never appear in a process listing.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import sys
from pathlib import Path
from typing import Any

from taskflow import logs


def _read(path: str | None) -> str | None:
    return Path(path).read_text().strip() if path else None


def build_parser() -> argparse.ArgumentParser:
    env = os.environ.get
    parser = argparse.ArgumentParser(prog="taskflow-operator")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the operator")
    run.add_argument(
        "--kubeconfig",
        default=env("KUBECONFIG"),
        help="kubeconfig file (default: in-cluster, then ~/.kube/config)",
    )
    _nats_flags(run)
    run.add_argument(
        "-n",
        "--namespace",
        action="append",
        default=[n for n in env("TASKFLOW_NAMESPACES", "").split(",") if n],
        help="namespace to watch (repeat; default: all namespaces)",
    )
    run.add_argument(
        "--nats-api",
        choices=["off", "on"],
        default=env("TASKFLOW_NATS_API", "off"),
        help="the NATS API (taskflow.api.*); when on, each call is authorized "
        "by the caller's Kubernetes bearer token (docs/nats-api.md)",
    )
    run.add_argument(
        "--nats-api-users",
        action="store_true",
        default=env("TASKFLOW_NATS_API_USERS", "") == "true",
        help="a NATS API call without a token is made by the NATS user the server "
        "stamps on a call through an account import (Kubernetes user "
        "nats:<account>:<user>, group nats:<account>); only where nobody but "
        "the operator may publish on taskflow.api.> in its own account",
    )
    run.add_argument(
        "--api-namespaces",
        default=env("TASKFLOW_API_NAMESPACES"),
        help="comma-separated namespaces the NATS API (taskflow.api.*) may act in "
        "(default: the watched namespaces; 'none' turns the API off)",
    )
    run.add_argument(
        "--subject-template",
        default=env("TASKFLOW_SUBJECT_TEMPLATE", "{serviceId}.{actionName}"),
        help="a task's request subject: {serviceId}, {actionName}, {namespace}",
    )
    run.add_argument(
        "--credentials-namespace",
        default=env("TASKFLOW_CREDENTIALS_NAMESPACE"),
        help="where the NATS credentials Secrets that TaskflowPolicies name live "
        "(the operator's namespace; unset: policies cannot name any)",
    )
    run.add_argument(
        "--require-policy",
        action="store_true",
        default=env("TASKFLOW_REQUIRE_POLICY", "") == "true",
        help="a namespace without a TaskflowPolicy 'default' runs no task",
    )
    run.add_argument(
        "--metrics-address",
        default=env("TASKFLOW_METRICS_ADDRESS", "127.0.0.1:9464"),
        help="host:port of the Prometheus endpoint ('' disables it)",
    )
    run.add_argument(
        "--health-address",
        default=env("TASKFLOW_HEALTH_ADDRESS", ""),
        help="host:port of the liveness endpoint /healthz ('' disables it)",
    )
    run.add_argument(
        "--flush-interval",
        type=float,
        default=float(env("TASKFLOW_FLUSH_INTERVAL", "1.0")),
        help="seconds between status writes of task results within a stage",
    )
    run.add_argument("--max-depth", type=int, default=int(env("TASKFLOW_MAX_DEPTH", "10")))
    run.add_argument(
        "--peering",
        default=env("TASKFLOW_PEERING", ""),
        help="kopf peering name for active/standby replicas ('' = standalone)",
    )
    run.add_argument(
        "--replica-mode",
        choices=["standby", "active"],
        default=env("TASKFLOW_REPLICA_MODE", "standby"),
        help="standby: one replica serves, the others wait (with --peering); active: every "
        "replica serves the flows of the buckets it holds (docs/scale-out.md)",
    )
    run.add_argument(
        "--buckets",
        type=int,
        default=int(env("TASKFLOW_BUCKETS", "1")),
        help="active mode: how many buckets the flows are split into (the same on every "
        "replica; at least the most replicas you will run)",
    )
    run.add_argument(
        "--bucket-lease",
        default=env("TASKFLOW_BUCKET_LEASE", "15s"),
        help="active mode: how long a bucket's Lease outlives a replica that stopped renewing "
        "it (renewed every third of it)",
    )
    run.add_argument(
        "--lease-namespace",
        default=env("TASKFLOW_LEASE_NAMESPACE") or env("POD_NAMESPACE"),
        help="active mode: where the buckets' Leases live (default: the pod's namespace, "
        "else default)",
    )
    run.add_argument(
        "--key-file",
        default=env("TASKFLOW_KEY_FILE"),
        help="file with the key (>= 16 bytes) that signs reply subjects, journal "
        "entries and event ids (a Secret; default: one kept in the NATS "
        "bucket taskflow-keys)",
    )
    run.add_argument(
        "--reply-pending-bytes",
        type=int,
        default=int(env("TASKFLOW_REPLY_PENDING_BYTES", str(64 * 1024 * 1024))),
        help="bytes of received replies the operator buffers; past it NATS drops "
        "them and the flows read them from the reply stream",
    )
    run.add_argument(
        "--stream-max-bytes",
        type=int,
        default=int(env("TASKFLOW_STREAM_MAX_BYTES", str(512 * 1024**2))),
        help="size limit of each of the reply and event streams (oldest go first)",
    )
    run.add_argument(
        "--slot-lease",
        default=env("TASKFLOW_SLOT_LEASE", "30s"),
        help="how long a concurrency slot outlives its operator if that dies (renewed at a "
        "third of it while the attempt runs)",
    )
    run.add_argument(
        "--service-limits",
        choices=["on", "off"],
        default=env("TASKFLOW_SERVICE_LIMITS", "on"),
        help="apply the cluster's ServiceLimits (off: a namespaced operator, which may not "
        "read cluster-scoped objects)",
    )
    run.add_argument(
        "--service-poll",
        default=env("TASKFLOW_SERVICE_POLL", "10s"),
        help="how often a ServiceLimit with maxInFlight: auto asks the Services API how many "
        "instances serve its service",
    )
    run.add_argument(
        "--webhook-address",
        default=env("TASKFLOW_WEBHOOK_ADDRESS", ""),
        help="host:port of the validating admission webhook (checks expressions at apply; "
        "'' serves none)",
    )
    run.add_argument("--webhook-cert-file", default=env("TASKFLOW_WEBHOOK_CERT_FILE"))
    run.add_argument("--webhook-key-file", default=env("TASKFLOW_WEBHOOK_KEY_FILE"))
    run.add_argument(
        "--ttl-after-succeeded",
        default=env("TASKFLOW_TTL_AFTER_SUCCEEDED"),
        help="delete a SUCCEEDED flow this long after it ended, unless its spec.ttl says "
        "otherwise (e.g. 1h; default: keep)",
    )
    run.add_argument(
        "--ttl-after-failed",
        default=env("TASKFLOW_TTL_AFTER_FAILED"),
        help="the same for FAILED and COMPLETED_WITH_FAILURES flows",
    )
    run.add_argument(
        "--ttl-after-cancelled",
        default=env("TASKFLOW_TTL_AFTER_CANCELLED"),
        help="the same for CANCELLED flows",
    )
    run.add_argument(
        "--history-retention",
        default=env("TASKFLOW_HISTORY_RETENTION", "720h"),
        help="how long the history keeps a deleted flow's final status",
    )
    run.add_argument(
        "--ui-address",
        default=env("TASKFLOW_UI_ADDRESS", ""),
        help="host:port of the web view (docs/ui.md; '' serves none)",
    )
    run.add_argument(
        "--otlp-endpoint",
        default=env("TASKFLOW_OTLP_ENDPOINT", ""),
        help="base URL of an OTLP/HTTP collector to export traces to, e.g. "
        "http://otel-collector:4318 (default: the OTEL_EXPORTER_OTLP_* variables; none: "
        "no spans, only the traceparent header; docs/observability.md)",
    )
    run.add_argument("--log-level", default=env("TASKFLOW_LOG_LEVEL", "INFO"))
    run.add_argument(
        "--log-format", choices=["text", "json"], default=env("TASKFLOW_LOG_FORMAT", "text")
    )
    _ui_parser(sub)
    return parser


def _ui_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``taskflow-operator ui``: the web view alone (the same as ``run --ui-address``)."""
    env = os.environ.get
    ui = sub.add_parser("ui", help="serve the web view of the flows (docs/ui.md)")
    ui.add_argument(
        "--address",
        default=env("TASKFLOW_UI_ADDRESS", "127.0.0.1:8081"),
        help="host:port to serve on (default 127.0.0.1:8081; port 0: any free one)",
    )
    ui.add_argument(
        "--kubeconfig",
        default=env("KUBECONFIG"),
        help="kubeconfig file (default: in-cluster, then ~/.kube/config)",
    )
    _nats_flags(ui)
    ui.add_argument(
        "-n",
        "--namespace",
        action="append",
        default=[n for n in env("TASKFLOW_NAMESPACES", "").split(",") if n],
        help="namespace to show (repeat; default: all namespaces)",
    )
    ui.add_argument(
        "--secure-cookies",
        choices=["auto", "always", "never"],
        default=env("TASKFLOW_UI_SECURE_COOKIES", "auto"),
        help="mark the session cookie Secure: auto (when the request came over https, or "
        "X-Forwarded-Proto says so), always, never",
    )
    ui.add_argument("--log-level", default=env("TASKFLOW_LOG_LEVEL", "INFO"))
    ui.add_argument(
        "--log-format", choices=["text", "json"], default=env("TASKFLOW_LOG_FORMAT", "text")
    )


def _nats_flags(parser: argparse.ArgumentParser) -> None:
    """How to reach NATS and as whom: the same flags (and environment) for every command."""
    env = os.environ.get
    parser.add_argument("--nats-url", default=env("NATS_URL", "nats://127.0.0.1:4222"))
    for flag in ("user", "password-file", "token-file", "creds-file", "nkey-file"):
        parser.add_argument(f"--nats-{flag}", default=env(f"NATS_{flag.upper().replace('-', '_')}"))
    for flag in ("ca", "cert", "key"):
        parser.add_argument(f"--nats-tls-{flag}", default=env(f"NATS_TLS_{flag.upper()}"))


def _nats_settings(args: argparse.Namespace, **extra: Any) -> Any:
    from taskflow.shell.bus import NatsSettings

    return NatsSettings(
        url=args.nats_url,
        user=args.nats_user,
        password=_read(args.nats_password_file),
        token=_read(args.nats_token_file),
        creds_file=args.nats_creds_file,
        nkey_seed_file=args.nats_nkey_file,
        tls_ca=args.nats_tls_ca,
        tls_cert=args.nats_tls_cert,
        tls_key=args.nats_tls_key,
        **extra,
    )


def ui(args: argparse.Namespace) -> int:
    from taskflow.ui import run_ui

    logs.configure(level=args.log_level, fmt=args.log_format)
    nats = _nats_settings(args)
    try:
        return run_ui(
            address=args.address,
            kubeconfig=args.kubeconfig,
            namespaces=list(args.namespace) or None,
            nats_options=nats.connect_options(),
            secure_cookies=args.secure_cookies,
        )
    except (OSError, ValueError) as exc:
        print(f"taskflow-operator ui: {exc}", file=sys.stderr)
        return 2


def run(args: argparse.Namespace) -> int:
    import kopf
    from prometheus_client import start_http_server

    from taskflow.api.durations import parse_duration_ms
    from taskflow.shell import tracing
    from taskflow.shell.handlers import Operator
    from taskflow.shell.reaper import TtlDefaults
    from taskflow.shell.settings import RunnerSettings
    from taskflow.wire.subjects import Subjects

    logs.configure(level=args.log_level, fmt=args.log_format)
    if args.kubeconfig:
        os.environ["KUBECONFIG"] = args.kubeconfig  # kopf's own login reads it
    if args.webhook_address and not (args.webhook_cert_file and args.webhook_key_file):
        print("--webhook-address needs --webhook-cert-file and --webhook-key-file", file=sys.stderr)
        return 2
    problem = Subjects(template=args.subject_template).template_problem()
    if problem is not None:
        print(f"--subject-template: {problem}", file=sys.stderr)
        return 2
    nats_settings = _nats_settings(
        args,
        reply_pending_bytes=args.reply_pending_bytes,
        stream_max_bytes=args.stream_max_bytes,
        history_retention_s=parse_duration_ms(args.history_retention) // 1000,
    )
    ttl = TtlDefaults(
        **{
            phase: parse_duration_ms(value) if value else None
            for phase, value in (
                ("succeeded", args.ttl_after_succeeded),
                ("failed", args.ttl_after_failed),
                ("cancelled", args.ttl_after_cancelled),
            )
        }
    )
    runner = RunnerSettings(
        subjects=Subjects(template=args.subject_template),
        flush_interval_s=args.flush_interval,
        max_depth=args.max_depth,
    )
    api_namespaces = (
        [n.strip() for n in args.api_namespaces.split(",") if n.strip()]
        if args.api_namespaces
        else list(args.namespace)
    )
    active = args.replica_mode == "active"
    buckets = None
    if active:
        from taskflow.shell.buckets import BucketSettings

        if args.peering:
            print("--peering is for --replica-mode standby", file=sys.stderr)
            return 2
        if args.buckets < 1:
            print("--buckets must be at least 1", file=sys.stderr)
            return 2
        lease_s = parse_duration_ms(args.bucket_lease) / 1000
        if lease_s < 1:
            print("--bucket-lease must be at least 1s", file=sys.stderr)
            return 2
        buckets = BucketSettings(
            count=args.buckets,
            lease_s=lease_s,
            namespace=args.lease_namespace or _pod_namespace(),
        )
    operator = Operator(
        kubeconfig=args.kubeconfig,
        nats=nats_settings,
        runner=runner,
        standalone=not args.peering,
        peering=args.peering or None,
        api_namespaces=[n for n in api_namespaces if n != "none"] or None,
        serve_nats_api=args.nats_api == "on" and api_namespaces != ["none"],
        nats_api_users=args.nats_api_users,
        key_file=args.key_file,
        namespaces=list(args.namespace) or None,
        credentials_namespace=args.credentials_namespace,
        require_policy=args.require_policy,
        ttl=ttl,
        slot_lease_s=parse_duration_ms(args.slot_lease) / 1000,
        service_poll_s=parse_duration_ms(args.service_poll) / 1000,
        service_limits=args.service_limits == "on",
        buckets=buckets,
        webhook=(args.webhook_address, args.webhook_cert_file, args.webhook_key_file)
        if args.webhook_address
        else None,
    )
    registry = kopf.OperatorRegistry()
    operator.register(registry)
    if args.metrics_address:
        host, _, port = args.metrics_address.rpartition(":")
        start_http_server(int(port), addr=host or "0.0.0.0")
    tracing.configure(endpoint=args.otlp_endpoint or None)
    liveness = f"http://{args.health_address}/healthz" if args.health_address else None
    operating = kopf.operator(
        registry=registry,
        clusterwide=not args.namespace,
        namespaces=args.namespace,
        # (active mode has no --peering: every replica sees every event, and its buckets say
        # which flows it writes)
        standalone=not args.peering,
        peering_name=args.peering or None,
        # kopf pauses every operator of the same priority as a higher-or-equal peer, so each
        # replica takes its own: the highest serves, the others stand by.
        priority=secrets.randbelow(1_000_000) + 1 if args.peering else 0,
        liveness_endpoint=liveness,
    )
    if not args.ui_address:
        asyncio.run(operating)
        return 0

    async def with_ui() -> None:
        from taskflow.ui import serve_ui

        view = await serve_ui(
            address=args.ui_address,
            kubeconfig=args.kubeconfig,
            namespaces=list(args.namespace) or None,
            nats_options=nats_settings.connect_options(),
        )
        try:
            await operating
        finally:
            await view.close()

    asyncio.run(with_ui())
    return 0


def _pod_namespace() -> str:
    path = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
    return path.read_text().strip() if path.exists() else "default"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "run":
        return run(args)
    if args.command == "ui":
        return ui(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
