"""The cluster's ServiceLimits, as the operator sees them: which gates a service's attempts pass.

kopf reports every ServiceLimit (``observe``); ``gates`` answers, for a serviceId and an action,
the flow-control gates its attempts must pass (``shell/slots.py`` holds their state, shared
by every replica). For ``maxInFlight: auto`` a poll asks the NATS Services API every
``poll_s`` seconds how many instances serve the service and what capacity each advertises, and
the limit follows; until the first answer the limit is not applied (nothing is known to limit
by). Each ServiceLimit's status says the limit in force and why.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError

from taskflow.api.limits import PLURAL, Gate, ServiceLimitSpec

log = logging.getLogger("taskflow.limits")


class ServiceLimits:
    def __init__(self, *, kube: Any, nc: Any, poll_s: float = 10.0) -> None:
        self.kube = kube
        self.nc = nc
        self.poll_s = poll_s
        self._specs: dict[str, ServiceLimitSpec] = {}  # by the ServiceLimit's name
        self._bodies: dict[str, dict[str, Any]] = {}
        self._auto: dict[str, tuple[int, int]] = {}  # name -> (limit, instances)
        self._by_service: dict[str, list[str]] = {}  # serviceId -> names
        self._written: dict[str, dict[str, Any]] = {}  # name -> the status last written
        self._task: asyncio.Task[None] | None = None
        self.on_change: Callable[[], None] | None = None

    # -- what kopf reports -------------------------------------------------------------------

    def observe(self, event_type: str | None, body: dict[str, Any]) -> None:
        name = str((body.get("metadata") or {}).get("name") or "")
        if not name:
            return
        if event_type == "DELETED":
            self._forget(name)
            return
        try:
            spec = ServiceLimitSpec.model_validate(body.get("spec") or {})
        except ValidationError as exc:  # (admission checks it; an older object may not pass)
            self._forget(name)
            self._report(name, body, limit=None, instances=None, ok=False, why=str(exc)[:1024])
            return
        self._specs[name], self._bodies[name] = spec, body
        self._by_service = {}
        for other, each in self._specs.items():
            self._by_service.setdefault(each.service_id, []).append(other)
        gate = self._gate(name, spec)
        self._report(name, body, limit=gate.limit, instances=self._auto.get(name, (0, None))[1])
        if self.on_change is not None:
            self.on_change()

    def _forget(self, name: str) -> None:
        if self._specs.pop(name, None) is not None:
            self._bodies.pop(name, None)
            self._auto.pop(name, None)
            for names in self._by_service.values():
                if name in names:
                    names.remove(name)
            if self.on_change is not None:
                self.on_change()

    # -- what the engine and the dispatch ask ------------------------------------------------

    def gates(self, service_id: str, action_name: str) -> tuple[Gate, ...]:
        names = self._by_service.get(service_id)
        if not names:
            return ()
        out = []
        for name in names:
            spec = self._specs[name]
            if spec.covers(service_id, action_name):
                gate = self._gate(name, spec)
                if gate.limit is not None or gate.rate is not None:
                    out.append(gate)
        return tuple(out)

    def _gate(self, name: str, spec: ServiceLimitSpec) -> Gate:
        auto = self._auto.get(name)
        return spec.gate(name=name, auto_limit=auto[0] if auto else None)

    # -- maxInFlight: auto -------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._poll())

    async def _poll(self) -> None:
        from taskflow.client.services import list_services

        while True:
            for name, spec in list(self._specs.items()):
                if spec.max_in_flight != "auto":
                    continue
                try:
                    found = await list_services(self.nc, name=spec.service_id, timeout=1.0)
                except Exception as exc:
                    log.debug("ServiceLimit %s: Services API not answered: %s", name, exc)
                    continue
                instances = [i for s in found for i in s.instances]
                limit = sum(i.capacity or 1 for i in instances)
                if self._auto.get(name) != (limit, len(instances)):
                    self._auto[name] = (limit, len(instances))
                    body = self._bodies.get(name)
                    if body is not None:
                        self._report(name, body, limit=max(1, limit), instances=len(instances))
                    if self.on_change is not None:
                        self.on_change()
            await asyncio.sleep(self.poll_s)

    # -- status ------------------------------------------------------------------------------

    def _report(
        self,
        name: str,
        body: dict[str, Any],
        *,
        limit: int | None,
        instances: int | None,
        ok: bool = True,
        why: str = "",
    ) -> None:
        spec = self._specs.get(name)
        if ok and spec is not None and spec.max_in_flight == "auto" and limit is None:
            message = "waiting for the Services API to say how many instances serve the service"
        elif ok:
            message = "in force"
        else:
            message = why
        status: dict[str, Any] = {
            "limit": limit,
            "instances": instances,
            "conditions": [
                {
                    "type": "Ready",
                    "status": "True" if ok else "False",
                    "reason": "InForce" if ok else "Invalid",
                    "message": message,
                    "lastTransitionTime": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
                }
            ],
        }
        status = {k: v for k, v in status.items() if v is not None}
        last = self._written.get(name)
        if last is not None and _same(last, status):
            return
        self._written[name] = status
        with contextlib.suppress(RuntimeError):  # (no loop: nothing to write from)
            asyncio.get_running_loop().create_task(self._write(body, status))

    async def _write(self, body: dict[str, Any], status: dict[str, Any]) -> None:
        try:
            await self.kube.patch_cluster_status(PLURAL, body["metadata"]["name"], status)
        except Exception as exc:  # the status is a report: a conflict is fixed by the next one
            log.debug("ServiceLimit %s: status not written: %s", body["metadata"]["name"], exc)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """The same report, whenever it was made."""

    def strip(status: dict[str, Any]) -> dict[str, Any]:
        conditions = [
            {k: v for k, v in c.items() if k != "lastTransitionTime"}
            for c in status.get("conditions", [])
        ]
        return {**status, "conditions": conditions}

    return strip(a) == strip(b)
