"""Concurrency slots: at most ``limit`` attempts per key run at once, across every flow and
every operator replica, and a killed operator's slots come back by themselves.

Each key is one entry of the KV bucket ``taskflow-slots``: its holders (``uid/stage/task/
attempt``) with a lease expiry each. Taking a slot is a compare-and-set of that entry (so two
replicas never both take the last one); a holder's lease is renewed while its attempt runs and
the slot is given back when the attempt ends; a lease that is not renewed (its operator died)
lapses, and its slot is free again. A watch of the bucket keeps a local view, which the engine
asks (``admit``) before it decides to send an attempt, so a throttled task waits without a
decision per poll; every change of a slot wakes the writers that wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
from collections.abc import Callable
from typing import Any

from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, StorageType
from nats.js.errors import KeyWrongLastSequenceError, NotFoundError

log = logging.getLogger("taskflow.slots")
BUCKET = "taskflow-slots"


def _entry(key: str) -> str:
    return "k" + hashlib.sha256(key.encode()).hexdigest()[:40]


class Slots:
    def __init__(self, js: JetStreamContext, *, lease_s: float = 30.0) -> None:
        self.js = js
        self.lease_s = lease_s
        self._kv: Any = None
        self._view: dict[str, dict[str, float]] = {}  # entry -> holder -> expiry (epoch s)
        self._held: dict[str, str] = {}  # holder -> key (this operator's)
        self._tasks: list[asyncio.Task[None]] = []
        self.on_change: Callable[[], None] | None = None

    async def start(self) -> None:
        try:
            self._kv = await self.js.key_value(BUCKET)
        except Exception:
            self._kv = await self.js.create_key_value(
                KeyValueConfig(bucket=BUCKET, history=1, storage=StorageType.FILE)
            )
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._watch()), loop.create_task(self._renew())]

    # -- the local view ----------------------------------------------------------------------

    def admit(self, key: str, limit: int, holder: str) -> bool:
        holders = self._live(self._view.get(_entry(key), {}))
        return holder in holders or len(holders) < limit

    @staticmethod
    def _live(holders: dict[str, float]) -> dict[str, float]:
        now = time.time()
        return {h: e for h, e in holders.items() if e > now}

    async def _watch(self) -> None:
        while True:
            try:
                watcher = await self._kv.watchall()
                async for entry in watcher:
                    if entry is None:
                        continue  # (the end of the initial values)
                    try:
                        value = json.loads(entry.value or b"{}")
                        self._view[entry.key] = {
                            str(h): float(e) for h, e in (value.get("holders") or {}).items()
                        }
                    except (ValueError, TypeError, AttributeError):
                        self._view.pop(entry.key, None)
                    if self.on_change is not None:
                        self.on_change()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # NATS away: watch again
                log.debug("slots watch ended: %s", exc)
                await asyncio.sleep(1.0)

    # -- taking, renewing, giving back ---------------------------------------------------------

    async def acquire(self, key: str, limit: int, holder: str) -> bool:
        """Take a slot of ``key`` for ``holder`` (again, if it holds one: renewed)."""
        ok = await self._update(
            key,
            lambda h: (
                {**h, holder: time.time() + self.lease_s} if holder in h or len(h) < limit else None
            ),
        )
        if ok:
            self._held[holder] = key
        return ok

    def holds(self, holder: str) -> bool:
        return holder in self._held

    async def release(self, holder: str) -> None:
        key = self._held.pop(holder, None)
        if key is not None:
            await self._update(key, lambda h: {k: v for k, v in h.items() if k != holder})

    async def _update(
        self, key: str, change: Callable[[dict[str, float]], dict[str, float] | None]
    ) -> bool:
        name = _entry(key)
        for _ in range(20):
            try:
                entry = await self._kv.get(name)
                revision: int | None = entry.revision
                holders = self._live(json.loads(entry.value or b"{}").get("holders") or {})
            except NotFoundError:
                revision, holders = None, {}
            new = change(holders)
            if new is None:
                return False
            value = json.dumps({"key": key[:256], "holders": new}).encode()
            try:
                if revision is None:
                    await self._kv.create(name, value)
                else:
                    await self._kv.update(name, value, last=revision)
                return True
            except (KeyWrongLastSequenceError, Exception) as exc:  # raced: read again
                if (
                    not isinstance(exc, KeyWrongLastSequenceError)
                    and "wrong last" not in str(exc).lower()
                    and "exists" not in str(exc).lower()
                ):
                    raise
                await asyncio.sleep(0.01)
        return False

    async def _renew(self) -> None:
        while True:
            await asyncio.sleep(self.lease_s / 3)
            for holder, key in list(self._held.items()):
                with contextlib.suppress(Exception):
                    await self._update(key, self._renewal(holder))
            # A lease that lapsed (its operator died) changes nothing in the bucket: the
            # writers that wait look again this often.
            if self.on_change is not None:
                self.on_change()

    def _renewal(self, holder: str) -> Callable[[dict[str, float]], dict[str, float] | None]:
        def renew(holders: dict[str, float]) -> dict[str, float]:
            return {**holders, holder: time.time() + self.lease_s}

        return renew

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(BaseException):
                await task
