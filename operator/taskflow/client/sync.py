"""``Client``: the same calls as ``TaskflowClient``, blocking, for synchronous code.

Scripts and code without an event loop (the seed's callers were often plain functions) get
the async client run on one background loop of its own, so its connections are made once and
kept between calls.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

from pydantic import BaseModel

from taskflow.client.envelope import Envelope
from taskflow.client.flows import TaskflowClient

T = TypeVar("T")


class Client:
    """``TaskflowClient`` for synchronous code: the same methods, blocking.

    Runs one event loop on a background thread for its connections::

        with Client(namespace="default") as taskflow:
            res = taskflow.produce(taskflow_obj)
            for event in taskflow.subscribe_events(res["data"]["taskflowId"]):
                print(event["eventType"])
    """

    def __init__(self, **kwargs: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="taskflow-client", daemon=True
        )
        self._thread.start()
        self.aio = TaskflowClient(**kwargs)

    def _run(self, coro: Awaitable[T]) -> T:
        async def call() -> T:
            return await coro

        return asyncio.run_coroutine_threadsafe(call(), self._loop).result()

    def produce(
        self,
        schema: Mapping[str, Any] | BaseModel,
        namespace: str | None = None,
        name: str | None = None,
    ) -> Envelope:
        return self._run(self.aio.produce(schema, namespace=namespace, name=name))

    def get_details(self, taskflow_id: str) -> Envelope:
        return self._run(self.aio.get_details(taskflow_id))

    def cancel(self, taskflow_id: str, *, wait: float | None = 10.0) -> Envelope:
        return self._run(self.aio.cancel(taskflow_id, wait=wait))

    def retry(
        self,
        taskflow_id: str,
        stages: Sequence[Any] | None = None,
        tasks: Sequence[Any] | None = None,
        failed_only: bool = False,
        *,
        wait: float | None = 10.0,
    ) -> Envelope:
        return self._run(self.aio.retry(taskflow_id, stages, tasks, failed_only, wait=wait))

    def subscribe_events(self, taskflow_id: str, replay: bool = True) -> Iterator[dict[str, Any]]:
        events: Any = self.aio.subscribe_events(taskflow_id, replay)
        try:
            while True:
                try:
                    yield self._run(events.__anext__())
                except StopAsyncIteration:
                    return
        finally:
            self._run(events.aclose())

    def close(self) -> None:
        if self._loop.is_closed():
            return
        self._run(self.aio.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
