"""Expressions on the real servers: a plain nats-py service gets the values of the stage before;
a false ``when`` skips; a bad expression fails the flow before anything is sent."""

from __future__ import annotations

import json

import pytest

from conftest import Flows, serve, task_status

# -- on the real servers -------------------------------------------------------------------------


@pytest.mark.integration
async def test_a_plain_service_gets_the_values_of_the_stage_before(
    operator, flows: Flows, nc, svc: str
) -> None:
    await serve(nc, f"{svc}.create", lambda m: {"success": True, "data": {"groupId": "g-9"}})
    added = await serve(nc, f"{svc}.add")
    body = {
        "inputs": {"devices": ["d1", "d2", "d3"], "site": "lab"},
        "stages": [
            {
                "name": "make",
                "tasks": [
                    {"name": "group", "taskDetails": {"serviceId": svc, "actionName": "create"}}
                ],
            },
            {
                "name": "use",
                "tasks": [
                    {
                        "name": "add",
                        "taskDetails": {"serviceId": svc, "actionName": "add"},
                        "params": {
                            "groupId": "${{ stages.make.tasks.group.response.groupId }}",
                            "devices": "${{ inputs.devices }}",
                            "label": "${{ inputs.site }}-${{ size(inputs.devices) }}",
                        },
                    },
                    {
                        "name": "prod-only",
                        "when": "inputs.site == 'prod'",
                        "taskDetails": {"serviceId": svc, "actionName": "add"},
                    },
                ],
            },
        ],
    }
    await flows.create(body, "f")
    done = await flows.wait("f")
    assert done["status"]["phase"] == "SUCCEEDED"
    assert [json.loads(m.data) for m in added.requests] == [
        {"groupId": "g-9", "devices": ["d1", "d2", "d3"], "label": "lab-3"}
    ]
    add = task_status(done, "use", "add")
    assert add["params"]["groupId"] == "g-9"  # recorded with the attempt
    skipped = task_status(done, "use", "prod-only")
    assert skipped["status"] == "SKIPPED" and "inputs.site == 'prod'" in skipped["skipReason"]
    # The seed's previousStageRes header is as it was.
    context = json.loads(added.requests[0].headers["taskflowExecutionContext"])
    assert context["previousStageRes"][0]["response"]["data"] == {"groupId": "g-9"}


@pytest.fixture
def without_webhook(stack, kube):  # type: ignore[no-untyped-def]
    """As on a cluster where the webhook is not installed (or the operator is down)."""
    from kubernetes import client

    from taskflow.api.admission import WEBHOOK_NAME
    from taskflow.devstack.servers import install_webhook

    client.AdmissionregistrationV1Api(kube).delete_validating_webhook_configuration(WEBHOOK_NAME)
    try:
        yield
    finally:
        install_webhook(
            stack.kubeconfig,
            port=stack.webhook_port,
            ca=stack.control_plane.workdir / "pki" / "ca.crt",
        )


@pytest.mark.integration
async def test_a_bad_expression_fails_the_flow_and_nothing_is_sent(
    operator, flows: Flows, nc, svc: str, without_webhook: None
) -> None:
    """Without the webhook, the same check fails the flow when it starts."""
    seen = await serve(nc, f"{svc}.do")
    await flows.create(
        {
            "stages": [
                {
                    "name": "s",
                    "tasks": [
                        {
                            "name": "a",
                            "taskDetails": {"serviceId": svc, "actionName": "do"},
                            "params": {"x": "${{ stages.later.tasks.b.response }}"},
                        }
                    ],
                },
                {
                    "name": "later",
                    "tasks": [{"name": "b", "taskDetails": {"serviceId": svc, "actionName": "do"}}],
                },
            ]
        },
        "f",
    )
    done = await flows.wait("f")
    assert done["status"]["phase"] == "FAILED"
    cond = next(c for c in done["status"]["conditions"] if c["type"] == "Succeeded")
    assert cond["reason"] == "InvalidExpression"
    assert (
        "spec.stages[0].tasks[0].params.x: stage 'later' does not come before stage 's'"
        in (cond["message"])
    )
    assert seen.requests == []


@pytest.mark.integration
async def test_a_bad_expression_is_refused_at_apply(operator, flows: Flows, svc: str) -> None:
    from kubernetes.client.exceptions import ApiException

    with pytest.raises(ApiException) as refused:
        await flows.create(
            {
                "stages": [
                    {
                        "name": "s",
                        "tasks": [
                            {
                                "name": "a",
                                "taskDetails": {"serviceId": svc, "actionName": "do"},
                                "params": {
                                    "x": "${{ 1 + }}",
                                    "y": "${{ stages.nope.tasks.b.response }}",
                                },
                            }
                        ],
                    }
                ]
            },
            "f",
        )
    message = json.loads(refused.value.body)["message"]
    assert 'admission webhook "expressions.taskflow.dev" denied the request' in message
    assert "spec.stages[0].tasks[0].params.x: " in message and "Syntax error" in message
    assert "spec.stages[0].tasks[0].params.y: no stage 'nope' in this flow" in message
    assert await flows.list() == []


@pytest.mark.integration
async def test_an_expression_reads_a_response_kept_in_the_object_store(
    operator, flows: Flows, nc, svc: str
) -> None:
    """A response over the inline limit (32 KiB) is kept in the object store; a later
    stage's expression still reads it."""
    big = {"groupId": "g-big", "padding": "x" * 60_000}
    await serve(nc, f"{svc}.create", lambda m: {"success": True, "data": big})
    added = await serve(nc, f"{svc}.add")
    await flows.create(
        {
            "stages": [
                {
                    "name": "make",
                    "tasks": [
                        {"name": "group", "taskDetails": {"serviceId": svc, "actionName": "create"}}
                    ],
                },
                {
                    "name": "use",
                    "tasks": [
                        {
                            "name": "add",
                            "taskDetails": {"serviceId": svc, "actionName": "add"},
                            "params": {
                                "groupId": "${{ stages.make.tasks.group.response.groupId }}",
                                "size": "${{ size(stages.make.tasks.group.response.padding) }}",
                            },
                        }
                    ],
                },
            ]
        },
        "f",
    )
    done = await flows.wait("f")
    assert done["status"]["phase"] == "SUCCEEDED", json.dumps(done["status"]["stages"])[:3000]
    assert task_status(done, "make", "group")["responseRef"].startswith("nats-object://")
    assert [json.loads(m.data) for m in added.requests] == [{"groupId": "g-big", "size": 60000}]
