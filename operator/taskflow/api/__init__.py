"""The Taskflow resource: spec and status models, durations, CRD generation.

This layer is pure (no I/O) and imports nothing else from the package.
"""

from taskflow.api.durations import format_ms, parse_duration_ms
from taskflow.api.names import API_VERSION, GROUP, KIND, PLURAL, VERSION
from taskflow.api.spec import (
    Options,
    RetryRequest,
    RetryStage,
    Stage,
    Task,
    TaskDetails,
    TaskflowSpec,
    TaskType,
)
from taskflow.api.status import (
    TERMINAL_FLOW_PHASES,
    TERMINAL_TASK_STATUSES,
    AttemptRecord,
    Condition,
    ErrorReason,
    FlowPhase,
    RetryAck,
    StageStatus,
    Status,
    TaskError,
    TaskflowStatus,
    TaskStatus,
    WaitingReason,
)

__all__ = [
    "API_VERSION",
    "GROUP",
    "KIND",
    "PLURAL",
    "TERMINAL_FLOW_PHASES",
    "TERMINAL_TASK_STATUSES",
    "VERSION",
    "AttemptRecord",
    "Condition",
    "ErrorReason",
    "FlowPhase",
    "Options",
    "RetryAck",
    "RetryRequest",
    "RetryStage",
    "Stage",
    "StageStatus",
    "Status",
    "Task",
    "TaskDetails",
    "TaskError",
    "TaskStatus",
    "TaskType",
    "TaskflowSpec",
    "TaskflowStatus",
    "WaitingReason",
    "format_ms",
    "parse_duration_ms",
]
