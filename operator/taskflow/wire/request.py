"""The headers of a dispatched request, built by the operator and read by services.

One shape, ``RequestHeaders``, in both directions: ``encode`` gives the NATS headers the
operator sends with an attempt, ``decode`` reads them back in a service (the SDK) without ever
raising, since a service may be sent anything by anyone its NATS permissions let through. The
execution context travels as JSON in ``taskflowExecutionContext`` (``context.py`` builds it;
``ExecutionContext`` here reads it), the attempt's identity in ``Taskflow-Idempotency-Key``
(``AttemptKey``), the attempt's timers as epoch milliseconds, and its place in the flow's trace
as a W3C ``traceparent`` (``TraceParent``; docs/observability.md).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from taskflow.wire.context import (
    CONTEXT_HEADER,
    DEADLINE_HEADER,
    EXPIRES_HEADER,
    HEARTBEAT_HEADER,
    IDEMPOTENCY_HEADER,
)

# At most this many digits in an attempt number: int() of it stays cheap and within 64 bits.
_MAX_ATTEMPT_DIGITS = 18
# W3C Trace Context: the attempt's span as the parent of whatever the service does for it.
TRACEPARENT_HEADER = "traceparent"
_HEX = frozenset("0123456789abcdef")


@dataclass(frozen=True, slots=True)
class AttemptKey:
    """``uid/stage/task/attempt``: the idempotency key of one attempt. A redelivery of the
    same attempt carries the same key, so a service can answer it from a cache."""

    uid: str
    stage: str
    task: str
    attempt: int

    def encode(self) -> str:
        return f"{self.uid}/{self.stage}/{self.task}/{self.attempt}"

    @classmethod
    def decode(cls, text: str | None) -> AttemptKey | None:
        """The key's parts, or None if it is not one (stage and task names are NATS tokens)."""
        parts = (text or "").split("/")
        if len(parts) != 4 or not all(parts[:3]):
            return None
        digits = parts[3]
        # ASCII digits only ("²".isdigit() is true too).
        if not (digits.isascii() and digits.isdigit()) or len(digits) > _MAX_ATTEMPT_DIGITS:
            return None
        return cls(parts[0], parts[1], parts[2], int(digits))


def _hex(text: str, length: int) -> bool:
    return len(text) == length and _HEX.issuperset(text) and text != "0" * length


@dataclass(frozen=True, slots=True)
class TraceParent:
    """``00-<trace id>-<parent span id>-<flags>`` (W3C Trace Context, level 1): lower-case hex,
    neither id all zeros. The operator sends its attempt's span as the parent, sampled."""

    trace_id: str  # 32 hex digits
    span_id: str  # 16 hex digits
    flags: int = 1  # bit 0: sampled

    @property
    def sampled(self) -> bool:
        return bool(self.flags & 1)

    def encode(self) -> str:
        return f"00-{self.trace_id}-{self.span_id}-{self.flags & 0xFF:02x}"

    @classmethod
    def decode(cls, text: str | None) -> TraceParent | None:
        """The header's parts, or None if it is not one (as the spec says: then ignore it).
        A later version's header is read by its first four fields, as the spec asks."""
        if not text or len(text) < 55 or len(text) > 512:
            return None
        version, trace_id, span_id, flags = text[:2], text[3:35], text[36:52], text[53:55]
        if text[2] != "-" or text[35] != "-" or text[52] != "-":
            return None
        if not _HEX.issuperset(version) or version == "ff" or not _HEX.issuperset(flags):
            return None
        if len(text) > 55 and (version == "00" or text[55] != "-"):
            return None
        if not (_hex(trace_id, 32) and _hex(span_id, 16)):
            return None
        return cls(trace_id, span_id, int(flags, 16))


def _object(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


@dataclass(frozen=True, slots=True)
class ExecutionContext:
    """The ``taskflowExecutionContext`` as a service reads it: the seed's JSON (``raw``,
    exactly as sent) and its fields, each None (or empty) when absent or of the wrong type."""

    raw: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def decode(cls, text: str | None) -> ExecutionContext:
        value: Any = None
        with contextlib.suppress(ValueError, TypeError, RecursionError):
            value = json.loads(text or "{}")
        return cls(_object(value))

    def encode(self) -> str:
        return json.dumps(self.raw, separators=(",", ":"))

    @property
    def flow(self) -> dict[str, Any]:
        return _object(self.raw.get("taskflow"))

    @property
    def info(self) -> dict[str, Any]:
        return _object(self.flow.get("taskInfo"))

    @property
    def meta(self) -> dict[str, Any]:
        return _object(self.info.get("meta"))

    @property
    def taskflow_id(self) -> str | None:
        return _text(self.flow.get("id"))

    @property
    def stage_id(self) -> str | None:
        return _text(self.flow.get("stageId"))

    @property
    def task_id(self) -> str | None:
        return _text(self.flow.get("taskId")) or _text(self.info.get("id"))

    @property
    def task_name(self) -> str | None:
        return _text(self.info.get("name"))

    @property
    def task_type(self) -> str | None:
        return _text(self.info.get("type"))

    @property
    def attempt(self) -> int | None:
        value = self.info.get("attempt")
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    @property
    def options(self) -> dict[str, Any]:
        return dict(_object(self.info.get("options")))

    @property
    def created_at(self) -> int | None:
        value = self.flow.get("createdAt")
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    @property
    def previous_stage_responses(self) -> list[dict[str, Any]]:
        value = self.raw.get("previousStageRes")
        return [item for item in value if isinstance(item, dict)] if isinstance(value, list) else []

    @property
    def parent(self) -> dict[str, Any] | None:
        """A nested flow's parent task's own context (``taskInfo.meta``), or None."""
        value = self.meta.get(CONTEXT_HEADER)
        return value if isinstance(value, dict) else None


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _epoch_ms(value: str | None) -> int | None:
    if not value or len(value) > 20:
        return None
    try:
        return int(value)
    except ValueError:
        return None


@dataclass(frozen=True, slots=True)
class RequestHeaders:
    """What travels beside an attempt's params: its context, its key and its timers.

    ``deadline``: when this attempt times out; ``expires_at``: after it (maxAge), the service
    may drop the message unanswered; ``heartbeat``: where to heartbeat (only with
    ``heartbeatTimeout``; signed like the reply subject, so only the addressee knows it);
    ``traceparent``: the attempt's span in the flow's trace (W3C Trace Context)."""

    context: ExecutionContext
    key: str | None = None
    deadline: int | None = None
    expires_at: int | None = None
    heartbeat: str | None = None
    traceparent: TraceParent | None = None

    def encode(self) -> dict[str, str]:
        headers = {CONTEXT_HEADER: self.context.encode()}
        if self.key is not None:
            headers[IDEMPOTENCY_HEADER] = self.key
        if self.deadline is not None:
            headers[DEADLINE_HEADER] = str(self.deadline)
        if self.expires_at is not None:
            headers[EXPIRES_HEADER] = str(self.expires_at)
        if self.heartbeat is not None:
            headers[HEARTBEAT_HEADER] = self.heartbeat
        if self.traceparent is not None:
            headers[TRACEPARENT_HEADER] = self.traceparent.encode()
        return headers

    @classmethod
    def decode(cls, headers: Mapping[str, str] | None) -> RequestHeaders:
        headers = headers or {}
        return cls(
            context=ExecutionContext.decode(headers.get(CONTEXT_HEADER)),
            key=headers.get(IDEMPOTENCY_HEADER) or None,
            deadline=_epoch_ms(headers.get(DEADLINE_HEADER)),
            expires_at=_epoch_ms(headers.get(EXPIRES_HEADER)),
            heartbeat=headers.get(HEARTBEAT_HEADER) or None,
            traceparent=TraceParent.decode(headers.get(TRACEPARENT_HEADER)),
        )

    @property
    def attempt_key(self) -> AttemptKey | None:
        return AttemptKey.decode(self.key)


__all__ = ["TRACEPARENT_HEADER", "AttemptKey", "ExecutionContext", "RequestHeaders", "TraceParent"]
