"""What happened since the last decision: replies, no-responder notices, finished children,
heartbeats."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from taskflow.api.status import ErrorReason, Status, TaskError

# The error reason of an attempt whose reply could not be used (kept for importers).
BAD_REPLY = ErrorReason.BAD_REPLY


@dataclass(frozen=True, slots=True)
class Reply:
    """A service's reply to one attempt, already parsed and judged by ``taskflow.wire``."""

    stage: str
    task: str
    attempt: int
    ok: bool
    data: Any = None
    error: TaskError | None = None
    response_ref: str | None = None
    # Child flows the service started for this attempt ("ns/name"); the task finishes when
    # they do.
    children: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class NoResponders:
    """NATS said nobody listens on the task's subject: redeliver later, the attempt stands."""

    stage: str
    task: str
    attempt: int


@dataclass(frozen=True, slots=True)
class ChildFinished:
    """A nested flow started for a task has ended (or its status changed)."""

    stage: str
    task: str
    child: str  # namespace/name
    status: Status
    summary: Any = None
    # The parent task's attempt the child was started for; None when unknown.
    attempt: int | None = None


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """The service working on an attempt says it is alive, with its progress (any JSON, or
    None), on the attempt's heartbeat subject."""

    stage: str
    task: str
    attempt: int
    progress: Any = None


@dataclass(frozen=True, slots=True)
class Throttled:
    """The attempt's concurrency slot was taken by another just before it could be sent: it
    waits for a slot again (nothing was sent)."""

    stage: str
    task: str
    attempt: int


Input = Reply | NoResponders | ChildFinished | Heartbeat | Throttled


@dataclass(frozen=True, slots=True)
class Ask:
    """What the engine asks the shell's flow control before it sends an attempt: may
    ``holder`` (the attempt's key) start now, under its task's concurrency ``key`` (None: it
    has none) and its service's limits (``ServiceLimit``: the shell knows them)."""

    holder: str
    key: str | None = None
    limit: int = 1
    service_id: str | None = None
    action_name: str | None = None
