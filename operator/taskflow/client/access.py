"""Who calls, and whether they may: a Kubernetes bearer token checked by a TokenReview, then a
SubjectAccessReview of the verb on taskflows in a namespace, exactly as the API server would.

Shared by the operator's NATS API (``shell/natsapi.py``) and the web view (``ui/access.py``),
so a caller gets the same answer wherever they come from. Answers are kept for a minute.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

from taskflow.api.names import GROUP, PLURAL
from taskflow.client.envelope import TaskflowError

AUTHORIZATION = "Authorization"


@dataclass(frozen=True, slots=True)
class Caller:
    """Who made a call: a bearer token, or the NATS user the server stamped on it."""

    token: str | None = None
    account: str | None = None
    user: str | None = None

    def username(self) -> str:
        return f"nats:{self.account}:{self.user}"


class Authorizer:
    """Kubernetes authentication and authorization of a NATS API caller, by its bearer token.
    Answers are kept for a minute (a busy service does not cost two API calls per request)."""

    TTL_S = 60.0

    def __init__(self, api_client: Any) -> None:
        from kubernetes import client

        self.authn = client.AuthenticationV1Api(api_client)
        self.authz = client.AuthorizationV1Api(api_client)
        self._users: dict[str, tuple[float, dict[str, Any] | None]] = {}
        self._decisions: dict[tuple[str, str, str], tuple[float, bool]] = {}

    async def check(self, caller: Caller, *, verb: str, namespace: str) -> None:
        user: dict[str, Any] | None
        if caller.token:
            key = caller.token
            user = await self.authenticate(caller.token)
            if user is None:
                raise TaskflowError(
                    "the bearer token was not accepted by Kubernetes", "Unauthorized"
                )
        elif caller.account and caller.user:
            key = caller.username()
            user = {"username": key, "uid": "", "extra": {}, "groups": [f"nats:{caller.account}"]}
        else:
            raise TaskflowError(
                "the NATS API needs a Kubernetes bearer token in the "
                f"{AUTHORIZATION} header (or, where the operator takes NATS "
                "users, a call through an account import)",
                "Unauthorized",
            )
        if not await self._allowed(key, user, verb, namespace):
            raise TaskflowError(
                f"{user.get('username')} may not {verb} taskflows in namespace {namespace}",
                "Forbidden",
            )

    async def authenticate(self, token: str) -> dict[str, Any] | None:
        """The Kubernetes user a bearer token stands for (TokenReview), or None when the API
        server does not accept it: ``{"username", "uid", "groups", "extra"}``. (Also the web
        view's sign-in, ``taskflow.ui``.)"""
        now = time.monotonic()
        cached = self._users.get(token)
        if cached is not None and now - cached[0] < self.TTL_S:
            return cached[1]
        body: Any = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "spec": {"token": token},
        }
        review = await asyncio.to_thread(self.authn.create_token_review, body)
        status = review.status
        user = None
        if status is not None and status.authenticated and status.user is not None:
            user = {
                "username": status.user.username,
                "uid": status.user.uid,
                "groups": status.user.groups or [],
                "extra": status.user.extra or {},
            }
        self._remember(self._users, token, (now, user))
        return user

    async def _allowed(self, who: str, user: dict[str, Any], verb: str, namespace: str) -> bool:
        now = time.monotonic()
        key = (who, verb, namespace)
        cached = self._decisions.get(key)
        if cached is not None and now - cached[0] < self.TTL_S:
            return cached[1]
        body: Any = {
            "apiVersion": "authorization.k8s.io/v1",
            "kind": "SubjectAccessReview",
            "spec": {
                "user": user["username"],
                "groups": user["groups"],
                "extra": user["extra"],
                **({"uid": user["uid"]} if user["uid"] else {}),
                "resourceAttributes": {
                    "group": GROUP,
                    "resource": PLURAL,
                    "verb": verb,
                    "namespace": namespace,
                },
            },
        }
        review = await asyncio.to_thread(self.authz.create_subject_access_review, body)
        allowed = bool(review.status is not None and review.status.allowed)
        self._remember(self._decisions, key, (now, allowed))
        return allowed

    @staticmethod
    def _remember(cache: dict[Any, Any], key: Any, value: Any) -> None:
        if len(cache) >= 10_000:  # bounded: forget the oldest half
            for old in list(cache)[:5_000]:
                del cache[old]
        cache[key] = value


__all__ = ["AUTHORIZATION", "Authorizer", "Caller"]
