"""Prometheus metrics: flows and tasks by outcome, latency, status writes, queue depth; and per
service and action, dispatches, reply latency, outcomes and failures (docs/observability.md)."""

from __future__ import annotations

import time

from prometheus_client import Counter, Gauge, Histogram

from taskflow.api.spec import TaskflowSpec
from taskflow.api.status import ErrorReason, Status
from taskflow.engine import Emit

FLOWS_DELETED = Counter(
    "taskflow_flows_deleted_total", "Finished flows deleted after their TTL (history kept)"
)
FLOWS_FINISHED = Counter(
    "taskflow_flows_finished_total", "Taskflows that reached a final phase", ["phase"]
)
TASKS_FINISHED = Counter(
    "taskflow_tasks_finished_total", "Task attempts that ended, by outcome", ["status"]
)
DISPATCHES = Counter("taskflow_dispatches_total", "Requests sent to services (attempts)")
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
REPLY_LATENCY = Histogram(
    "taskflow_dispatch_to_reply_seconds",
    "Time from dispatch to the service's reply",
    buckets=LATENCY_BUCKETS,
)
STATUS_WRITES = Counter("taskflow_status_writes_total", "Status writes to the API server")
JOURNAL_WRITES = Counter(
    "taskflow_journal_writes_total", "Write-ahead copies of status kept in NATS before a dispatch"
)
STATUS_CONFLICTS = Counter(
    "taskflow_status_conflicts_total", "Status writes refused for a stale resourceVersion"
)
REPLY_QUEUE = Gauge("taskflow_reply_queue_depth", "Replies received but not yet applied")
ACTIVE_FLOWS = Gauge("taskflow_active_flows", "Flows with a running writer")
BAD_REPLIES = Counter("taskflow_bad_replies_total", "Replies that were not usable", ["reason"])
WRITER_FAILURES = Counter(
    "taskflow_writer_failures_total", "Rounds of a flow's writer that failed and were retried"
)
EFFECT_FAILURES = Counter(
    "taskflow_effect_failures_total", "Effects of a decision that failed (logged)", ["effect"]
)
DROPPED_REPLIES = Counter(
    "taskflow_dropped_replies_total",
    "Replies the NATS client dropped as a slow consumer (then read from the reply stream)",
)
REASKED = Counter(
    "taskflow_reasked_attempts_total",
    "In-flight attempts sent again to an idempotent service (after a NATS reconnect or a "
    "restart) because their reply may have been lost",
)
FORGED_LINKS = Counter(
    "taskflow_forged_links_total",
    "Flows naming a parent they do not belong to (another namespace, or not owned by it)",
)
FORGED_REPLIES = Counter(
    "taskflow_forged_replies_total",
    "Messages on the reply subjects that no dispatch made (ignored): guesses or forgeries",
)


# -- per service and action ------------------------------------------------------------------
# serviceId and actionName are NATS tokens from the spec, but anyone who may create a flow
# picks them: past this many pairs, new ones are counted as OTHER (which no token can be).
MAX_SERVICE_LABELS = 1000
OTHER = "(other)"
SERVICE_DISPATCHES = Counter(
    "taskflow_service_dispatches_total",
    "Requests sent to a service's action (attempts, and redeliveries after no responders)",
    ["service", "action"],
)
SERVICE_REPLY_LATENCY = Histogram(
    "taskflow_service_reply_seconds",
    "Time from dispatch to the end of an attempt the service answered (success or its own "
    "failure; not timeouts)",
    ["service", "action"],
    buckets=LATENCY_BUCKETS,
)
SERVICE_ATTEMPTS = Counter(
    "taskflow_service_attempts_total",
    "Attempts of a service's action that ended: SUCCEEDED, FAILED or TIMED_OUT",
    ["service", "action", "status"],
)
SERVICE_FAILURES = Counter(
    "taskflow_service_failures_total",
    "Attempts of a service's action that failed or timed out, by the error's reason "
    "(Service, Timeout, BadReply, PolicyDenied, NoService, Heartbeat, ...)",
    ["service", "action", "reason"],
)
_OUTCOMES = frozenset({Status.SUCCEEDED, Status.FAILED, Status.TIMED_OUT})
_FAILED = frozenset({Status.FAILED, Status.TIMED_OUT})
_REASONS = frozenset(ErrorReason)  # (the reasons the operator writes; anything else is OTHER)
# An attempt the service answered (its latency is the service's, not a timer's).
_ANSWERED = frozenset({ErrorReason.SERVICE, ErrorReason.BAD_REPLY})


class _Series:
    """One service's action's series, looked up once (a labelled child costs a lock and a
    dict lookup each time it is asked for)."""

    __slots__ = ("action", "attempts", "dispatches", "failures", "latency", "service")

    def __init__(self, service: str, action: str) -> None:
        self.service, self.action = service, action
        self.dispatches = SERVICE_DISPATCHES.labels(service, action)
        self.latency = SERVICE_REPLY_LATENCY.labels(service, action)
        self.attempts: dict[str, Counter] = {}
        self.failures: dict[str, Counter] = {}

    def attempt(self, status: str) -> Counter:
        child = self.attempts.get(status)
        if child is None:
            child = self.attempts[status] = SERVICE_ATTEMPTS.labels(
                self.service, self.action, status
            )
        return child

    def failure(self, reason: str) -> Counter:
        child = self.failures.get(reason)
        if child is None:
            child = self.failures[reason] = SERVICE_FAILURES.labels(
                self.service, self.action, reason
            )
        return child


_series: dict[tuple[str, str], _Series] = {}


def service_labels(service: str, action: str) -> tuple[str, str]:
    """The labels of a service's action: itself, or OTHER once MAX_SERVICE_LABELS are taken."""
    found = series(service, action)
    return found.service, found.action


def series(service: str, action: str) -> _Series:
    """The series of ``service.action`` (OTHER's past MAX_SERVICE_LABELS pairs)."""
    key = (service, action)
    found = _series.get(key)
    if found is not None:
        return found
    if len(_series) >= MAX_SERVICE_LABELS:
        key = (OTHER, OTHER)
        found = _series.get(key)
        if found is not None:
            return found
    found = _series[key] = _Series(*key)
    return found


def dispatched(service: str, action: str) -> None:
    """A request left for ``service.action``."""
    DISPATCHES.inc()
    series(service, action).dispatches.inc()


def task_ended(spec: TaskflowSpec, effect: Emit, *, sent: float | None) -> None:
    """A TASK event of an attempt's end: its service's and action's counts. ``sent``: when
    this operator dispatched it (``time.monotonic()``; None when another process did, or
    nothing was sent)."""
    status = effect.status
    if status not in _OUTCOMES:
        return  # (cancelled or skipped: nothing the service did)
    task = spec.task(effect.stage or "", effect.task or "")
    if task is None or task.task_details is None:
        return  # (a nested flow's task)
    found = series(task.task_details.service_id, task.task_details.action_name)
    found.attempt(status).inc()
    reason = effect.error.reason if effect.error is not None else None
    if status in _FAILED:
        found.failure(reason if reason in _REASONS else OTHER).inc()
    if sent is not None and (status == Status.SUCCEEDED or reason in _ANSWERED):
        found.latency.observe(time.monotonic() - sent)
