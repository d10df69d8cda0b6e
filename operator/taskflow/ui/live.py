"""What makes the pages live: one Kubernetes watch of the flows, shared by every open page, and
the Server-Sent Events the pages read.

``FlowWatch`` watches Taskflows through the client's own API connection (``TaskflowClient.kube``)
on a thread per watched scope, started when the first page subscribes; each subscriber gets
every change in a bounded queue (one that falls behind gets ``RESYNC`` instead, and re-lists).
A flow's event log comes from JetStream through ``TaskflowClient.subscribe_events``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from kubernetes import client as k8s
from kubernetes import watch as _k8s_watch
from kubernetes.client.exceptions import ApiException

from taskflow.api.names import GROUP, VERSION
from taskflow.client import PLURAL, TaskflowClient

log = logging.getLogger("taskflow.ui")
k8s_watch: Any = _k8s_watch  # untyped

QUEUE_SIZE = 1000
WATCH_TIMEOUT_S = 20
HEARTBEAT_S = 15.0


@dataclass(frozen=True, slots=True)
class Change:
    """A watch event: ADDED, MODIFIED or DELETED and the flow's object; ``RESYNC`` (no body)
    when the subscriber may have missed changes and must list again."""

    type: str
    body: dict[str, Any]


RESYNC = Change("RESYNC", {})


class FlowWatch:
    """Every change of every Taskflow the view may show, to any number of subscribers."""

    def __init__(self, client: TaskflowClient, *, namespaces: Sequence[str] | None) -> None:
        self.client = client
        self.scopes: list[str | None] = list(namespaces) if namespaces else [None]
        self._subscribers: set[asyncio.Queue[Change]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    @contextlib.asynccontextmanager
    async def subscribe(self) -> AsyncIterator[asyncio.Queue[Change]]:
        queue: asyncio.Queue[Change] = asyncio.Queue(QUEUE_SIZE)
        self._subscribers.add(queue)
        self._start()
        try:
            yield queue
        finally:
            self._subscribers.discard(queue)

    def stop(self) -> None:
        self._stop.set()

    def _start(self) -> None:
        if self._threads:
            return
        self._loop = asyncio.get_running_loop()
        # On the client's own connection (its credentials, its connection pool).
        custom = k8s.CustomObjectsApi(self.client.kube.api_client)
        for scope in self.scopes:
            thread = threading.Thread(
                target=self._watch, args=(custom, scope), name=f"ui-watch-{scope}", daemon=True
            )
            self._threads.append(thread)
            thread.start()

    def _publish(self, change: Change) -> None:
        for queue in list(self._subscribers):
            if queue.full():  # too slow: drop what it has, tell it to list again
                while not queue.empty():
                    queue.get_nowait()
                queue.put_nowait(RESYNC)
            else:
                queue.put_nowait(change)

    def _emit(self, change: Change) -> None:
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):  # the loop is closed: the view is stopping
            self._loop.call_soon_threadsafe(self._publish, change)

    def _list_version(self, custom: Any, scope: str | None) -> str:
        if scope is None:
            page = custom.list_cluster_custom_object(GROUP, VERSION, PLURAL, limit=1)
        else:
            page = custom.list_namespaced_custom_object(GROUP, VERSION, scope, PLURAL, limit=1)
        return str(page["metadata"]["resourceVersion"])

    def _watch(self, custom: Any, scope: str | None) -> None:
        """The thread of one scope: watch from the current version, resume from the last one
        seen, start over (and tell the subscribers) when it is too old."""
        version: str | None = None
        pause = 0.5
        while not self._stop.is_set():
            try:
                if version is None:
                    version = self._list_version(custom, scope)
                    self._emit(RESYNC)
                watcher = k8s_watch.Watch()
                args: tuple[Any, ...] = (
                    (custom.list_cluster_custom_object, GROUP, VERSION, PLURAL)
                    if scope is None
                    else (custom.list_namespaced_custom_object, GROUP, VERSION, scope, PLURAL)
                )
                for event in watcher.stream(
                    *args,
                    resource_version=version,
                    timeout_seconds=WATCH_TIMEOUT_S,
                    allow_watch_bookmarks=True,
                    _request_timeout=WATCH_TIMEOUT_S + 10,
                ):
                    if self._stop.is_set():
                        watcher.stop()
                        return
                    body = event.get("raw_object") or event.get("object") or {}
                    version = (body.get("metadata") or {}).get("resourceVersion") or version
                    if event.get("type") in ("ADDED", "MODIFIED", "DELETED"):
                        self._emit(Change(str(event["type"]), body))
                pause = 0.5
            except ApiException as exc:
                if exc.status == 410:
                    version = None  # too old: list again
                    continue
                log.warning("watching taskflows (%s): %s", scope or "all namespaces", exc.reason)
                self._stop.wait(pause)
                pause = min(pause * 2, 10.0)
            except Exception as exc:
                log.warning("watching taskflows (%s): %s", scope or "all namespaces", exc)
                self._stop.wait(pause)
                pause = min(pause * 2, 10.0)


class EventStream:
    """A Server-Sent Events response: named events with JSON data, and a comment every
    ``HEARTBEAT_S`` so a closed page is noticed (writing to it fails)."""

    def __init__(self, response: web.StreamResponse) -> None:
        self.response = response

    @classmethod
    async def open(cls, request: web.Request) -> EventStream:
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-store",
                "X-Accel-Buffering": "no",  # proxies must not hold events back
            }
        )
        await response.prepare(request)
        await response.write(b"retry: 3000\n\n")
        return cls(response)

    async def send(self, event: str, data: Any) -> None:
        payload = json.dumps(data, separators=(",", ":"), default=str)
        await self.response.write(f"event: {event}\ndata: {payload}\n\n".encode())

    async def heartbeat(self) -> None:
        await self.response.write(b": keep-alive\n\n")
