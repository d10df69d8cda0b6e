"""ServiceLimit: how hard the Taskflows of the whole cluster may call one service.

A platform team writes one per service that needs protecting (cluster-scoped: the limit is the
service's, whoever calls it):

- ``maxInFlight``: at most this many attempts at once, across every flow, namespace and
  operator replica; ``auto``: the live instances of the service (its NATS Services API
  answers) times the capacity each advertises (the SDK's ``taskflow.dev/capacity``; one for an
  instance that says nothing).
- ``ratePerSecond`` with ``burst``: at most this many attempts start per second, with bursts.

Either or both; ``actions`` narrows it to some of the service's actions (absent: all of them,
sharing one limit). An attempt held back waits (``waitingReason: Throttled``) and the earliest
ready goes first when a slot or token frees. The state lives in NATS KV (``shell/slots.py``),
never in an operator's memory, so it holds across restarts and replicas.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import AfterValidator, ConfigDict, Field

from taskflow.api.spec import TOKEN_PATTERN
from taskflow.api.spec import StrictModel as _Model
from taskflow.api.status import Condition

KIND = "ServiceLimit"
PLURAL = "servicelimits"
MAX_ACTIONS = 128
MAX_IN_FLIGHT = 100_000
Token = Annotated[str, Field(min_length=1, max_length=128, pattern=TOKEN_PATTERN)]


@dataclass(frozen=True, slots=True)
class Gate:
    """What one flow-control key allows: ``limit`` attempts at once (None: any number), and
    ``rate`` starts per second with bursts of up to ``burst`` (None: no rate). A task's
    concurrency key and a ServiceLimit each make one; ``wire/slots.py`` applies them."""

    key: str
    limit: int | None = None
    rate: float | None = None
    burst: int = 1


def _in_flight(value: int | str | None) -> int | str | None:
    if isinstance(value, int) and not 1 <= value <= MAX_IN_FLIGHT:
        raise ValueError(f"maxInFlight is between 1 and {MAX_IN_FLIGHT}, or 'auto'")
    return value


InFlight = Annotated[
    int | Literal["auto"],
    AfterValidator(_in_flight),
    Field(
        json_schema_extra={
            "x-kubernetes-int-or-string": True,
            "minimum": 1,
            "maximum": MAX_IN_FLIGHT,
            "pattern": "^auto$",
            "description": "At most this many attempts at once across the cluster, or "
            "'auto': the live instances times the capacity each advertises.",
        }
    ),
]


class ServiceLimitSpec(_Model):
    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "has(self.maxInFlight) || has(self.ratePerSecond)",
                    "message": "a ServiceLimit sets maxInFlight, ratePerSecond or both",
                },
                {
                    "rule": "!has(self.burst) || has(self.ratePerSecond)",
                    "message": "burst goes with ratePerSecond",
                    "fieldPath": ".burst",
                },
            ]
        }
    )

    service_id: str = Field(
        alias="serviceId",
        min_length=1,
        max_length=128,
        pattern=TOKEN_PATTERN,
        description="The serviceId of the tasks it limits.",
    )
    actions: list[Token] | None = Field(
        default=None,
        max_length=MAX_ACTIONS,
        description="Only these actions of the service (sharing the limit); absent: all.",
    )
    max_in_flight: InFlight | None = Field(default=None, alias="maxInFlight")
    rate_per_second: float | None = Field(
        default=None,
        alias="ratePerSecond",
        ge=0.001,
        le=100_000,
        description="At most this many attempts start per second (with bursts of 'burst').",
    )
    burst: int | None = Field(
        default=None,
        ge=1,
        le=100_000,
        description="How many may start at once after a quiet spell; default: the rate, "
        "rounded up.",
    )

    def covers(self, service_id: str, action_name: str) -> bool:
        return self.service_id == service_id and (
            self.actions is None or action_name in self.actions
        )

    def gate(self, *, name: str, auto_limit: int | None) -> Gate:
        """The gate of this limit (``auto_limit``: what ``auto`` came to, when it did)."""
        limit: int | None
        if self.max_in_flight == "auto":
            limit = max(1, auto_limit) if auto_limit is not None else None
        else:
            limit = self.max_in_flight
        burst = self.burst or max(1, math.ceil(self.rate_per_second or 1))
        return Gate(key=f"service:{name}", limit=limit, rate=self.rate_per_second, burst=burst)


class ServiceLimitStatus(_Model):
    """Written by the operator: the limit in force (for ``auto``, what it came to) and the
    instances it saw."""

    limit: int | None = Field(default=None, description="The maxInFlight in force.")
    instances: int | None = Field(default=None, description="Live instances (for auto).")
    conditions: list[Condition] = Field(default_factory=list, max_length=8)


__all__ = ["KIND", "PLURAL", "Gate", "ServiceLimitSpec", "ServiceLimitStatus"]
