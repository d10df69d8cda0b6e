"""The label and annotations that link a child flow to its parent task: part of the resource's
API (the operator, the SDK, the NATS API and the admission policy all read or write them), so
defined once, here."""

# Labels and annotations under this prefix are the operator's: refused at admission except on a
# child flow owned by the parent it names, and dropped from what a caller of produce gives.
OWN_METADATA = "taskflow.dev/"
PARENT_UID = "taskflow.dev/parent-uid"  # label: list a flow's children by selector
PARENT_NAME = "taskflow.dev/parent-name"  # label
PARENT_TASK = "taskflow.dev/parent-task"  # annotation: "<stage>.<task>"
PARENT_ATTEMPT = "taskflow.dev/parent-attempt"  # annotation: the parent task's attempt
PARENT_CONTEXT = "taskflow.dev/parent-context"  # annotation: the parent's execution context
DEPTH = "taskflow.dev/depth"  # annotation: 1 for a child of a top-level flow
