"""Finished flows leave etcd: after their TTL, a flow's final status goes to the history stream
and the flow is deleted (its children with it, by their owner references).

``spec.ttl`` (``afterSucceeded``, ``afterFailed`` — also COMPLETED_WITH_FAILURES —,
``afterCancelled``) or the operator's defaults say how long a finished flow stays. Every watch
event of a finished flow (the first list after a start included) schedules it; the reaper
sleeps until the earliest is due, reads the flow again (it may have been retried, or deleted),
records it in ``TASKFLOW_HISTORY`` (``taskflow.history.<namespace>.<uid>``, its own retention)
and deletes it, with the uid as a precondition so a flow created again under the same name is
never touched. Responses a flow kept in the object store are deleted with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import time
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from taskflow.api.durations import parse_duration_ms
from taskflow.api.spec import Ttl
from taskflow.api.status import TERMINAL_FLOW_PHASES, FlowPhase
from taskflow.engine import parse_iso
from taskflow.kube import Gone, Kube
from taskflow.shell import metrics
from taskflow.shell.bus import Bus

log = logging.getLogger("taskflow.reaper")


@dataclass(frozen=True)
class TtlDefaults:
    """The operator's TTLs (ms) for flows whose spec sets none; None: kept for ever."""

    succeeded: int | None = None
    failed: int | None = None
    cancelled: int | None = None


def ttl_ms(body: dict[str, Any], defaults: TtlDefaults) -> int | None:
    """How long after its completion a finished flow is kept, or None."""
    phase = (body.get("status") or {}).get("phase")
    try:
        ttl = Ttl.model_validate((body.get("spec") or {}).get("ttl") or {})
    except ValidationError:
        ttl = Ttl()
    if phase == FlowPhase.SUCCEEDED:
        value, default = ttl.after_succeeded, defaults.succeeded
    elif phase in (FlowPhase.FAILED, FlowPhase.COMPLETED_WITH_FAILURES):
        value, default = ttl.after_failed, defaults.failed
    elif phase == FlowPhase.CANCELLED:
        value, default = ttl.after_cancelled, defaults.cancelled
    else:
        return None
    return parse_duration_ms(value) if value is not None else default


def summary(body: dict[str, Any]) -> dict[str, Any]:
    """What the history keeps of a finished flow: identity, outcome, times, and per task its
    status, attempts and error reason (no responses: they may be large or private)."""
    meta, status = body.get("metadata") or {}, body.get("status") or {}
    spec_tasks = {
        (s.get("name"), t.get("name")): t.get("taskDetails") or {}
        for s in (body.get("spec") or {}).get("stages") or []
        for t in s.get("tasks") or []
    }
    return {
        "namespace": meta.get("namespace"),
        "name": meta.get("name"),
        "uid": meta.get("uid"),
        "labels": meta.get("labels") or {},
        "phase": status.get("phase"),
        "createdAt": meta.get("creationTimestamp"),
        "startTime": status.get("startTime"),
        "completionTime": status.get("completionTime"),
        "progress": status.get("progress"),
        "stages": [
            {
                "name": s.get("name"),
                "status": s.get("status"),
                "tasks": [
                    {
                        "name": t.get("name"),
                        "status": t.get("status"),
                        "attempt": t.get("attempt"),
                        "serviceId": spec_tasks.get(
                            (s.get("name"), (t.get("name") or "").split("[")[0]), {}
                        ).get("serviceId"),
                        "errorReason": (t.get("error") or {}).get("reason"),
                    }
                    for t in s.get("tasks") or []
                ],
            }
            for s in status.get("stages") or []
        ],
    }


def response_refs(body: dict[str, Any]) -> list[str]:
    """Object store keys of the responses a flow's status points to."""
    keys = []
    for stage in (body.get("status") or {}).get("stages") or []:
        for task in stage.get("tasks") or []:
            ref = task.get("responseRef")
            if isinstance(ref, str) and ref.startswith("nats-object://"):
                keys.append(ref.split("/", 3)[-1])
    return keys


class Reaper:
    def __init__(self, *, kube: Kube, bus: Bus, defaults: TtlDefaults) -> None:
        self.kube = kube
        self.bus = bus
        self.defaults = defaults
        self._due: list[tuple[float, str, str, str]] = []  # (epoch s, uid, namespace, name)
        self._known: dict[str, float] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    def observe(self, body: dict[str, Any]) -> None:
        """A watch event: schedule a finished flow with a TTL (again, if it changed)."""
        meta, status = body.get("metadata") or {}, body.get("status") or {}
        uid = meta.get("uid")
        if not uid or status.get("phase") not in {str(p) for p in TERMINAL_FLOW_PHASES}:
            return
        if meta.get("generation") != status.get("observedGeneration"):
            return  # a retry or a cancel is pending: not finished yet
        ttl = ttl_ms(body, self.defaults)
        done = status.get("completionTime")
        if ttl is None or not done:
            return
        try:
            due = parse_iso(done) / 1000 + ttl / 1000
        except ValueError:
            return
        if self._known.get(uid) == due:
            return
        self._known[uid] = due
        heapq.heappush(self._due, (due, uid, meta.get("namespace", ""), meta.get("name", "")))
        self._wake.set()

    def forget(self, uid: str) -> None:
        self._known.pop(uid, None)

    async def _run(self) -> None:
        while True:
            self._wake.clear()
            now = time.time()
            if self._due and self._due[0][0] <= now:
                due, uid, namespace, name = heapq.heappop(self._due)
                if self._known.get(uid) != due:
                    continue  # rescheduled or forgotten since
                try:
                    await self.reap(uid=uid, namespace=namespace, name=name)
                except Exception as exc:  # tried again a minute later
                    log.warning("could not delete %s/%s after its TTL: %s", namespace, name, exc)
                    later = time.time() + 60
                    self._known[uid] = later
                    heapq.heappush(self._due, (later, uid, namespace, name))
                continue
            timeout = (self._due[0][0] - now) if self._due else None
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wake.wait()

    async def reap(self, *, uid: str, namespace: str, name: str) -> None:
        try:
            body = await self.kube.get(namespace, name)
        except Gone:
            self.forget(uid)
            return
        if body["metadata"].get("uid") != uid:
            self.forget(uid)  # deleted and created again: not ours to delete
            return
        ttl = ttl_ms(body, self.defaults)
        status = body.get("status") or {}
        if (
            ttl is None
            or body["metadata"].get("generation") != status.get("observedGeneration")
            or status.get("phase") not in {str(p) for p in TERMINAL_FLOW_PHASES}
        ):
            self.forget(uid)  # retried meanwhile: its next end schedules it again
            return
        await self.bus.record_history(namespace, uid, summary(body))
        await self.kube.delete(namespace, name, uid=uid)
        self.forget(uid)
        metrics.FLOWS_DELETED.inc()
        log.info(
            "deleted %s/%s (%s) after its TTL; its status is in the history",
            namespace,
            name,
            status.get("phase"),
        )
        for key in response_refs(body):
            await self.bus.forget_response(key)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
