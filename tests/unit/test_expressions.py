"""Expressions in params and ``when``, by table: typed and interpolated values, errors that name
the expression, and the engine's use of them."""

from __future__ import annotations

from typing import Any

import pytest

from taskflow.api.spec import TaskflowSpec
from taskflow.api.status import ErrorReason, FlowPhase, Status, TaskflowStatus
from taskflow.engine import Decision, Dispatch, Reply, decide
from taskflow.engine.expressions import ExpressionError, problems, resolve

UID = "00000000-0000-0000-0000-0000000000e0"
T0 = 1_700_000_000_000
VALUES = {
    "inputs": {"devices": ["d1", "d2"], "site": "lab"},
    "context": {"team": "a"},
    "stages": {
        "make": {
            "status": "SUCCEEDED",
            "tasks": {
                "group": {
                    "response": {"groupId": "g-42", "size": 2},
                    "status": "SUCCEEDED",
                    "attempt": 0,
                    "error": None,
                }
            },
        }
    },
}


@pytest.mark.parametrize(
    ("params", "want"),
    [
        ("${{ stages.make.tasks.group.response.groupId }}", "g-42"),
        ("${{ stages.make.tasks.group.response.size }}", 2),  # typed, not a string
        ("${{ inputs.devices }}", ["d1", "d2"]),
        (
            "group ${{ stages.make.tasks.group.response.groupId }} at ${{ inputs.site }}",
            "group g-42 at lab",
        ),
        ("n=${{ size(inputs.devices) }} ${{ inputs.devices }}", 'n=2 ["d1", "d2"]'),
        (
            {"a": ["${{ context.team }}", 1, None], "b": {"c": "${{ 1 + 2 }}"}},
            {"a": ["a", 1, None], "b": {"c": 3}},
        ),
        ("no expression", "no expression"),
    ],
)
def test_params_are_resolved_typed_or_interpolated(params: Any, want: Any) -> None:
    assert resolve(params, VALUES) == want


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ("${{ stages.make.tasks.nope.response }}", "no such key"),
        ("${{ inputs.site + 1 }}", r"inputs\.site \+ 1 }}: Unsupported operation"),
        ("${{ 1 + }}", "Syntax error"),
    ],
)
def test_a_runtime_error_names_the_expression(params: str, message: str) -> None:
    with pytest.raises(ExpressionError, match=message):
        resolve(params, VALUES)


def spec(stages: list[dict[str, Any]], **extra: Any) -> TaskflowSpec:
    return TaskflowSpec.model_validate({"stages": stages, **extra})


def task(name: str, **fields: Any) -> dict[str, Any]:
    return {"name": name, "taskDetails": {"serviceId": "svc", "actionName": name}, **fields}


def test_problems_name_the_field_and_the_reason() -> None:
    flow = spec(
        [
            {
                "name": "one",
                "tasks": [task("a", params={"x": "${{ stages.two.tasks.b.response }}"})],
            },
            {
                "name": "two",
                "when": "${{ 1 + }}",
                "tasks": [
                    task("b", params={"y": "${{ stages.gone.tasks.c.response }}", "z": "${{ open"}),
                    task("c", when="stages['one'].tasks.a.status == 'SUCCEEDED'"),
                ],
            },
        ]
    )
    found = problems(flow)
    assert "spec.stages[0].tasks[0].params.x: stage 'two' does not come before stage 'one'" in (
        found
    )
    assert any(p.startswith("spec.stages[1].when: ") and "Syntax error" in p for p in found)
    assert "spec.stages[1].tasks[0].params.y: no stage 'gone' in this flow" in found
    assert "spec.stages[1].tasks[0].params.z: '${{' without its closing '}}'" in found
    assert not [p for p in found if "tasks[1]" in p]  # stages['one'] is an earlier stage


def run(flow: TaskflowSpec, status: TaskflowStatus, now: int, *inputs: Any) -> Decision:
    return decide(
        spec=flow,
        status=status,
        now=now,
        uid=UID,
        generation=1,
        event_subject="e",
        inputs=list(inputs),
    )


def test_a_bad_expression_fails_the_flow_before_anything_is_sent() -> None:
    flow = spec([{"name": "s", "tasks": [task("a", params={"x": "${{ nope( }}"})]}])
    first = run(flow, TaskflowStatus(), T0)
    assert first.status.phase == FlowPhase.FAILED
    assert not [e for e in first.effects if isinstance(e, Dispatch)]
    cond = next(c for c in first.status.conditions if c.type == "Succeeded")
    assert cond.reason == "InvalidExpression" and "spec.stages[0].tasks[0].params.x" in (
        cond.message
    )


def test_values_flow_from_one_stage_to_the_next_and_when_skips() -> None:
    flow = spec(
        [
            {"name": "make", "tasks": [task("group")]},
            {
                "name": "use",
                "tasks": [
                    task(
                        "add",
                        params={
                            "groupId": "${{ stages.make.tasks.group.response.groupId }}",
                            "site": "${{ inputs.site }}",
                        },
                    ),
                    task("audit", when="inputs.site == 'prod'"),
                ],
            },
            {
                "name": "never",
                "when": "stages.make.tasks.group.response.size > 10",
                "tasks": [task("big")],
            },
        ],
        inputs={"site": "lab"},
    )
    first = run(flow, TaskflowStatus(), T0)
    second = run(
        flow,
        first.status,
        T0 + 1,
        Reply(stage="make", task="group", attempt=0, ok=True, data={"groupId": "g-7", "size": 2}),
    )
    add = second.status.stages[1].tasks[0]
    audit = second.status.stages[1].tasks[1]
    assert add.status == Status.RUNNING and add.params == {"groupId": "g-7", "site": "lab"}
    assert audit.status == Status.SKIPPED and audit.skip_reason == (
        "when is false: inputs.site == 'prod'"
    )
    assert [e.task for e in second.effects if isinstance(e, Dispatch)] == ["add"]
    done = run(flow, second.status, T0 + 2, Reply(stage="use", task="add", attempt=0, ok=True))
    never = done.status.stages[2]
    assert never.status == Status.SKIPPED and never.skip_reason is not None
    assert done.status.phase == FlowPhase.SUCCEEDED  # skipped by a condition is not a failure


def test_a_runtime_error_fails_the_task_with_reason_expression_and_no_retry() -> None:
    flow = spec(
        [
            {"name": "make", "tasks": [task("group")]},
            {
                "name": "use",
                "tasks": [
                    task(
                        "add", params={"groupId": "${{ stages.make.tasks.group.response.groupId }}"}
                    )
                ],
            },
        ],
        options={"maxRetries": 3},
    )
    first = run(flow, TaskflowStatus(), T0)
    second = run(
        flow,
        first.status,
        T0 + 1,
        Reply(stage="make", task="group", attempt=0, ok=True, data={"other": 1}),
    )
    add = second.status.stages[1].tasks[0]
    assert add.status == Status.FAILED and add.attempt == 0
    assert add.error is not None and add.error.reason == ErrorReason.EXPRESSION
    assert "stages.make.tasks.group.response.groupId" in add.error.message
    assert second.status.phase == FlowPhase.FAILED


# -- on the real servers -------------------------------------------------------------------------


def test_an_expression_has_at_most_one_comprehension() -> None:
    """The CEL bindings have no cost limit: nested comprehensions could stall the engine."""
    assert resolve("${{ inputs.devices.map(d, d + '!') }}", VALUES) == ["d1!", "d2!"]
    with pytest.raises(ExpressionError, match="at most one"):
        resolve("${{ inputs.devices.map(a, inputs.devices.map(b, a + b)) }}", VALUES)


def fan(**for_each: Any) -> TaskflowSpec:
    return spec(
        [
            {"name": "make", "tasks": [task("group")]},
            {
                "name": "each",
                "tasks": [
                    task(
                        "add",
                        forEach=for_each,
                        params={
                            "device": "${{ item }}",
                            "n": "${{ index }}",
                            "group": "${{ stages.make.tasks.group.response.groupId }}",
                        },
                    )
                ],
            },
            {
                "name": "after",
                "tasks": [
                    task(
                        "sum",
                        params={
                            "got": "${{ stages.each.tasks.add.response }}",
                            "status": "${{ stages.each.tasks.add.status }}",
                        },
                    )
                ],
            },
        ],
        inputs={"devices": ["d0", "d1", "d2"]},
    )


def started(flow: TaskflowSpec) -> Decision:
    first = run(flow, TaskflowStatus(), T0)
    return run(
        flow,
        first.status,
        T0 + 1,
        Reply(stage="make", task="group", attempt=0, ok=True, data={"groupId": "g"}),
    )


def test_for_each_expands_into_entries_each_with_its_item() -> None:
    flow = fan(items="${{ inputs.devices }}", maxParallel=2)
    second = started(flow)
    entries = second.status.stages[1].tasks
    assert [(t.name, t.item, t.index) for t in entries] == [
        ("add[0]", "d0", 0),
        ("add[1]", "d1", 1),
        ("add[2]", "d2", 2),
    ]
    sent = [e.task for e in second.effects if isinstance(e, Dispatch)]
    assert sent == ["add[0]", "add[1]"]  # maxParallel
    assert entries[0].params == {"device": "d0", "n": 0, "group": "g"}
    status = second.status
    for i, now in ((0, 2), (1, 3), (2, 4)):
        status = run(
            flow,
            status,
            T0 + now,
            Reply(stage="each", task=f"add[{i}]", attempt=0, ok=True, data={"i": i}),
        ).status
    total = status.stages[2].tasks[0]
    assert total.params == {"got": [{"i": 0}, {"i": 1}, {"i": 2}], "status": "SUCCEEDED"}


@pytest.mark.parametrize(
    ("items", "reason"),
    [
        ("${{ inputs.devices[0] }}", "not a list"),
        ("${{ inputs.nothing }}", "no such key"),
    ],
)
def test_for_each_items_that_are_not_a_list_fail_the_task(items: str, reason: str) -> None:
    second = started(fan(items=items))
    add = second.status.stages[1].tasks[0]
    assert add.name == "add" and add.status == Status.FAILED
    assert add.error is not None and reason in add.error.message


def test_for_each_over_no_items_is_skipped() -> None:
    second = started(fan(items=[]))
    add = second.status.stages[1].tasks[0]
    assert add.status == Status.SKIPPED and add.skip_reason == "forEach over no items"
    assert second.status.stages[2].tasks[0].status == Status.RUNNING  # the flow goes on


def test_the_webhook_refuses_a_new_flow_whose_expressions_cannot_work() -> None:
    from taskflow.shell.webhook import review

    bad = {
        "uid": "r1",
        "operation": "CREATE",
        "object": {
            "spec": {
                "stages": [
                    {
                        "name": "s",
                        "tasks": [task("a", params={"x": "${{ stages.s.tasks.a.response }}"})],
                    }
                ]
            }
        },
    }
    answer = review(bad)
    assert answer["uid"] == "r1" and answer["allowed"] is False
    assert (
        "spec.stages[0].tasks[0].params.x: stage 's' does not come before stage 's'"
        in (answer["status"]["message"])
    )
    assert review({**bad, "operation": "UPDATE"})["allowed"] is True  # cancel, retry: never
    assert (
        review({"uid": "r2", "operation": "CREATE", "object": {"spec": {"stages": []}}})["allowed"]
        is True
    )  # malformed: the schema's job
