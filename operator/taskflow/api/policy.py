"""TaskflowPolicy: what the flows of one namespace may call, and as whom on NATS.

A platform team runs one operator for many teams. Each team's namespace may hold one
TaskflowPolicy, named ``default``, written by the platform team (grant no tenant write access
to it):

- ``services`` lists the serviceIds (and, for each, the actions) that the namespace's flows
  may call. It is enforced twice: at ``kubectl apply`` by a ValidatingAdmissionPolicy whose
  parameter is this object (``admission.py``), and again by the engine before each dispatch
  (a flow created before the policy changed, or with admission off, is refused then).
- ``natsCredentials`` names a Secret in the operator's namespace with this namespace's NATS
  credentials. The operator then dispatches, reads replies and publishes events for the
  namespace's flows as that NATS user, in its account, so NATS account exports and imports
  decide who may call what. The Secret must list the namespace in its
  ``taskflow.dev/namespaces`` annotation: naming a Secret is not enough to use it.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from taskflow.api.spec import StrictModel as _Model
from taskflow.api.status import Condition

NAME = "default"
KIND = "TaskflowPolicy"
PLURAL = "taskflowpolicies"
# On a credentials Secret: the namespaces (comma-separated) whose flows may use it.
SECRET_NAMESPACES = "taskflow.dev/namespaces"
MAX_SERVICES = 256
MAX_ACTIONS = 128
# A serviceId or an action, or "*" for any.
_GRANT_PATTERN = r"^([A-Za-z0-9_-]+|\*)$"
Grant = Annotated[str, Field(min_length=1, max_length=128, pattern=_GRANT_PATTERN)]
_SECRET_PATTERN = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"


class ServiceGrant(_Model):
    service_id: str = Field(
        alias="serviceId",
        min_length=1,
        max_length=128,
        pattern=_GRANT_PATTERN,
        description="A serviceId flows here may call, or '*' for any.",
    )
    actions: list[Grant] | None = Field(
        default=None,
        max_length=MAX_ACTIONS,
        description="Its actions flows here may call ('*': any); absent: every action.",
    )

    def grants(self, service_id: str, action_name: str) -> bool:
        if self.service_id not in ("*", service_id):
            return False
        return self.actions is None or "*" in self.actions or action_name in self.actions


class NatsCredentials(_Model):
    secret_name: str = Field(
        alias="secretName",
        min_length=1,
        max_length=253,
        pattern=_SECRET_PATTERN,
        description="A Secret in the operator's namespace, annotated "
        f"{SECRET_NAMESPACES} with this namespace, holding 'creds' (a .creds "
        "file), 'nkey' (a seed), 'token', or 'user' and 'password'.",
    )


class TaskflowPolicySpec(_Model):
    services: list[ServiceGrant] | None = Field(
        default=None,
        max_length=MAX_SERVICES,
        description="What this namespace's flows may call; absent: any service, [] none.",
    )
    nats_credentials: NatsCredentials | None = Field(
        default=None,
        alias="natsCredentials",
        description="The NATS identity the operator uses for this namespace's flows; absent: "
        "the operator's own.",
    )

    def refusal(self, service_id: str, action_name: str) -> str | None:
        """Why a task calling ``service_id``/``action_name`` may not run here, or None."""
        if self.services is None or any(g.grants(service_id, action_name) for g in self.services):
            return None
        return (
            f"TaskflowPolicy {NAME!r} of this namespace does not allow {service_id}.{action_name}"
        )


def no_policy_refusal(service_id: str, action_name: str) -> str:
    """The refusal when the operator requires a policy and the namespace has none."""
    return (
        f"{service_id}.{action_name} refused: this namespace has no TaskflowPolicy "
        f"{NAME!r} and the operator requires one"
    )


class TaskflowPolicyStatus(_Model):
    """Written by the operator: whether it could connect as the named NATS user."""

    conditions: list[Condition] = Field(default_factory=list, max_length=8)
