"""Judging a service's reply: ``{"success": true, "data": ...}`` or a failure, never a crash.

The NATS Services API error headers (``Nats-Service-Error``, ``Nats-Service-Error-Code``) also
mean failure, so a plain ``nats micro`` service works as is.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from taskflow.api.status import TaskError

SERVICE_ERROR = "Nats-Service-Error"
SERVICE_ERROR_CODE = "Nats-Service-Error-Code"
MAX_MESSAGE = 1024


@dataclass(frozen=True, slots=True)
class BadReply:
    """Not a usable reply; the attempt fails with this reason."""

    message: str


def _clip(text: str) -> str:
    return text if len(text) <= MAX_MESSAGE else text[:MAX_MESSAGE] + "..."


def nested_of(data: bytes) -> tuple[str, ...]:
    """Child flows a successful reply names in ``nestedTaskflows`` ("namespace/name")."""
    try:
        body = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return ()
    refs = body.get("nestedTaskflows") if isinstance(body, dict) else None
    if not isinstance(refs, list):
        return ()
    return tuple(r for r in refs if isinstance(r, str) and r.count("/") == 1)[:1000]


def judge_reply(
    data: bytes, headers: dict[str, str] | None, *, max_bytes: int
) -> tuple[bool, Any, TaskError | None]:
    """Return (ok, data, error). Every malformed reply becomes a clear TaskError."""
    headers = headers or {}
    if len(data) > max_bytes:
        return False, None, TaskError(
            message=f"reply of {len(data)} bytes exceeds the limit of {max_bytes} bytes",
            reason="BadReply",
        )
    if SERVICE_ERROR in headers or SERVICE_ERROR_CODE in headers:
        return False, None, TaskError(
            message=_clip(headers.get(SERVICE_ERROR) or "service error"),
            code=headers.get(SERVICE_ERROR_CODE),
            reason="Service",
        )
    try:
        body = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        return False, None, TaskError(
            message=_clip(f"reply is not valid JSON: {exc}"), reason="BadReply"
        )
    if not isinstance(body, dict) or not isinstance(body.get("success"), bool):
        return False, None, TaskError(
            message='reply is not {"success": true, "data": ...} or {"success": false, '
            '"error": {...}}',
            reason="BadReply",
        )
    if body["success"]:
        return True, body.get("data"), None
    error = body.get("error")
    if isinstance(error, dict):
        code = error.get("code")
        return False, None, TaskError(
            message=_clip(str(error.get("message") or "the service reported a failure")),
            code=None if code is None else str(code)[:256],
            reason="Service",
            data=error.get("data"),
        )
    return False, None, TaskError(
        message=_clip(str(error) if error is not None else "the service reported a failure"),
        reason="Service",
    )
