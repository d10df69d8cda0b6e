"""The operator's NATS API: produce, details, cancel and retry for services that speak only NATS.

Request-reply subjects (the prefix is configurable, default ``taskflow.api``); every request is
a JSON object and every answer is the client's envelope, ``{"success": true, "data": ...}`` or
``{"success": false, "error": {"message", "code", ...}}``:

``taskflow.api.produce``
    ``{"namespace": "ns", "name": "optional", "schema": {...TaskFlowSchema...}}``
    -> ``{"taskflowId", "eventSubscription"}``. With ``"parent": {"taskflowExecutionContext":
    {...}, "idempotencyKey": "uid/stage/task/attempt"}`` (what a service received with a task)
    the flow is created as a child of that task, in the parent's namespace, and the answer also
    carries ``"ref": "namespace/name"`` for the reply's ``nestedTaskflows``.
``taskflow.api.details``
    ``{"taskflowId": "<uid> or ns/name"}`` -> the whole tree (as ``TaskflowClient.get_details``).
``taskflow.api.cancel``
    ``{"taskflowId": ..., "wait": true}`` -> ``{"taskflowId", "acknowledged", ...}``.
``taskflow.api.retry``
    ``{"taskflowId": ..., "stages": [...], "tasks": [...], "failedOnly": false}`` (the seed's
    stagesInfo/tasksInfo forms) -> ``{"taskflowId", "retryId", "accepted", ...}``.
``taskflow.api.suspend`` / ``taskflow.api.resume``
    ``{"taskflowId": ...}`` -> ``{"taskflowId", "name", "namespace", "suspend"}``.
``taskflow.api.history``
    ``{"namespace": "ns", "phase"?, "service"?, "sinceMs"?}`` -> ``{"items": [...]}``: flows
    the operator deleted after their TTL (needs ``list`` on taskflows there).

Only the configured namespaces are served: a request naming (or resolving to) another namespace
is refused with code ``Forbidden``; uids are looked up in the allowed namespaces only.

Off unless the operator runs with ``--nats-api on``. Then every call is made by someone:

- a Kubernetes bearer token (``Authorization: Bearer <token>`` header; a ServiceAccount's token,
  as mounted in its pods), checked with a TokenReview; or
- with ``--nats-api-users``, the NATS user of a call that came through an account import of
  ``taskflow.api.>`` with ``share: true``: the server itself stamps it in ``Nats-Request-Info``
  (whatever the caller put there), and it stands for the Kubernetes user
  ``nats:<account>:<user>`` in the group ``nats:<account>``. Trust it only where no one but
  the operator may publish on ``taskflow.api.>`` in the operator's own account (a header from
  there is not stamped); one naming the operator's own account is never taken.

A SubjectAccessReview then says whether that user may ``create`` (produce), ``get`` (details)
or ``patch`` (cancel, retry) taskflows in the flow's namespace, as if the caller had gone to
the API server itself: bind RBAC to the user or the group as to anyone. A refusal is code
``Unauthorized`` or ``Forbidden``; at most ``MAX_CONCURRENT`` calls are served at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from nats.aio.msg import Msg

from taskflow.client import Envelope, TaskflowClient, TaskflowError, fail, ok
from taskflow.client.access import AUTHORIZATION, Authorizer, Caller
from taskflow.wire.api import (
    BadRequest,
    FlowRequest,
    HistoryRequest,
    ProduceRequest,
    RetryRequest,
    decode_object,
)
from taskflow.wire.subjects import Subjects

log = logging.getLogger("taskflow.natsapi")

QUEUE_GROUP = "taskflow-api"
MAX_CONCURRENT = 64
REQUEST_INFO = "Nats-Request-Info"


Handler = Callable[[dict[str, Any], Caller], Awaitable[Envelope]]


class NatsApi:
    """The four endpoints over one ``TaskflowClient`` limited to the allowed namespaces;
    each call authorized by ``authorizer`` (None: by NATS permissions alone, for tests)."""

    def __init__(self, client: TaskflowClient, authorizer: Authorizer | None = None) -> None:
        self.client = client
        self.authorizer = authorizer

    async def allow(self, caller: Caller, *, verb: str, namespace: str) -> None:
        self.client.check_namespace(namespace)
        if self.authorizer is not None:
            await self.authorizer.check(caller, verb=verb, namespace=namespace)

    async def _flow(self, request: FlowRequest, caller: Caller, *, verb: str) -> str:
        """The flow a request names, once the caller may ``verb`` it; as namespace/name."""
        namespace, name = await self.client.locate(request.taskflow_id)
        await self.allow(caller, verb=verb, namespace=namespace)
        return f"{namespace}/{name}"

    async def produce(self, body: dict[str, Any], caller: Caller) -> Envelope:
        request = ProduceRequest.decode(body)
        if request.parent is not None:
            parent = request.parent
            link = await self.client.parent_link(parent.context, parent.key)
            await self.allow(caller, verb="create", namespace=link.namespace)
            name = request.name or link.child_name(parent.index)
            result = await self.client.produce(request.schema, name=name, parent=link)
            if result.get("success"):
                result["data"]["ref"] = f"{link.namespace}/{name}"
            return result
        assert request.namespace is not None
        await self.allow(caller, verb="create", namespace=request.namespace)
        return await self.client.produce(
            request.schema, namespace=request.namespace, name=request.name
        )

    async def details(self, body: dict[str, Any], caller: Caller) -> Envelope:
        flow = await self._flow(FlowRequest.decode(body), caller, verb="get")
        return await self.client.get_details(flow)

    async def cancel(self, body: dict[str, Any], caller: Caller) -> Envelope:
        request = FlowRequest.decode(body)
        flow = await self._flow(request, caller, verb="patch")
        return await self.client.cancel(flow, wait=request.wait)

    async def retry(self, body: dict[str, Any], caller: Caller) -> Envelope:
        request = RetryRequest.decode(body)
        flow = await self._flow(request.flow, caller, verb="patch")
        return await self.client.retry(
            flow, request.stages, request.tasks, request.failed_only, wait=request.flow.wait
        )

    async def suspend(self, body: dict[str, Any], caller: Caller) -> Envelope:
        flow = await self._flow(FlowRequest.decode(body), caller, verb="patch")
        return await self.client.suspend(flow)

    async def resume(self, body: dict[str, Any], caller: Caller) -> Envelope:
        flow = await self._flow(FlowRequest.decode(body), caller, verb="patch")
        return await self.client.suspend(flow, suspend=False)

    async def history(self, body: dict[str, Any], caller: Caller) -> Envelope:
        """Flows deleted after their TTL, of one namespace (the caller may list taskflows
        there): ``{"namespace", "phase"?, "service"?, "sinceMs"?}``."""
        request = HistoryRequest.decode(body)
        await self.allow(caller, verb="list", namespace=request.namespace)
        items = await self.client.history(
            namespace=request.namespace,
            phase=request.phase,
            service=request.service,
            since_ms=request.since_ms,
        )
        return ok({"items": items})

    def handlers(self) -> dict[str, Handler]:
        return {
            "produce": self.produce,
            "details": self.details,
            "cancel": self.cancel,
            "retry": self.retry,
            "suspend": self.suspend,
            "resume": self.resume,
            "history": self.history,
        }


async def serve_api(
    nc: Any,
    kube_api_client: Any,
    *,
    namespaces: list[str] | None,
    prefix: str = "taskflow.api",
    authorize: bool = True,
    nats_users: bool = False,
    own_account: str | None = None,
) -> None:
    """Subscribe the API's subjects on ``nc`` (queue group ``taskflow-api``, so replicas share
    the load) and return; the subscriptions live as long as the connection.

    ``namespaces``: where the API may act; None means every namespace. ``authorize``: check
    every caller with Kubernetes (False only where NATS permissions are the whole boundary,
    e.g. tests of the API itself). ``nats_users``: a call without a token is made by the NATS
    user the server stamped on it (an account import), unless that is ``own_account``.
    """
    client = TaskflowClient(
        api_client=kube_api_client,
        nc=nc,
        namespace=(namespaces or ["default"])[0],
        search_namespaces=namespaces,
        subjects=Subjects(),
    )
    api = NatsApi(client, Authorizer(kube_api_client) if authorize else None)
    background: set[asyncio.Task[None]] = set()
    slots = asyncio.Semaphore(MAX_CONCURRENT)

    def subscriber(verb: str, handler: Handler) -> Callable[[Msg], Awaitable[None]]:
        async def answer(msg: Msg) -> None:
            async with slots:
                caller = Caller(token=_bearer(msg.headers))
                if nats_users and caller.token is None:
                    caller = _stamped(msg.headers, own_account=own_account)
                result = await _handle(verb, handler, msg.data, caller)
            if msg.reply:
                with contextlib.suppress(Exception):
                    await msg.respond(
                        json.dumps(result, separators=(",", ":"), default=str).encode()
                    )

        async def on_message(msg: Msg) -> None:
            # One task per request, so a slow call (a retry waiting for its ack) never holds
            # up the others.
            task = asyncio.get_running_loop().create_task(answer(msg))
            background.add(task)
            task.add_done_callback(background.discard)

        return on_message

    for verb, handler in api.handlers().items():
        await nc.subscribe(f"{prefix}.{verb}", queue=QUEUE_GROUP, cb=subscriber(verb, handler))
    await nc.flush()
    where = ", ".join(namespaces) if namespaces else "all namespaces"
    log.info(
        "NATS API on %s.{produce,details,cancel,retry,suspend,resume,history} for %s", prefix, where
    )


def _bearer(headers: dict[str, str] | None) -> str | None:
    value = (headers or {}).get(AUTHORIZATION, "")
    scheme, _, token = value.partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


def _stamped(headers: dict[str, str] | None, *, own_account: str | None) -> Caller:
    """The NATS user in the server's ``Nats-Request-Info`` (anyone, if it is unusable)."""
    try:
        info = json.loads((headers or {}).get(REQUEST_INFO) or "{}")
    except (ValueError, RecursionError):
        return Caller()
    if not isinstance(info, dict):
        return Caller()
    account, user = info.get("acc"), info.get("user")
    if (
        not (
            isinstance(account, str)
            and isinstance(user, str)
            and 0 < len(account) <= 256
            and 0 < len(user) <= 256
        )
        or account == own_account
    ):
        return Caller()
    return Caller(account=account, user=user)


async def _handle(verb: str, handler: Handler, data: bytes, caller: Caller) -> Envelope:
    try:
        return await handler(decode_object(data), caller)
    except BadRequest as exc:
        return fail(str(exc), "BadRequest")
    except TaskflowError as exc:
        return exc.envelope()
    except Exception as exc:
        log.exception("NATS API %s failed", verb)
        return fail(f"{verb} failed: {exc}", "Internal")


__all__ = ["Authorizer", "Caller", "NatsApi", "serve_api"]
