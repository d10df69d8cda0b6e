"""TaskflowPolicy's pure half: what a policy allows, how the engine refuses a task before it
is sent, the subject template's {namespace}, and the generated CRD and admission policy."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from taskflow.api import admission
from taskflow.api.crd import policy_crd
from taskflow.api.policy import TaskflowPolicySpec, no_policy_refusal
from taskflow.api.spec import TaskflowSpec
from taskflow.api.status import FlowPhase, Status, TaskflowStatus
from taskflow.engine import POLICY_DENIED, Dispatch, Reply, decide
from taskflow.wire.subjects import Subjects

UID = "00000000-0000-0000-0000-00000000000a"
T0 = 1_700_000_000_000


def policy(*grants: dict[str, Any]) -> TaskflowPolicySpec:
    return TaskflowPolicySpec.model_validate({"services": list(grants)})


def test_a_grant_names_a_service_and_some_or_all_of_its_actions() -> None:
    p = policy({"serviceId": "devices", "actions": ["configure"]}, {"serviceId": "groups"})
    assert p.refusal("devices", "configure") is None
    assert p.refusal("groups", "anything") is None
    refused = p.refusal("devices", "wipe")
    assert refused is not None and "devices.wipe" in refused and "'default'" in refused
    assert p.refusal("billing", "charge") is not None


def test_wildcards_and_the_empty_and_absent_lists() -> None:
    assert policy({"serviceId": "*", "actions": ["read"]}).refusal("any", "read") is None
    assert policy({"serviceId": "*", "actions": ["read"]}).refusal("any", "write") is not None
    assert policy({"serviceId": "s", "actions": ["*"]}).refusal("s", "x") is None
    assert TaskflowPolicySpec.model_validate({}).refusal("s", "x") is None  # no list: any
    assert policy().refusal("s", "x") is not None  # an empty list: nothing
    assert "has no TaskflowPolicy" in no_policy_refusal("s", "x")


@pytest.mark.parametrize(
    "grant",
    [
        {"serviceId": "a.b"},
        {"serviceId": "a>"},
        {"serviceId": ""},
        {"serviceId": "a", "actions": ["x y"]},
        {"serviceId": "a", "extra": 1},
    ],
)
def test_grants_are_nats_tokens_or_a_star(grant: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        policy(grant)


def spec(*tasks: tuple[str, str], retries: int = 3) -> TaskflowSpec:
    return TaskflowSpec.model_validate(
        {
            "options": {"maxRetries": retries, "retryDelay": 0},
            "stages": [
                {
                    "name": "s1",
                    "tasks": [
                        {"name": f"t{i}", "taskDetails": {"serviceId": s, "actionName": a}}
                        for i, (s, a) in enumerate(tasks)
                    ],
                }
            ],
        }
    )


def test_the_engine_refuses_a_task_before_sending_it_and_does_not_retry_it() -> None:
    flow = spec(("devices", "configure"), ("billing", "charge"))
    only_devices = policy({"serviceId": "devices"})
    first = decide(
        spec=flow,
        status=TaskflowStatus(),
        now=T0,
        uid=UID,
        generation=1,
        event_subject="e",
        refuse=only_devices.refusal,
    )
    dispatched = [e for e in first.effects if isinstance(e, Dispatch)]
    assert [d.task for d in dispatched] == ["t0"]
    t1 = first.status.stages[0].tasks[1]
    assert t1.status == Status.FAILED and t1.attempt == 0  # retries left, none used
    assert t1.error is not None and t1.error.reason == POLICY_DENIED
    assert "billing.charge" in t1.error.message
    assert [a.error.reason for a in t1.attempts if a.error] == [POLICY_DENIED]
    done = decide(
        spec=flow,
        status=first.status,
        now=T0 + 10,
        uid=UID,
        generation=1,
        event_subject="e",
        refuse=only_devices.refusal,
        inputs=[Reply(stage="s1", task="t0", attempt=0, ok=True, data={})],
    )
    assert done.status.phase == FlowPhase.FAILED
    assert not [e for e in done.effects if isinstance(e, Dispatch)]


def test_no_refusal_means_every_task_is_sent() -> None:
    flow = spec(("devices", "configure"), ("billing", "charge"))
    first = decide(
        spec=flow, status=TaskflowStatus(), now=T0, uid=UID, generation=1, event_subject="e"
    )
    assert len([e for e in first.effects if isinstance(e, Dispatch)]) == 2


def test_a_retry_is_refused_again_when_the_policy_tightened_meanwhile() -> None:
    flow = spec(("devices", "configure"), retries=0)
    first = decide(
        spec=flow, status=TaskflowStatus(), now=T0, uid=UID, generation=1, event_subject="e"
    )
    failed = decide(
        spec=flow,
        status=first.status,
        now=T0 + 5,
        uid=UID,
        generation=1,
        event_subject="e",
        inputs=[Reply(stage="s1", task="t0", attempt=0, ok=False)],
    )
    assert failed.status.phase == FlowPhase.FAILED
    retried = TaskflowSpec.model_validate(
        {**flow.model_dump(by_alias=True, exclude_none=True), "retry": {"id": "r1"}}
    )
    again = decide(
        spec=retried,
        status=failed.status,
        now=T0 + 10,
        uid=UID,
        generation=2,
        event_subject="e",
        refuse=policy().refusal,
    )
    assert not [e for e in again.effects if isinstance(e, Dispatch)]
    task = again.status.stages[0].tasks[0]
    assert task.status == Status.FAILED and task.error and task.error.reason == POLICY_DENIED


def test_the_subject_template_may_name_the_namespace() -> None:
    subjects = Subjects(template="{namespace}.{serviceId}.{actionName}")
    assert subjects.template_problem() is None
    assert subjects.request("svc", "do", "team-a") == "team-a.svc.do"
    assert subjects.request("svc", "do") == "*.svc.do"  # what a service of every namespace hears
    assert "must contain {serviceId}" in (
        Subjects(template="x.{actionName}").template_problem() or ""
    )
    assert "not tenant" in (Subjects(template="{tenant}.{serviceId}").template_problem() or "")
    assert "wildcard" in (Subjects(template="{serviceId}.>").template_problem() or "")
    assert "malformed" in (Subjects(template="{serviceId").template_problem() or "")


def test_the_policy_crd_allows_one_policy_per_namespace_named_default() -> None:
    root = policy_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    assert root["x-kubernetes-validations"][0]["rule"] == "self.metadata.name == 'default'"
    spec_schema = root["properties"]["spec"]["properties"]
    assert spec_schema["services"]["maxItems"] == 256
    assert spec_schema["natsCredentials"]["required"] == ["secretName"]


def test_the_tenant_admission_policy_takes_the_namespace_policy_as_its_parameter() -> None:
    vap, binding = admission.tenant_policy()
    assert vap["spec"]["paramKind"]["kind"] == "TaskflowPolicy"
    assert vap["spec"]["matchConstraints"]["resourceRules"][0]["operations"] == ["CREATE"]
    assert binding["spec"]["paramRef"] == {"name": "default", "parameterNotFoundAction": "Allow"}
    required = admission.tenant_policy(require=True)[1]
    assert required["spec"]["paramRef"]["parameterNotFoundAction"] == "Deny"
