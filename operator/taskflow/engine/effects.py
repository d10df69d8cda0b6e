"""What the shell must do after a decision, in order, once status is written when required."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from taskflow.api.status import TaskError, TaskflowStatus


@dataclass(frozen=True, slots=True)
class Dispatch:
    """Send one attempt of an ACTION task (or redeliver it after 'no responders')."""

    stage: str
    task: str
    attempt: int
    # Its concurrency key and limit: the shell takes the slot before it sends.
    slot: str | None = None
    slot_limit: int = 1


@dataclass(frozen=True, slots=True)
class CancelNotice:
    """Tell the service that an in-flight attempt was cancelled."""

    stage: str
    task: str
    attempt: int


@dataclass(frozen=True, slots=True)
class CreateChild:
    """Create the child Taskflow of a TASKFLOW task for this attempt."""

    stage: str
    task: str
    attempt: int


@dataclass(frozen=True, slots=True)
class CancelChild:
    child: str  # namespace/name


# What an event is about: one task's attempt, a stage or the whole flow (its ``eventType``).
EventKind = Literal["TASK", "STAGE", "TASKFLOW"]


@dataclass(frozen=True, slots=True)
class Emit:
    """Publish one event on the flow's subject; ``seq`` orders them per flow."""

    kind: EventKind
    seq: int
    status: str
    stage: str | None = None
    task: str | None = None
    attempt: int | None = None
    # The task's response and error as they were when the event was emitted (a later
    # transition in the same decision, e.g. the next attempt, may already have changed them).
    response: Any = None
    error: TaskError | None = None
    # A running task's last progress (from heartbeats).
    progress: Any = None


@dataclass(frozen=True, slots=True)
class Record:
    """A Kubernetes Event for a flow-level transition or failure."""

    reason: str
    message: str
    type: Literal["Normal", "Warning"] = "Normal"


Effect = Dispatch | CancelNotice | CreateChild | CancelChild | Emit | Record


@dataclass(slots=True)
class Decision:
    status: TaskflowStatus
    effects: list[Effect] = field(default_factory=list)
    # Epoch ms at which the engine wants to be asked again (a deadline, a retry delay).
    wake_at: int | None = None
    changed: bool = False
    # True when status must be written before the effects are performed: dispatches and
    # stage or flow transitions. Task results alone may be written lazily, because the
    # replies they come from stay in the durable reply stream until then.
    durable: bool = False
