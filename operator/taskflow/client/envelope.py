"""The one error envelope of the users' side: ``{"success": ..., "data" | "error": ...}``.

Every public call of the client returns it, the SDK reads it back from a child flow's start,
and the NATS API (``taskflow.api.*``) answers with it; keeping it in one place keeps the three
in the seed's shape. ``TaskflowError`` is how the inner calls say "no"; ``_guard`` turns it (and
the API server's own refusals) into a failure envelope at the public edge.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Awaitable
from typing import Any

from kubernetes.client.exceptions import ApiException

Envelope = dict[str, Any]


def ok(data: Any) -> Envelope:
    return {"success": True, "data": data}


def fail(message: str, code: str | None = None, **extra: Any) -> Envelope:
    error: dict[str, Any] = {"message": message}
    if code is not None:
        error["code"] = code
    error.update({k: v for k, v in extra.items() if v is not None})
    return {"success": False, "error": error}


class TaskflowError(Exception):
    """A call that cannot be answered; public methods turn it into a failure envelope."""

    def __init__(self, message: str, code: str | None = None, **extra: Any) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.extra = extra

    def envelope(self) -> Envelope:
        return fail(self.message, self.code, **self.extra)

    @classmethod
    def from_api(cls, exc: ApiException, what: str | None = None) -> TaskflowError:
        """The API server's own message (e.g. a validation error naming the field)."""
        body: Any = None
        with contextlib.suppress(ValueError, TypeError):
            body = json.loads(exc.body) if exc.body else None
        if isinstance(body, dict) and body.get("message"):
            causes = (body.get("details") or {}).get("causes")
            return cls(
                str(body["message"]),
                str(body.get("reason") or exc.reason or "Error"),
                status=exc.status,
                causes=causes,
            )
        message = f"{what}: {exc.reason}" if what else str(exc.reason or exc)
        return cls(message, str(exc.reason or "Error"), status=exc.status)


async def _guard(call: Awaitable[Envelope]) -> Envelope:
    try:
        return await call
    except TaskflowError as exc:
        return exc.envelope()
    except ApiException as exc:
        return TaskflowError.from_api(exc).envelope()
