"""The cancel notice: what the operator publishes on ``taskflow.cancel.<serviceId>`` when a
flow is cancelled while one of its attempts is in a service.

Every instance of the service hears it; the one serving the attempt named by ``key`` cancels
its handler. ``decode`` never raises: anyone allowed on the subject may publish there, and a
notice that does not parse is ignored, never acted on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

# A notice is small; one much larger is not ours.
MAX_NOTICE_BYTES = 16 * 1024


@dataclass(frozen=True, slots=True)
class Notice:
    key: str  # the attempt's idempotency key, as sent with its request
    taskflow_id: str
    stage: str
    task: str
    attempt: int
    service_id: str
    action_name: str
    reason: str = "cancelled"

    def encode(self) -> bytes:
        return json.dumps(
            {
                "idempotencyKey": self.key,
                "taskflowId": self.taskflow_id,
                "stage": self.stage,
                "task": self.task,
                "attempt": self.attempt,
                "serviceId": self.service_id,
                "actionName": self.action_name,
                "reason": self.reason,
            },
            separators=(",", ":"),
        ).encode()

    @classmethod
    def decode(cls, data: bytes) -> Notice | None:
        """The notice, or None if it is not one; only ``idempotencyKey`` is required (the
        rest is for people reading the subject)."""
        if len(data) > MAX_NOTICE_BYTES:
            return None
        try:
            value: Any = json.loads(data)
        except (ValueError, RecursionError):
            return None
        if not isinstance(value, dict):
            return None
        key = value.get("idempotencyKey")
        if not isinstance(key, str) or not key:
            return None

        def text(name: str) -> str:
            item = value.get(name)
            return item if isinstance(item, str) else ""

        attempt = value.get("attempt")
        return cls(
            key=key,
            taskflow_id=text("taskflowId"),
            stage=text("stage"),
            task=text("task"),
            attempt=attempt if isinstance(attempt, int) and not isinstance(attempt, bool) else 0,
            service_id=text("serviceId"),
            action_name=text("actionName"),
            reason=text("reason") or "cancelled",
        )


__all__ = ["Notice"]
