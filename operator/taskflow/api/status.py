"""The Taskflow status: one vocabulary (the seed's upper-case statuses) for status, events, headers.

Times are RFC 3339 strings with milliseconds, as Kubernetes writes them; headers and events
carry epoch milliseconds instead (see ``taskflow.wire``).
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from pydantic.config import JsonDict

_FREE: JsonDict = {"x-kubernetes-preserve-unknown-fields": True}


class Status(StrEnum):
    """Status of a task or a stage (the seed's vocabulary)."""

    WAITING = "WAITING"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    TIMED_OUT = "TIMED_OUT"
    CANCELLED = "CANCELLED"
    SKIPPED = "SKIPPED"


class FlowPhase(StrEnum):
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    # Finished under continueOnTaskFailure with at least one task not SUCCEEDED.
    COMPLETED_WITH_FAILURES = "COMPLETED_WITH_FAILURES"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"


class WaitingReason(StrEnum):
    """Why a task waits for something other than its turn (``status.waitingReason``).

    The field stays a plain string in the schema; these are the values the engine writes.
    """

    # A failed attempt's retry is due at ``notBefore`` (the task is WAITING).
    RETRY_DELAY = "RetryDelay"
    # Nobody listened on the task's subject: the same attempt is redelivered at ``notBefore``
    # (WAITING), until its deadline.
    NO_RESPONDERS = "NoResponders"
    # The service replied and started child flows: the task ends when they do (RUNNING).
    CHILDREN = "Children"
    # Its concurrency key has ``limit`` attempts running already, in any flow (WAITING).
    THROTTLED = "Throttled"


class ErrorReason(StrEnum):
    """Where a task's error came from (``TaskError.reason``).

    The field stays a plain string in the schema; these are the values the operator writes.
    """

    # The service's reply said it failed (a failure body or the Services API error headers).
    SERVICE = "Service"
    # No reply (or nobody listening) within the attempt's timeout.
    TIMEOUT = "Timeout"
    # The task's maxAge passed before an attempt could start or its child flows ended.
    EXPIRED = "Expired"
    # The reply could not be used (malformed, too large, too deep, not recordable, ...).
    BAD_REPLY = "BadReply"
    # A child flow failed or could not be created, or the reply named more child flows
    # than allowed.
    CHILD = "Child"
    # The flow was cancelled while the task ran or waited.
    CANCELLED = "Cancelled"
    # The namespace's TaskflowPolicy does not allow the task's service and action: not
    # retried (it would be refused again); a flow retry runs it once the policy allows it.
    POLICY_DENIED = "PolicyDenied"
    # An expression of the task (its params or its when) could not be evaluated.
    EXPRESSION = "Expression"
    # Nobody served the task's subject, and the task says whenNoService: fail.
    NO_SERVICE = "NoService"
    # No heartbeat from the service within the task's heartbeatTimeout.
    HEARTBEAT = "Heartbeat"


TERMINAL_TASK_STATUSES = frozenset(
    {Status.SUCCEEDED, Status.FAILED, Status.TIMED_OUT, Status.CANCELLED, Status.SKIPPED}
)
FAILED_TASK_STATUSES = frozenset({Status.FAILED, Status.TIMED_OUT, Status.CANCELLED})
TERMINAL_FLOW_PHASES = frozenset(
    {
        FlowPhase.SUCCEEDED,
        FlowPhase.COMPLETED_WITH_FAILURES,
        FlowPhase.FAILED,
        FlowPhase.CANCELLED,
    }
)


class _Model(BaseModel):
    model_config = ConfigDict(populate_by_name=True, extra="ignore")


class TaskError(_Model):
    message: str = Field(max_length=4096)
    code: str | None = Field(default=None, max_length=256)
    # Where the error came from: an ``ErrorReason`` (Service, Timeout, Expired, BadReply, ...).
    reason: str | None = Field(default=None, max_length=64)
    data: Any | None = Field(default=None, json_schema_extra=_FREE)
    # The service said so (``error.retryable: false``): no retry of this attempt.
    retryable: bool | None = None


class AttemptRecord(_Model):
    """One finished attempt, kept so that retries never erase history."""

    attempt: int
    status: Status
    start_time: str | None = Field(default=None, alias="startTime")
    end_time: str | None = Field(default=None, alias="endTime")
    error: TaskError | None = None
    # A reply that arrived after the attempt had already ended (e.g. after a cancel).
    late_reply: bool | None = Field(default=None, alias="lateReply")


class TaskStatus(_Model):
    name: str
    id: str
    status: Status = Status.WAITING
    attempt: int = 0
    response: Any | None = Field(default=None, json_schema_extra=_FREE)
    # Set instead of ``response`` when the reply was too large to keep in the object.
    response_ref: str | None = Field(default=None, alias="responseRef")
    error: TaskError | None = None
    start_time: str | None = Field(default=None, alias="startTime")
    end_time: str | None = Field(default=None, alias="endTime")
    # The current attempt: when it was sent and when it times out.
    dispatch_time: str | None = Field(default=None, alias="dispatchTime")
    deadline: str | None = None
    # With heartbeatTimeout: the attempt times out at this time unless its service heartbeats.
    heartbeat_deadline: str | None = Field(default=None, alias="heartbeatDeadline")
    # A fan-out entry ("<task>[<index>]"): its item and index.
    item: Any | None = Field(default=None, json_schema_extra=_FREE)
    index: int | None = None
    # The params of the current attempt as sent, when the spec's hold expressions.
    params: Any | None = Field(default=None, json_schema_extra=_FREE)
    # Why a SKIPPED task was skipped, when its (or its stage's) ``when`` was false.
    skip_reason: str | None = Field(default=None, alias="skipReason", max_length=1024)
    # The last progress a heartbeat carried (any JSON, bounded), and when it was published.
    progress: Any | None = Field(default=None, json_schema_extra=_FREE)
    progress_time: str | None = Field(default=None, alias="progressTime")
    # Next attempt (or redelivery) not before this time.
    not_before: str | None = Field(default=None, alias="notBefore")
    # First dispatch + maxAge: no attempt starts after it.
    expires_at: str | None = Field(default=None, alias="expiresAt")
    # A ``WaitingReason`` (RetryDelay, NoResponders, Children), or None.
    waiting_reason: str | None = Field(default=None, alias="waitingReason")
    # Attempt number at which the current run began (a flow retry starts a new run), so
    # maxRetries counts per run while attempt numbers keep counting.
    run_start_attempt: int = Field(default=0, alias="runStartAttempt")
    attempts: list[AttemptRecord] = Field(default_factory=list)
    nested_taskflows: list[str] = Field(default_factory=list, alias="nestedTaskflows")
    nested_active_running_taskflow_ids: list[str] = Field(
        default_factory=list, alias="nestedActiveRunningTaskFlowIds"
    )


class StageStatus(_Model):
    name: str
    id: str
    status: Status = Status.WAITING
    start_time: str | None = Field(default=None, alias="startTime")
    end_time: str | None = Field(default=None, alias="endTime")
    skip_reason: str | None = Field(default=None, alias="skipReason", max_length=1024)
    tasks: list[TaskStatus] = Field(default_factory=list)


class Condition(_Model):
    """A Kubernetes API convention condition."""

    type: str
    status: str
    reason: str
    message: str = ""
    last_transition_time: str = Field(alias="lastTransitionTime")
    observed_generation: int | None = Field(default=None, alias="observedGeneration")


class RetryAck(_Model):
    """The last ``spec.retry`` acted on: its id, and whether it was accepted."""

    id: str
    accepted: bool
    message: str = ""
    time: str


class TaskflowStatus(_Model):
    phase: FlowPhase = FlowPhase.PENDING
    taskflow_id: str | None = Field(default=None, alias="taskflowId")
    event_subscription: str | None = Field(default=None, alias="eventSubscription")
    observed_generation: int | None = Field(default=None, alias="observedGeneration")
    # Human-readable for `kubectl get`: "2/3 addApplianceToGroups" and "7/11".
    current_stage: str | None = Field(default=None, alias="currentStage")
    progress: str | None = None
    created_at: int | None = Field(
        default=None, alias="createdAt", description="Epoch ms, as headers carry it."
    )
    start_time: str | None = Field(default=None, alias="startTime")
    completion_time: str | None = Field(default=None, alias="completionTime")
    stages: list[StageStatus] = Field(default_factory=list)
    conditions: list[Condition] = Field(default_factory=list)
    retry: RetryAck | None = None
    # Set when a cancel was acted on (or recorded as a no-op on a finished flow).
    cancelled_at: str | None = Field(default=None, alias="cancelledAt")
    # Since when spec.suspend has held new dispatches back (None: not suspended).
    suspended_at: str | None = Field(default=None, alias="suspendedAt")
    last_event_seq: int = Field(default=0, alias="lastEventSeq")
    # Counts the operator's records of this status (API writes and the write-ahead copy in
    # NATS); after a restart the copy with the higher count is the newer one.
    write_seq: int = Field(
        default=0,
        alias="writeSeq",
        description="How many times the operator has recorded this status; after a restart "
        "it tells the newer of the API's copy and the write-ahead copy in NATS.",
    )
    parent: dict[str, str] | None = None
