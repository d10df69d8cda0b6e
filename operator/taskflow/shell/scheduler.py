"""Running CronTaskflows: each due run becomes a Taskflow (``api/schedules.py`` has the rules).

Every second the scheduler looks at each CronTaskflow it watches: when a scheduled time has come
that its ``status.lastScheduleTime`` has not seen (and, for a run missed while the operator was
down, within ``startingDeadlineSeconds``), it applies the concurrency policy and creates the run,
named after the time (a Conflict means it exists: made before a restart, or by another
replica), owned by the CronTaskflow so that deleting it deletes its runs. Then it records the
time and the active runs in status, and deletes finished runs beyond the history limits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError

from taskflow.api.names import GROUP, VERSION
from taskflow.api.schedules import (
    CRON_LABEL,
    PLURAL,
    CronTaskflowSpec,
    format_time,
    latest_due,
    parse_time,
    run_name,
)
from taskflow.api.status import TERMINAL_FLOW_PHASES
from taskflow.kube import Conflict, Gone, Kube

log = logging.getLogger("taskflow.scheduler")
TICK_S = 1.0
_FINAL = {str(p) for p in TERMINAL_FLOW_PHASES}


class Scheduler:
    def __init__(self, *, kube: Kube) -> None:
        self.kube = kube
        self.crons: dict[str, dict[str, Any]] = {}  # uid -> body
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    def observe(self, event_type: str | None, body: dict[str, Any]) -> None:
        uid = (body.get("metadata") or {}).get("uid")
        if not uid:
            return
        if event_type == "DELETED":
            self.crons.pop(uid, None)
        else:
            self.crons[uid] = body

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(TICK_S)
            for uid, body in list(self.crons.items()):
                try:
                    await self.tick(body)
                except Gone:
                    self.crons.pop(uid, None)
                except Exception as exc:  # tried again at the next tick
                    meta = body.get("metadata") or {}
                    log.warning(
                        "CronTaskflow %s/%s: %s", meta.get("namespace"), meta.get("name"), exc
                    )

    async def tick(self, body: dict[str, Any], *, now: datetime | None = None) -> None:
        meta = body["metadata"]
        try:
            spec = CronTaskflowSpec.model_validate(body.get("spec") or {})
        except ValidationError:
            return  # (the CRD's schema refuses it at apply)
        if spec.suspend:
            return
        now = now or datetime.now(UTC)
        status = body.get("status") or {}
        created = parse_time(meta["creationTimestamp"])
        due = latest_due(spec, created=created, now=now)
        last = parse_time(status["lastScheduleTime"]) if status.get("lastScheduleTime") else None
        if due is None or (last is not None and due <= last):
            return
        if (
            spec.starting_deadline_seconds is not None
            and (now - due).total_seconds() > spec.starting_deadline_seconds
        ):
            await self.record(body, due, None)  # too late for this one: wait for the next
            return
        namespace, name = meta["namespace"], meta["name"]
        runs = await self.kube.list_runs(namespace, name)
        active = [r for r in runs if (r.get("status") or {}).get("phase") not in _FINAL]
        if active and spec.concurrency_policy == "Forbid":
            log.info(
                "CronTaskflow %s/%s: run at %s skipped, %d still active",
                namespace,
                name,
                format_time(due),
                len(active),
            )
            await self.record(body, due, runs)
            return
        if active and spec.concurrency_policy == "Replace":
            for run in active:
                with contextlib.suppress(Gone):
                    await self.kube.patch(
                        namespace, run["metadata"]["name"], {"spec": {"cancel": True}}
                    )
        flow = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "Taskflow",
            "metadata": {
                "name": run_name(name, due),
                "namespace": namespace,
                "labels": {CRON_LABEL: name[:63]},
                "annotations": {"crontaskflow.taskflow.dev/scheduled-at": format_time(due)},
                "ownerReferences": [
                    {
                        "apiVersion": f"{GROUP}/{VERSION}",
                        "kind": "CronTaskflow",
                        "name": name,
                        "uid": meta["uid"],
                        "controller": True,
                    }
                ],
            },
            "spec": spec.taskflow,
        }
        try:
            made = await self.kube.create(namespace, flow)
            runs.append(made)
            log.info("CronTaskflow %s/%s: started %s", namespace, name, made["metadata"]["name"])
        except Conflict:
            pass  # made before a restart, or by another replica
        await self.record(body, due, runs)
        await self.trim(spec, namespace, runs)

    async def record(
        self, body: dict[str, Any], due: datetime, runs: list[dict[str, Any]] | None
    ) -> None:
        meta = body["metadata"]
        status = dict(body.get("status") or {})
        status["lastScheduleTime"] = format_time(due)
        if runs is not None:
            status["active"] = sorted(
                r["metadata"]["name"]
                for r in runs
                if (r.get("status") or {}).get("phase") not in _FINAL
            )
        try:
            updated = await self.kube.put_status(PLURAL, body, status)
        except Conflict:  # a newer object is on its way (the watch); decide again then
            fresh = await self.kube.get_of(PLURAL, meta["namespace"], meta["name"])
            self.crons[meta["uid"]] = fresh
            return
        self.crons[meta["uid"]] = {
            **body,
            "metadata": updated["metadata"],
            "status": updated.get("status"),
        }

    async def trim(
        self, spec: CronTaskflowSpec, namespace: str, runs: list[dict[str, Any]]
    ) -> None:
        """Delete finished runs beyond the history limits, oldest first."""

        def ended(phase: str) -> list[dict[str, Any]]:
            return sorted(
                (r for r in runs if (r.get("status") or {}).get("phase") == phase),
                key=lambda r: r["metadata"].get("creationTimestamp", ""),
            )

        succeeded = ended("SUCCEEDED")
        failed = sorted(
            (r for p in ("FAILED", "COMPLETED_WITH_FAILURES", "CANCELLED") for r in ended(p)),
            key=lambda r: r["metadata"].get("creationTimestamp", ""),
        )
        for group, keep in (
            (succeeded, spec.successful_history_limit),
            (failed, spec.failed_history_limit),
        ):
            for run in group[: max(0, len(group) - keep)]:
                await self.kube.delete(
                    namespace, run["metadata"]["name"], uid=run["metadata"]["uid"]
                )

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
