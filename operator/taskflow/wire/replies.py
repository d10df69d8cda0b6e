"""Reading a service's reply: whatever bytes and headers arrive, the result is an engine input.

A reply is untrusted input from any service. ``read_reply`` is total: a message that cannot be
used (not JSON, another shape, too large, too deep, NaN, a number Kubernetes cannot keep, a
string that is not valid Unicode) becomes a failed attempt with reason ``BadReply`` and a
message saying why; it never raises, so one message can never stop a flow's writer. Whatever it
accepts can be serialised by the status model, the journal, the API and events alike.

The NATS Services API error headers (``Nats-Service-Error``, ``Nats-Service-Error-Code``) also
mean failure, so a plain ``nats micro`` service works as is.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from taskflow.api.status import ErrorReason, TaskError
from taskflow.engine.inputs import Heartbeat, NoResponders, Reply

SERVICE_ERROR = "Nats-Service-Error"
SERVICE_ERROR_CODE = "Nats-Service-Error-Code"
STATUS = "Status"  # set by the NATS server on control messages; "503": no responders
# Kubernetes keeps JSON integers as 64-bit numbers: a larger one would come back changed.
_INT_RANGE = (-(2**63), 2**63 - 1)


@dataclass(frozen=True, slots=True)
class ReplyLimits:
    """What the operator accepts from a service, per reply (each limit stated in the docs)."""

    max_bytes: int = 1024 * 1024
    # JSON nesting levels of a reply's body (pydantic refuses to serialise past ~250).
    max_depth: int = 64
    # Characters kept of an error message and of an error code (the rest is cut, and said so).
    max_message: int = 1024
    max_code: int = 128
    # Serialised bytes of ``error.data`` kept inline; larger data is dropped, and said so.
    max_error_data: int = 32 * 1024
    max_children: int = 100


class _Unusable(ValueError):
    """The body is JSON, but not JSON that can be kept (the message says why)."""


def _refuse_constant(name: str) -> Any:
    raise _Unusable(f"{name} is not a JSON number")


def _finite(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise _Unusable(f"the number {text[:40]} is out of range")
    return value


def _bounded_int(text: str) -> int:
    value = int(text)  # (Python refuses more than 4,300 digits itself: a ValueError)
    if not _INT_RANGE[0] <= value <= _INT_RANGE[1]:
        raise _Unusable(f"the integer {text[:40]}... does not fit in 64 bits")
    return value


def parse_json(data: bytes, *, max_depth: int) -> Any:
    """Strict JSON: no NaN or Infinity, numbers Kubernetes keeps as they are, valid Unicode,
    at most ``max_depth`` levels. Raises ValueError with a message naming the problem."""
    try:
        value = json.loads(
            data, parse_constant=_refuse_constant, parse_float=_finite, parse_int=_bounded_int
        )
    except RecursionError:
        raise _Unusable(f"it is nested more than {max_depth} levels deep") from None
    _check(value, max_depth=max_depth)
    return value


def _check(value: Any, *, max_depth: int) -> None:
    """Depth and strings, without recursion (so a deep value cannot exhaust the stack)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            _check_text(item)
        elif isinstance(item, dict | list):
            if depth > max_depth:
                raise _Unusable(f"it is nested more than {max_depth} levels deep")
            if isinstance(item, dict):
                for key, inner in item.items():
                    _check_text(key)
                    stack.append((inner, depth + 1))
            else:
                stack.extend((inner, depth + 1) for inner in item)


def _check_text(text: str) -> None:
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise _Unusable(
                "it holds a string that is not valid Unicode (a lone surrogate)"
            ) from None


def clip(text: str, limit: int, what: str) -> str:
    """``text`` cut to ``limit`` characters, saying so when it was cut."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... [{what} cut from {len(text)} characters]"


def _text(value: Any) -> str:
    """Any JSON value as readable text; non-ASCII and control characters kept safe."""
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text.encode("utf-8", "replace").decode("utf-8")


def bad_reply(message: str) -> TaskError:
    return TaskError(message=clip(message, 1024, "message"), reason=ErrorReason.BAD_REPLY)


def read_reply(
    *,
    stage: str,
    task: str,
    attempt: int,
    data: bytes,
    headers: Mapping[str, str] | None,
    limits: ReplyLimits,
) -> Reply | NoResponders | None:
    """The engine input for one message on an attempt's reply subject; None for a NATS
    control message that is not an answer. Never raises."""
    try:
        return _read(
            stage=stage, task=task, attempt=attempt, data=data, headers=headers or {}, limits=limits
        )
    except Exception as exc:  # a last resort: the checks above should have named it
        return Reply(
            stage=stage,
            task=task,
            attempt=attempt,
            ok=False,
            error=bad_reply(f"the reply could not be read: {type(exc).__name__}"),
        )


def _read(
    *,
    stage: str,
    task: str,
    attempt: int,
    data: bytes,
    headers: Mapping[str, str],
    limits: ReplyLimits,
) -> Reply | NoResponders | None:
    status = headers.get(STATUS)
    if status == "503":
        return NoResponders(stage=stage, task=task, attempt=attempt)
    if status:
        return None  # another control message, not a service's reply

    def failed(error: TaskError) -> Reply:
        return Reply(stage=stage, task=task, attempt=attempt, ok=False, error=error)

    if len(data) > limits.max_bytes:
        return failed(
            bad_reply(f"reply of {len(data)} bytes exceeds the limit of {limits.max_bytes} bytes")
        )
    if SERVICE_ERROR in headers or SERVICE_ERROR_CODE in headers:
        code = headers.get(SERVICE_ERROR_CODE)
        return failed(
            TaskError(
                message=clip(
                    _text(headers.get(SERVICE_ERROR) or "service error"),
                    limits.max_message,
                    "message",
                ),
                code=None if code is None else clip(_text(code), limits.max_code, "code"),
                reason=ErrorReason.SERVICE,
            )
        )
    try:
        body = parse_json(data, max_depth=limits.max_depth)
    except UnicodeDecodeError:
        return failed(bad_reply("reply is not valid JSON: it is not UTF-8"))
    except ValueError as exc:
        return failed(bad_reply(f"reply is not valid JSON: {exc}"))
    if not isinstance(body, dict) or not isinstance(body.get("success"), bool):
        return failed(
            bad_reply(
                'reply is not {"success": true, "data": ...} or {"success": false, "error": {...}}'
            )
        )
    if body["success"]:
        children = _children(body.get("nestedTaskflows"))
        if len(children) > limits.max_children:
            return failed(
                TaskError(
                    message=f"the service started {len(children)} child flows; "
                    f"the limit is {limits.max_children}",
                    reason=ErrorReason.CHILD,
                )
            )
        return Reply(
            stage=stage,
            task=task,
            attempt=attempt,
            ok=True,
            data=body.get("data"),
            children=children,
        )
    return failed(_service_error(body.get("error"), limits))


# "namespace/name" of a Kubernetes object: a DNS label (63) and a DNS subdomain (253), so a
# reply cannot put an arbitrarily long (or non-ASCII) name in status, twice per child.
_CHILD_REF = re.compile(
    r"[a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?/[a-z0-9](?:[-a-z0-9.]{0,251}[a-z0-9])?"
)


def _children(refs: Any) -> tuple[str, ...]:
    """Child flows a successful reply names in ``nestedTaskflows`` ("namespace/name")."""
    if not isinstance(refs, list):
        return ()
    return tuple(
        dict.fromkeys(
            r for r in refs if isinstance(r, str) and r.isascii() and _CHILD_REF.fullmatch(r)
        )
    )


def _service_error(error: Any, limits: ReplyLimits) -> TaskError:
    if not isinstance(error, dict):
        text = _text(error) if error is not None else "the service reported a failure"
        return TaskError(
            message=clip(text, limits.max_message, "message"), reason=ErrorReason.SERVICE
        )
    message = clip(
        _text(error.get("message") or "the service reported a failure"),
        limits.max_message,
        "message",
    )
    code = error.get("code")
    data = error.get("data")
    if data is not None:
        size = len(json.dumps(data, separators=(",", ":")))
        if size > limits.max_error_data:
            data = None
            message += (
                f" [error.data of {size} bytes dropped: over the limit of {limits.max_error_data}]"
            )
    retryable = error.get("retryable")
    return TaskError(
        message=message,
        code=None if code is None else clip(_text(code), limits.max_code, "code"),
        reason=ErrorReason.SERVICE,
        data=data,
        retryable=False if retryable is False else None,
    )


# A heartbeat's progress, serialised, at most (a larger one still counts as a heartbeat).
MAX_PROGRESS_BYTES = 4096


def read_heartbeat(*, stage: str, task: str, attempt: int, data: bytes) -> Heartbeat:
    """The engine input for a message on an attempt's heartbeat subject. Total: a body that is
    empty, not usable JSON or larger than ``MAX_PROGRESS_BYTES`` is a heartbeat without
    progress (``{"progress": ...}`` or any other JSON value is the progress itself)."""
    progress: Any = None
    if data and len(data) <= MAX_PROGRESS_BYTES:
        try:
            value = parse_json(data, max_depth=16)
        except ValueError:
            value = None
        progress = (
            value.get("progress") if isinstance(value, dict) and "progress" in value else value
        )
    return Heartbeat(stage=stage, task=task, attempt=attempt, progress=progress)
