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

Only the configured namespaces are served: a request naming (or resolving to) another namespace
is refused with code ``Forbidden``; uids are looked up in the allowed namespaces only.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from nats.aio.msg import Msg

from taskflow.client import Envelope, TaskflowClient, TaskflowError, fail
from taskflow.wire.subjects import Subjects

log = logging.getLogger("taskflow.natsapi")

QUEUE_GROUP = "taskflow-api"
MAX_WAIT_S = 30.0
Handler = Callable[[dict[str, Any]], Awaitable[Envelope]]


class NatsApi:
    """The four endpoints over one ``TaskflowClient`` limited to the allowed namespaces."""

    def __init__(self, client: TaskflowClient) -> None:
        self.client = client

    def _id(self, request: dict[str, Any]) -> str:
        ident = request.get("taskflowId") or request.get("id")
        if not isinstance(ident, str) or not ident.strip():
            raise TaskflowError('"taskflowId" (a uid or "namespace/name") is required',
                                "BadRequest")
        if "/" not in ident and isinstance(request.get("namespace"), str):
            ident = f"{request['namespace']}/{ident}"
        return ident

    @staticmethod
    def _wait(request: dict[str, Any]) -> float | None:
        wait = request.get("wait", True)
        if wait is False or wait is None:
            return None
        if wait is True:
            return 10.0
        try:
            return min(MAX_WAIT_S, max(0.0, float(wait)))
        except (TypeError, ValueError):
            raise TaskflowError('"wait" is a boolean or a number of seconds', "BadRequest") \
                from None

    async def produce(self, request: dict[str, Any]) -> Envelope:
        schema = request.get("schema", request.get("spec", request.get("taskflow")))
        if not isinstance(schema, dict):
            raise TaskflowError('"schema" (the TaskFlowSchema object) is required', "BadRequest")
        name = request.get("name")
        if name is not None and not isinstance(name, str):
            raise TaskflowError('"name" is a string', "BadRequest")
        parent = request.get("parent")
        if parent is not None:
            if not isinstance(parent, dict):
                raise TaskflowError('"parent" is an object', "BadRequest")
            context = parent.get("taskflowExecutionContext")
            if not isinstance(context, dict):
                raise TaskflowError('"parent.taskflowExecutionContext" is required',
                                    "BadRequest")
            key = parent.get("idempotencyKey")
            link = await self.client.parent_link(context, key if isinstance(key, str) else None)
            index = parent.get("index", 0)
            name = name or link.child_name(index if isinstance(index, int) else 0)
            result = await self.client.produce(schema, name=name, parent=link)
            if result.get("success"):
                result["data"]["ref"] = f"{link.namespace}/{name}"
            return result
        namespace = request.get("namespace")
        if not isinstance(namespace, str) or not namespace:
            raise TaskflowError('"namespace" is required', "BadRequest")
        self.client.check_namespace(namespace)
        return await self.client.produce(schema, namespace=namespace, name=name)

    async def details(self, request: dict[str, Any]) -> Envelope:
        return await self.client.get_details(self._id(request))

    async def cancel(self, request: dict[str, Any]) -> Envelope:
        return await self.client.cancel(self._id(request), wait=self._wait(request))

    async def retry(self, request: dict[str, Any]) -> Envelope:
        stages = request.get("stages", request.get("stagesInfo"))
        tasks = request.get("tasks", request.get("tasksInfo"))
        for value, what in ((stages, "stages"), (tasks, "tasks")):
            if value is not None and not isinstance(value, list):
                raise TaskflowError(f'"{what}" is a list', "BadRequest")
        return await self.client.retry(
            self._id(request), stages, tasks, bool(request.get("failedOnly", False)),
            wait=self._wait(request),
        )

    def handlers(self) -> dict[str, Handler]:
        return {"produce": self.produce, "details": self.details, "cancel": self.cancel,
                "retry": self.retry}


async def serve_api(
    nc: Any,
    kube_api_client: Any,
    *,
    namespaces: list[str] | None,
    prefix: str = "taskflow.api",
) -> None:
    """Subscribe the API's subjects on ``nc`` (queue group ``taskflow-api``, so replicas share
    the load) and return; the subscriptions live as long as the connection.

    ``namespaces``: where the API may act; None means every namespace.
    """
    client = TaskflowClient(
        api_client=kube_api_client, nc=nc, namespace=(namespaces or ["default"])[0],
        search_namespaces=namespaces, subjects=Subjects(),
    )
    api = NatsApi(client)
    background: set[asyncio.Task[None]] = set()

    def subscriber(verb: str, handler: Handler) -> Callable[[Msg], Awaitable[None]]:
        async def answer(msg: Msg) -> None:
            result = await _handle(verb, handler, msg.data)
            if msg.reply:
                with contextlib.suppress(Exception):
                    await msg.respond(json.dumps(result, separators=(",", ":"),
                                                 default=str).encode())

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
    log.info("NATS API on %s.{produce,details,cancel,retry} for %s", prefix, where)


async def _handle(verb: str, handler: Handler, data: bytes) -> Envelope:
    try:
        request = json.loads(data or b"{}")
    except (ValueError, UnicodeDecodeError) as exc:
        return fail(f"the request is not JSON: {exc}", "BadRequest")
    if not isinstance(request, dict):
        return fail("the request is a JSON object", "BadRequest")
    try:
        return await handler(request)
    except TaskflowError as exc:
        return exc.envelope()
    except Exception as exc:
        log.exception("NATS API %s failed", verb)
        return fail(f"{verb} failed: {exc}", "Internal")


__all__ = ["NatsApi", "serve_api"]
