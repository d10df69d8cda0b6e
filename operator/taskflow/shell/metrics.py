"""Prometheus metrics: flows and tasks by outcome, latency, status writes, queue depth."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

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
REPLY_LATENCY = Histogram(
    "taskflow_dispatch_to_reply_seconds",
    "Time from dispatch to the service's reply",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
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
