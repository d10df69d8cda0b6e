"""The ValidatingAdmissionPolicies of ``kubectl apply``: parent links, and tenant policies.

Parent links: anyone who may create a Taskflow may write its labels. The operator never trusts
the label alone (a link needs the owner reference too, shell and wire check it), and this
policy says so at admission: ``taskflow.dev/*`` labels and annotations are the operator's, and
a flow may carry any only as a child, with ``taskflow.dev/parent-uid`` and an owner reference to
that very Taskflow, as the operator, the SDK and the NATS API write them.

Tenant policies: a new Taskflow may call only what its namespace's TaskflowPolicy ``default``
allows (the policy's parameter; ``parameterNotFoundAction`` says what a namespace without one
gets). Only CREATE: stages are immutable, and a flow whose services a tightened policy no longer
allows must still be cancellable (the engine refuses its dispatches).

The chart ships both (``files/``, written by ``make generate``) and the dev stack installs them.
"""

from __future__ import annotations

from typing import Any

import yaml

from taskflow.api import policy as tenant
from taskflow.api.links import OWN_METADATA, PARENT_UID
from taskflow.api.names import GROUP, VERSION

NAME = "taskflow.dev-parent-links"

# CEL: the taskflow.dev/* labels and annotations a flow carries (keys), and whether it is a
# child owned by the Taskflow whose uid its parent label names.
_OURS = (
    f"(has(object.metadata.labels) ? object.metadata.labels.filter(k, "
    f"k.startsWith('{OWN_METADATA}')) : []) + (has(object.metadata.annotations) ? "
    f"object.metadata.annotations.filter(k, k.startsWith('{OWN_METADATA}')) : [])"
)
_RULE = (
    "size(variables.ours) == 0 || (has(object.metadata.labels) && "
    f"'{PARENT_UID}' in object.metadata.labels && "
    "has(object.metadata.ownerReferences) && object.metadata.ownerReferences.exists(o, "
    f"o.kind == 'Taskflow' && o.uid == object.metadata.labels['{PARENT_UID}']))"
)


def policy() -> list[dict[str, Any]]:
    """The policy and its binding (Deny), as Kubernetes objects."""
    return [
        {
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "ValidatingAdmissionPolicy",
            "metadata": {"name": NAME},
            "spec": {
                "failurePolicy": "Fail",
                "matchConstraints": {
                    "resourceRules": [
                        {
                            "apiGroups": [GROUP],
                            "apiVersions": ["*"],
                            "operations": ["CREATE", "UPDATE"],
                            "resources": ["taskflows"],
                        }
                    ]
                },
                "variables": [{"name": "ours", "expression": _OURS}],
                "validations": [
                    {
                        "expression": _RULE,
                        "messageExpression": f"'{OWN_METADATA}* labels and annotations (' + "
                        "variables.ours.join(', ') + ') are the operator\\'s: "
                        f"only a child flow carries them, with {PARENT_UID} "
                        "and an ownerReference to that Taskflow'",
                        "reason": "Forbidden",
                    }
                ],
            },
        },
        {
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "ValidatingAdmissionPolicyBinding",
            "metadata": {"name": NAME},
            "spec": {"policyName": NAME, "validationActions": ["Deny"]},
        },
    ]


TENANT_NAME = "taskflow.dev-tenant-policy"

# Per stage, "stage/task calls service.action" for each ACTION task the policy does not allow
# (a list of lists: CEL has no flatten). The message names them, not just "denied".
_DENIED = (
    "object.spec.stages.map(s, s.tasks.filter(t, has(t.taskDetails) && "
    "!params.spec.services.exists(g, (g.serviceId == '*' || "
    "g.serviceId == t.taskDetails.serviceId) && (!has(g.actions) || "
    "g.actions.exists(a, a == '*' || a == t.taskDetails.actionName)))).map(t, "
    "s.name + '/' + t.name + ' calls ' + t.taskDetails.serviceId + '.' + "
    "t.taskDetails.actionName))"
)


def tenant_policy(*, require: bool = False) -> list[dict[str, Any]]:
    """The policy (its parameter: the namespace's TaskflowPolicy ``default``) and its binding;
    ``require``: a namespace without one may create no Taskflow."""
    return [
        {
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "ValidatingAdmissionPolicy",
            "metadata": {"name": TENANT_NAME},
            "spec": {
                "failurePolicy": "Fail",
                "paramKind": {"apiVersion": f"{GROUP}/{VERSION}", "kind": tenant.KIND},
                "matchConstraints": {
                    "resourceRules": [
                        {
                            "apiGroups": [GROUP],
                            "apiVersions": ["*"],
                            "operations": ["CREATE"],
                            "resources": ["taskflows"],
                        }
                    ]
                },
                "variables": [{"name": "denied", "expression": _DENIED}],
                "validations": [
                    {
                        # (a flow made from a template has no stages yet: the engine checks
                        # its tasks before each dispatch)
                        "expression": "!has(params.spec.services) || !has(object.spec.stages) || "
                        "variables.denied.all(l, size(l) == 0)",
                        "messageExpression": f"'TaskflowPolicy {tenant.NAME} of namespace ' + "
                        "object.metadata.namespace + ' does not allow: ' + "
                        "variables.denied.filter(l, size(l) > 0)"
                        ".map(l, l.join(', ')).join(', ')",
                        "reason": "Forbidden",
                    }
                ],
            },
        },
        {
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "ValidatingAdmissionPolicyBinding",
            "metadata": {"name": TENANT_NAME},
            "spec": {
                "policyName": TENANT_NAME,
                "paramRef": {
                    "name": tenant.NAME,
                    "parameterNotFoundAction": "Deny" if require else "Allow",
                },
                "validationActions": ["Deny"],
            },
        },
    ]


def render(objects: list[dict[str, Any]] | None = None) -> str:
    """The chart's copy: a YAML list (the chart names the objects after its release)."""
    return (
        "# Generated by `make generate` from operator/taskflow/api/admission.py.\n"
        + yaml.safe_dump(policy() if objects is None else objects, sort_keys=False)
    )


WEBHOOK_NAME = "expressions.taskflow.dev"
WEBHOOK_PATH = "/validate-taskflow"


def expression_webhook(*, client_config: dict[str, Any]) -> dict[str, Any]:
    """The ValidatingWebhookConfiguration of the operator's webhook (``shell/webhook.py``):
    new Taskflows' expressions checked at apply. ``Ignore`` on failure: with the operator down
    a flow is admitted, and the same check fails it when it starts."""
    return {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingWebhookConfiguration",
        "metadata": {"name": WEBHOOK_NAME},
        "webhooks": [
            {
                "name": WEBHOOK_NAME,
                "clientConfig": client_config,
                "rules": [
                    {
                        "apiGroups": [GROUP],
                        "apiVersions": ["*"],
                        "operations": ["CREATE"],
                        "resources": ["taskflows"],
                        "scope": "Namespaced",
                    }
                ],
                "admissionReviewVersions": ["v1"],
                "sideEffects": "None",
                "failurePolicy": "Ignore",
                "timeoutSeconds": 5,
            }
        ],
    }


def render_one(obj: dict[str, Any]) -> str:
    """The chart's copy of one object (the chart fills in its name and clientConfig)."""
    return (
        "# Generated by `make generate` from operator/taskflow/api/admission.py.\n"
        + yaml.safe_dump(obj, sort_keys=False)
    )
