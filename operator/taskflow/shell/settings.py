"""How flow writers behave: limits and intervals, set once from the command line."""

from __future__ import annotations

from dataclasses import dataclass, field

from taskflow.wire.replies import ReplyLimits
from taskflow.wire.subjects import Subjects


@dataclass(frozen=True)
class RunnerSettings:
    subjects: Subjects = field(default_factory=Subjects)
    reply_limits: ReplyLimits = field(default_factory=ReplyLimits)
    # Responses larger than this go to the NATS object store; status keeps a reference.
    inline_response_bytes: int = 32 * 1024
    # All inline responses of one flow share this budget, so status stays far below etcd's
    # ~1.5 MB object limit however many tasks a flow has.
    inline_responses_budget: int = 512 * 1024
    # Task results alone are written at most this often (stage and flow changes at once).
    flush_interval_s: float = 1.0
    max_depth: int = 10
    # After a cancel, the writer stays this long to record late replies (they change nothing).
    late_reply_window_s: float = 30.0
    # A writer idle this long keeps its status and spec serialised until it is woken.
    compact_after_s: float = 2.0
    # Writers between their start (the first read) and the end of their first round, at most.
    # A burst of new flows (or a restart with many active ones) otherwise has every writer
    # holding its spec, status and models while it waits its turn for the API.
    max_starting: int = 64
