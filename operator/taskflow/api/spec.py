"""The Taskflow spec, as users write it: the seed's ``TaskFlowSchema`` plus ``cancel``/``retry``.

The CRD's OpenAPI schema is generated from these models (``taskflow.api.crd``), so the
bounds and CEL rules declared here are what the API server enforces at ``kubectl apply``.
Field names are camelCase on the wire, as in the seed.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from pydantic.config import JsonValue

from taskflow.api.durations import DURATION_PATTERN, parse_duration_ms

MAX_DURATION_MS = 7 * 24 * 3_600_000
MAX_RETRIES = 100
MAX_STAGES = 50
MAX_TASKS_PER_STAGE = 1000
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]*$"
# A NATS subject token that cannot widen a subscription or add a level: no '.', '*', '>' or space.
TOKEN_PATTERN = r"^[A-Za-z0-9_-]+$"


# int-or-string: JSON Schema applies minimum/maximum to integers only and pattern/maxLength to
# strings only, so one node checks both without CEL (whose cost estimate for a regex, times
# every task of every stage, exceeds the CRD budget).
def _at_most_7_days(value: int | str) -> int | str:
    """The same bound as the schema's, for models built in Python (tests, the client)."""
    if parse_duration_ms(value) > MAX_DURATION_MS:
        raise ValueError("must be at most 7 days")
    return value


Duration = Annotated[
    int | str,
    AfterValidator(_at_most_7_days),
    Field(
        json_schema_extra={
            "x-kubernetes-int-or-string": True,
            "minimum": 0,
            "maximum": MAX_DURATION_MS,
            "maxLength": 32,
            "pattern": DURATION_PATTERN,
            "description": "Milliseconds (0 to 7 days) or a duration like '90s' or '1m30s'.",
            # maximum bounds integers only; a string is bounded by CEL's duration() (no regex,
            # so its cost stays small even for every task of every stage).
            "x-kubernetes-validations": [
                {
                    "rule": "type(self) != string || duration(self) <= duration('168h')",
                    "message": "must be at most 7 days (168h)",
                }
            ],
        }
    ),
]
Name = Annotated[str, Field(min_length=1, max_length=63, pattern=NAME_PATTERN)]
# A task, or a fan-out entry of one: the task's name and the item's index, "add[3]".
ENTRY_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]*(\[[0-9]{1,4}\])?$"
Entry = Annotated[str, Field(min_length=1, max_length=70, pattern=ENTRY_PATTERN)]
# A CEL expression (a ``when``), checked when the flow starts.
When = Annotated[str, Field(min_length=1, max_length=1024)]
FreeForm = Annotated[
    dict[str, Any],
    Field(json_schema_extra={"x-kubernetes-preserve-unknown-fields": True}),
]


class StrictModel(BaseModel):
    """What users write: camelCase aliases accepted, unknown fields refused (the base of
    every spec model of the package's resources)."""

    model_config = ConfigDict(populate_by_name=True, extra="forbid")


_Model = StrictModel


class TaskType(StrEnum):
    ACTION = "ACTION"
    TASKFLOW = "TASKFLOW"


class RetryBackoff(_Model):
    """Each retry of a task waits longer than the one before: ``retryDelay`` times ``factor``
    to the number of retries so far, at most ``maxDelay``, less up to ``jitter`` of it."""

    factor: float | None = Field(
        default=None,
        ge=1,
        le=10,
        description="Each retry waits this many times longer than the one before (default 2).",
    )
    max_delay: Duration | None = Field(
        default=None,
        alias="maxDelay",
        description="The longest wait before a retry (default 5 minutes).",
    )
    jitter: float | None = Field(
        default=None,
        ge=0,
        le=1,
        description="Up to this fraction of each wait is taken off, differently for each task "
        "and attempt, so that many retries spread out (default 0).",
    )


ErrorCode = Annotated[str, Field(min_length=1, max_length=128)]


class Options(_Model):
    """Flow options; a task's own options override them field by field."""

    timeout: Duration | None = Field(
        default=None, description="Time one attempt may take from dispatch to reply."
    )
    max_retries: int | None = Field(
        default=None,
        alias="maxRetries",
        ge=0,
        le=MAX_RETRIES,
        description="Further attempts after a failed or timed-out one.",
    )
    retry_delay: Duration | None = Field(
        default=None, alias="retryDelay", description="Wait before the next attempt."
    )
    when_no_service: Literal["wait", "fail"] | None = Field(
        default=None,
        alias="whenNoService",
        description="When no service instance serves the task's subject: wait (default: sent "
        "again every 0.5 s until the timeout or maxAge) or fail the attempt at once (reason "
        "NoService; retried per maxRetries).",
    )
    heartbeat_timeout: Duration | None = Field(
        default=None,
        alias="heartbeatTimeout",
        description="An attempt with no heartbeat from its service for this long is TIMED_OUT "
        "(reason Heartbeat), however long its timeout.",
    )
    retry_backoff: RetryBackoff | None = Field(
        default=None,
        alias="retryBackoff",
        description="Wait longer before each retry (exponential, capped, with jitter).",
    )
    non_retryable_codes: list[ErrorCode] | None = Field(
        default=None,
        alias="nonRetryableCodes",
        max_length=64,
        description="Error codes that fail the task at once, whatever maxRetries says (as "
        "does a reply with error.retryable false).",
    )
    max_age: Duration | None = Field(
        default=None,
        alias="maxAge",
        description="The task's whole budget from its first dispatch; no attempt starts after it.",
    )
    continue_on_task_failure: bool | None = Field(
        default=None,
        alias="continueOnTaskFailure",
        description="A failed task does not stop the flow; later stages still run.",
    )
    exactly_once_task_execution: bool | None = Field(
        default=None,
        alias="exactlyOnceTaskExecution",
        description="A SUCCEEDED task is never dispatched again.",
    )


class TaskDetails(_Model):
    service_id: str = Field(
        alias="serviceId",
        min_length=1,
        max_length=128,
        pattern=TOKEN_PATTERN,
        description="The NATS service; letters, digits, '-' and '_' only.",
    )
    action_name: str = Field(
        alias="actionName",
        min_length=1,
        max_length=128,
        pattern=TOKEN_PATTERN,
        description="The service's action; letters, digits, '-' and '_' only.",
    )


MAX_FAN_OUT = 1000


def base_name(name: str) -> str:
    """The spec task a status entry belongs to ("add[3]" -> "add")."""
    return name.split("[", 1)[0]


class ForEach(_Model):
    """Run the task once per item: entries ``<task>[<index>]``, each with its own attempts,
    retries and response; the next stage sees their responses as a list."""

    items: Any = Field(
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True},
        description='A list, or a string "${{ expr }}" giving one (at most 1000 items), '
        "evaluated when the stage starts.",
    )
    as_: str = Field(
        default="item",
        alias="as",
        min_length=1,
        max_length=63,
        pattern=r"^[a-z_][A-Za-z0-9_]*$",
        description="The name of the item in the task's expressions (index: its position).",
    )
    max_parallel: int | None = Field(
        default=None,
        alias="maxParallel",
        ge=1,
        le=MAX_FAN_OUT,
        description="Entries running at once, at most (default: all).",
    )


class Concurrency(_Model):
    """At most ``limit`` attempts with the same ``key`` run at once, across every flow of the
    namespace and every operator replica (crash-safe: slots are leases in NATS KV)."""

    key: str = Field(
        min_length=1,
        max_length=256,
        description="A string, or ${{ expr }} (e.g. ${{ item }}: one operation per device).",
    )
    limit: int = Field(default=1, ge=1, le=1000)


class Task(_Model):
    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "self.type != 'ACTION' || has(self.taskDetails)",
                    "message": "taskDetails is required when type is ACTION",
                    "fieldPath": ".taskDetails",
                },
                {
                    "rule": "self.type != 'TASKFLOW' || has(self.taskflow)",
                    "message": "taskflow is required when type is TASKFLOW",
                    "fieldPath": ".taskflow",
                },
                {
                    "rule": "self.type != 'ACTION' || !has(self.taskflow)",
                    "message": "taskflow is only allowed when type is TASKFLOW",
                    "fieldPath": ".taskflow",
                },
                {
                    "rule": "self.type == 'ACTION' || !has(self.forEach)",
                    "message": "forEach is only allowed when type is ACTION",
                    "fieldPath": ".forEach",
                },
            ]
        }
    )

    name: Name
    type: TaskType = TaskType.ACTION
    params: FreeForm | None = Field(
        default=None,
        description="The request body, as JSON; strings may hold ${{ CEL }} expressions "
        "(docs/expressions.md).",
    )
    when: When | None = Field(
        default=None, description="A CEL boolean; false: the task is SKIPPED, the flow goes on."
    )
    for_each: ForEach | None = Field(default=None, alias="forEach")
    concurrency: Concurrency | None = None
    task_details: TaskDetails | None = Field(default=None, alias="taskDetails")
    taskflow: FreeForm | None = Field(
        default=None,
        description="An inline nested taskflow spec (validated when the child is created).",
    )
    options: Options | None = None


class Stage(_Model):
    name: Name
    when: When | None = Field(
        default=None, description="A CEL boolean; false: the stage is SKIPPED, the flow goes on."
    )
    tasks: list[Task] = Field(
        min_length=1,
        max_length=MAX_TASKS_PER_STAGE,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )


class RetryStage(_Model):
    name: Name
    tasks: list[Entry] | None = Field(
        default=None,
        max_length=MAX_TASKS_PER_STAGE,
        description="Tasks of the stage to retry (a fan-out entry: 'add[3]'; 'add': all of "
        "its entries); none means all its tasks.",
    )


class RetryRequest(_Model):
    """A retry of a finished flow; each new ``id`` is acted on exactly once."""

    id: str = Field(
        min_length=1,
        max_length=63,
        pattern=NAME_PATTERN,
        description="Any new value is a new request; re-applying the same id does nothing.",
    )
    stages: list[RetryStage] | None = Field(
        default=None,
        max_length=MAX_STAGES,
        description="Stages (and tasks) to retry; none means the whole flow.",
    )
    failed_only: bool = Field(
        default=False,
        alias="failedOnly",
        description="Keep only FAILED, TIMED_OUT and CANCELLED tasks of the selection.",
    )


_SPEC_RULES: list[JsonValue] = [
    {
        # (A flow made from a template gets its stages once, from the operator.)
        "rule": "!has(oldSelf.stages) || size(oldSelf.stages) == 0 || "
        "(has(self.stages) && self.stages == oldSelf.stages)",
        "message": "stages are immutable once the flow exists: create a new Taskflow",
        "fieldPath": ".stages",
    },
    {
        "rule": "has(self.templateRef) || (has(self.stages) && size(self.stages) > 0)",
        "message": "a flow needs stages, or a templateRef to take them from",
        "fieldPath": ".stages",
    },
    {
        "rule": "!has(oldSelf.stages) || size(oldSelf.stages) == 0 || ("
        "has(self.options) == has(oldSelf.options) && "
        "(!has(self.options) || self.options == oldSelf.options))",
        "message": "options are immutable once the flow exists",
        "fieldPath": ".options",
    },
    {
        "rule": "!has(oldSelf.stages) || size(oldSelf.stages) == 0 || ("
        "has(self.inputs) == has(oldSelf.inputs) && "
        "(!has(self.inputs) || self.inputs == oldSelf.inputs))",
        "message": "inputs are immutable once the flow exists",
        "fieldPath": ".inputs",
    },
    {
        "rule": "!has(self.retry) || !has(self.retry.stages) || "
        "self.retry.stages.all(r, self.stages.exists(s, s.name == r.name))",
        "message": "retry.stages names a stage that is not in spec.stages",
        "fieldPath": ".retry.stages",
    },
]


class Ttl(_Model):
    after_succeeded: Duration | None = Field(default=None, alias="afterSucceeded")
    after_failed: Duration | None = Field(
        default=None, alias="afterFailed", description="Also COMPLETED_WITH_FAILURES."
    )
    after_cancelled: Duration | None = Field(default=None, alias="afterCancelled")


class TemplateRef(_Model):
    name: str = Field(
        min_length=1,
        max_length=253,
        pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$",
        description="A TaskflowTemplate in the flow's namespace.",
    )
    arguments: FreeForm | None = Field(
        default=None, description="Values of the template's parameters, by name."
    )
    resource_version: str | None = Field(
        default=None,
        alias="resourceVersion",
        max_length=64,
        description="Written by the operator: the template's version the flow was made from.",
    )


class TaskflowSpec(_Model):
    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": _SPEC_RULES})

    options: Options | None = None
    context: FreeForm | None = Field(
        default=None, description="Free-form context, passed to nested flows."
    )
    inputs: FreeForm | None = Field(
        default=None, description="Free-form values for expressions (inputs.<name>)."
    )
    stages: list[Stage] = Field(
        default_factory=list,
        max_length=MAX_STAGES,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
        description="The plan; written by the operator from templateRef when that is given.",
    )
    template_ref: TemplateRef | None = Field(
        default=None,
        alias="templateRef",
        description="Run a TaskflowTemplate of this namespace with these arguments; the "
        "operator writes its stages, options and context here when the flow starts.",
    )
    cancel: bool | None = Field(
        default=None, description="true stops the flow; in-flight tasks become CANCELLED."
    )
    suspend: bool | None = Field(
        default=None,
        description="true: nothing new is dispatched (attempts in flight finish and are "
        "recorded); false again resumes. A flow may be created suspended.",
    )
    ttl: Ttl | None = Field(
        default=None,
        description="How long a finished flow is kept before it is deleted (with its children); "
        "its final status goes to the history first.",
    )
    retry: RetryRequest | None = Field(
        default=None, description="A retry request; see the README for the four scopes."
    )

    def task(self, stage: str, name: str) -> Task | None:
        """The spec of a status entry (a fan-out entry's is its task's)."""
        base = base_name(name)
        for s in self.stages:
            if s.name == stage:
                return next((t for t in s.tasks if t.name == base), None)
        return None
