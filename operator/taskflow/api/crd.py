"""Generates the Taskflow CustomResourceDefinition from the pydantic models.

The models are the single source of truth: ``make generate`` writes ``crds/`` from here, and a
unit test fails when the checked-in YAML drifts from what this module produces.
"""

from __future__ import annotations

from typing import Any

import yaml

from taskflow.api import policy
from taskflow.api.names import GROUP, KIND, PLURAL, VERSION
from taskflow.api.spec import TaskflowSpec
from taskflow.api.status import TaskflowStatus

# JSON Schema keywords that a structural OpenAPI v3 schema does not take, or that only
# describe the Python side.
_DROPPED = {"title", "additionalProperties", "$defs", "discriminator"}


def _structural(node: Any, defs: dict[str, Any]) -> Any:
    """Turn pydantic's JSON Schema into a structural schema: refs inlined, nulls dropped."""
    if isinstance(node, list):
        return [_structural(item, defs) for item in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        target = defs[node["$ref"].rsplit("/", 1)[-1]]
        merged = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
        return _structural(merged, defs)
    node = dict(node)
    if "anyOf" in node:
        options = [o for o in node.pop("anyOf") if o.get("type") != "null"]
        if node.get("x-kubernetes-int-or-string"):
            pass  # int-or-string has no type of its own
        elif len(options) == 1:
            return _structural({**options[0], **node}, defs)
        elif options:
            raise ValueError(f"cannot express a union in a structural schema: {options}")
    if node.get("default", 0) is None or isinstance(node.get("default"), list | dict):
        node.pop("default")
    if node.get("type") == "object" and node.get("additionalProperties") is True:
        node["x-kubernetes-preserve-unknown-fields"] = True
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROPPED and not (key == "additionalProperties" and isinstance(value, dict)):
            continue
        if key == "properties":
            out[key] = {name: _structural(sub, defs) for name, sub in value.items()}
        else:
            out[key] = _structural(value, defs)
    if out.get("x-kubernetes-preserve-unknown-fields") and "type" not in out:
        out.pop("additionalProperties", None)
    return out


def openapi_schema(model: type[Any]) -> dict[str, Any]:
    raw = model.model_json_schema(by_alias=True)
    return dict(_structural(raw, raw.get("$defs", {})))


def _definition(
    *,
    kind: str,
    plural: str,
    short: list[str],
    description: str,
    spec: type[Any],
    status: type[Any],
    columns: list[dict[str, str]],
    rules: list[dict[str, str]] | None = None,
    scope: str = "Namespaced",
) -> dict[str, Any]:
    root: dict[str, Any] = {
        "type": "object",
        "description": description,
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": openapi_schema(spec),
            "status": openapi_schema(status),
        },
    }
    if rules:
        root["x-kubernetes-validations"] = rules
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "scope": scope,
            "names": {
                "kind": kind,
                "listKind": f"{kind}List",
                "plural": plural,
                "singular": kind.lower(),
                "shortNames": short,
                "categories": ["taskflows"],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": [
                        *columns,
                        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
                    ],
                    "schema": {"openAPIV3Schema": root},
                }
            ],
        },
    }


def crd() -> dict[str, Any]:
    """The Taskflow CRD as a dict, ready to dump or apply."""
    return _definition(
        kind=KIND,
        plural=PLURAL,
        short=["tf"],
        description="A multi-stage plan of NATS requests.",
        spec=TaskflowSpec,
        status=TaskflowStatus,
        columns=[
            {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
            {"name": "Stage", "type": "string", "jsonPath": ".status.currentStage"},
            {"name": "Progress", "type": "string", "jsonPath": ".status.progress"},
            {"name": "Suspended", "type": "boolean", "jsonPath": ".spec.suspend"},
        ],
    )


def template_crd() -> dict[str, Any]:
    """The TaskflowTemplate CRD: a flow with declared parameters, run by templateRef."""
    from taskflow.api import templates

    return _definition(
        kind=templates.KIND,
        plural=templates.PLURAL,
        short=["tftemplate"],
        description="A Taskflow defined once, with parameters; Taskflows run it by templateRef.",
        spec=templates.TaskflowTemplateSpec,
        status=templates.TaskflowTemplateStatus,
        columns=[],
    )


def cron_crd() -> dict[str, Any]:
    """The CronTaskflow CRD: a Taskflow run on a schedule (CronJob's semantics)."""
    from taskflow.api import schedules

    return _definition(
        kind=schedules.KIND,
        plural=schedules.PLURAL,
        short=["crontf"],
        description="A Taskflow run on a schedule.",
        spec=schedules.CronTaskflowSpec,
        status=schedules.CronTaskflowStatus,
        columns=[
            {"name": "Schedule", "type": "string", "jsonPath": ".spec.schedule"},
            {"name": "Suspend", "type": "boolean", "jsonPath": ".spec.suspend"},
            {"name": "Last", "type": "date", "jsonPath": ".status.lastScheduleTime"},
        ],
    )


def policy_crd() -> dict[str, Any]:
    """The TaskflowPolicy CRD: one per namespace, named ``default``."""
    return _definition(
        kind=policy.KIND,
        plural=policy.PLURAL,
        short=["tfpolicy"],
        description="What the Taskflows of a namespace may call, and as which NATS user.",
        spec=policy.TaskflowPolicySpec,
        status=policy.TaskflowPolicyStatus,
        columns=[
            {
                "name": "Credentials",
                "type": "string",
                "jsonPath": ".spec.natsCredentials.secretName",
            },
            {
                "name": "Connected",
                "type": "string",
                "jsonPath": '.status.conditions[?(@.type=="Connected")].status',
            },
        ],
        rules=[
            {
                "rule": f"self.metadata.name == '{policy.NAME}'",
                "message": f"a namespace has one TaskflowPolicy, named {policy.NAME!r}",
            }
        ],
    )


def limit_crd() -> dict[str, Any]:
    """The ServiceLimit CRD: cluster-scoped, one per service that needs protecting."""
    from taskflow.api import limits

    return _definition(
        kind=limits.KIND,
        plural=limits.PLURAL,
        short=["tflimit"],
        description="How hard the Taskflows of the whole cluster may call one service.",
        spec=limits.ServiceLimitSpec,
        status=limits.ServiceLimitStatus,
        columns=[
            {"name": "Service", "type": "string", "jsonPath": ".spec.serviceId"},
            {"name": "MaxInFlight", "type": "string", "jsonPath": ".spec.maxInFlight"},
            {"name": "Limit", "type": "integer", "jsonPath": ".status.limit"},
            {"name": "Rate", "type": "number", "jsonPath": ".spec.ratePerSecond"},
        ],
        scope="Cluster",
    )


def all_crds() -> dict[str, dict[str, Any]]:
    """Every CRD of the package, by plural."""
    from taskflow.api import limits, schedules, templates

    return {
        PLURAL: crd(),
        policy.PLURAL: policy_crd(),
        templates.PLURAL: template_crd(),
        schedules.PLURAL: cron_crd(),
        limits.PLURAL: limit_crd(),
    }


def render(definition: dict[str, Any] | None = None) -> str:
    header = "# Generated by `make generate` from operator/taskflow/api: do not edit.\n"
    return header + yaml.safe_dump(definition or crd(), sort_keys=False, width=100)
