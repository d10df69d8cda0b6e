"""How a child flow is linked to its parent task: the label and annotations the operator writes
on inline children and the SDK/NATS API write on children a service starts. One definition, so
every writer and reader agrees."""

PARENT_UID = "taskflow.dev/parent-uid"  # label: list a flow's children by selector
PARENT_NAME = "taskflow.dev/parent-name"  # label
PARENT_TASK = "taskflow.dev/parent-task"  # annotation: "<stage>.<task>"
PARENT_ATTEMPT = "taskflow.dev/parent-attempt"  # annotation: the parent task's attempt
PARENT_CONTEXT = "taskflow.dev/parent-context"  # annotation: the parent's execution context
DEPTH = "taskflow.dev/depth"  # annotation: 1 for a child of a top-level flow
