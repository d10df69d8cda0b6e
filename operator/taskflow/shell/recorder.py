"""Recording a flow's decided status: the journal, the API write, the background save.

Which of them a decision needs, and in which order, is the pure rule of ``engine.recording``;
this module carries it out. A decision that dispatches or emits is kept first in the NATS
journal (signed, ~1 ms); the API write then follows at once (a stage or flow transition), in
the background (a dispatch: one write at a time per flow, results that arrive meanwhile ride
along) or lazily (results alone, at most once per ``flush_interval``). Without the journal the
API is written first. Every API write is a PUT of status with the last seen resourceVersion,
read again on a conflict. A mixin of ``runner.FlowRunner``, whose state it reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from typing import TYPE_CHECKING, Any

from taskflow.api.names import API_VERSION
from taskflow.api.status import TERMINAL_FLOW_PHASES, TaskflowStatus
from taskflow.engine import Decision, Dispatch, Emit
from taskflow.engine.recording import Recording, recording
from taskflow.kube import Conflict, Gone
from taskflow.shell import metrics
from taskflow.shell.objects import lean, now_ms, rv
from taskflow.wire import journal as journal_entry
from taskflow.wire.events import event_payload

if TYPE_CHECKING:
    from taskflow.kube import Kube
    from taskflow.shell.bus import Bus
    from taskflow.shell.registry import Registry
    from taskflow.shell.settings import RunnerSettings


class Recorder:
    """The recording half of a flow's writer (``runner.FlowRunner`` holds the state).

    Two flags say the API's copy is behind, and how soon it must catch up: ``write_later``,
    the writer's status has changes the API has not that may wait for the flush interval
    (results, written lazily); ``write_now``, the journal holds a status the API still owes
    (written in the background, at once). ``save_soon`` starts that write."""

    uid: str
    name: str
    namespace: str
    body: dict[str, Any]
    bus: Bus
    kube: Kube
    registry: Registry
    settings: RunnerSettings
    log: logging.LoggerAdapter[logging.Logger]
    outbox: list[tuple[int, bytes]]
    write_later: bool
    write_now: bool
    changes: int
    stopped: bool
    saving: asyncio.Task[None] | None
    journal_rev: int | None
    last_write: float
    save_after: float

    if TYPE_CHECKING:  # provided by runner.FlowRunner and its other parts

        @property
        def status(self) -> TaskflowStatus: ...
        @status.setter
        def status(self, value: TaskflowStatus) -> None: ...
        def observe(self, body: dict[str, Any]) -> None: ...
        def wake(self) -> None: ...
        def stop(self) -> None: ...
        def release_start(self) -> None: ...
        def recovered(self) -> None: ...
        def note_trouble(self, exc: Exception) -> float: ...

    async def record(self, decision: Decision, *, generation: Any) -> bool:
        """Record a decision before its effects, as ``engine.recording`` says (journal, then
        the API at once, in the background or lazily; or the API first). False: the decision
        is void (the spec changed under an API-first write): decide again."""
        status = decision.status
        events = self.events_of(decision)
        how = recording(
            journal=self.registry.journal_on,
            durable=decision.durable,
            emits=bool(events),
            dispatches=any(isinstance(e, Dispatch) for e in decision.effects),
        )
        if how.journaled:
            status.write_seq = self.status.write_seq + 1
            if await self.journal(status, [*self.outbox, *events]):
                self.adopt(status, decision.changed)
                self.outbox.extend(events)
                if how == Recording.JOURNAL_THEN_BACKGROUND:
                    self.write_now = True
                elif how == Recording.JOURNAL_THEN_API:
                    # Never void: the journal's record stands, whatever the spec says now
                    # (a spec change reaches the engine next round).
                    await self.settle()
                    try:
                        await self.write(status, generation=None)
                    except Gone:
                        raise
                    except Exception as exc:  # the journal has it: the background writer
                        self.log.warning("status write failed; trying again: %s", exc)
                        self.write_now = True
                    else:
                        self.write_later = self.write_now = False
                return True
            how = Recording.API_FIRST if decision.durable else Recording.LAZY  # no journal
        if how == Recording.API_FIRST:
            await self.settle()  # our own background write goes first
            status.write_seq = self.status.write_seq + 1
            if not await self.write(status, generation=generation):
                return False  # the spec changed under us: decide again with the same inputs
            self.adopt(status, decision.changed)
            self.outbox.extend(events)
            self.write_later = self.write_now = False
            return True
        self.adopt(status, decision.changed)
        self.outbox.extend(events)
        return True

    def events_of(self, decision: Decision) -> list[tuple[int, bytes]]:
        """The decision's events as they will be published: (seq, payload)."""
        time_ms = now_ms()
        return [
            (
                effect.seq,
                json.dumps(
                    event_payload(
                        effect,
                        name=self.name,
                        namespace=self.namespace,
                        status=decision.status,
                        time_ms=time_ms,
                    ),
                    separators=(",", ":"),
                    default=str,
                ).encode(),
            )
            for effect in decision.effects
            if isinstance(effect, Emit)
        ]

    def adopt(self, status: TaskflowStatus, changed: bool) -> None:
        """Take a decided status; ``changes`` moves with ``status`` (no await between), so a
        background write never pairs an older status with a newer count."""
        self.status = status
        if changed:
            self.write_later = True
            self.changes += 1

    async def journal(self, status: TaskflowStatus, events: list[tuple[int, bytes]]) -> bool:
        try:
            self.journal_rev = await self.bus.journal(
                self.uid, journal_entry.encode(status, events, key=self.settings.subjects.key)
            )
        except Exception as exc:
            self.log.warning("journal write failed; writing to the API first: %s", exc)
            return False
        metrics.JOURNAL_WRITES.inc()
        return True

    def flush_in(self) -> float:
        """Seconds until results alone may be written (their replies are kept in the reply
        stream, so they are written lazily); 0 when due."""
        return max(0.0, self.last_write + self.settings.flush_interval_s - time.monotonic())

    def save_soon(self) -> None:
        """Write a journaled status to the API in the background (one write at a time, none
        before ``save_after`` when the last one failed)."""
        if (
            self.write_now
            and (self.saving is None or self.saving.done())
            and time.monotonic() >= self.save_after
        ):
            self.saving = asyncio.get_running_loop().create_task(self.save())

    async def save(self) -> None:
        """Write the newest status while one is owed (``write_now``); the only background writer
        of a flow. A new writer's first API write is part of its start: the slot goes after.
        A failed write is tried again by the loop after a pause that grows (``save_after``);
        meanwhile the writer goes on deciding (timeouts, cancel), each decision journaled."""
        try:
            while self.write_now:
                self.write_now = False
                status, changes = self.status, self.changes  # the newest, results included
                try:
                    # Never void: the journaled status was acted on, whatever the spec says
                    # now; a spec change reaches the engine through the watch.
                    await self.write(status, generation=None)
                except Gone:
                    self.stop()
                    return
                except Exception as exc:
                    self.write_now = True
                    self.release_start()  # a failing write must not hold a start slot
                    if not self.stopped:  # (else the journal has it for the next writer)
                        self.save_after = time.monotonic() + self.note_trouble(exc)
                        self.wake()  # the loop's sleep now counts to save_after
                    return
                if changes == self.changes:
                    self.write_later = False
            self.recovered()
            if self.write_later or self.status.phase in TERMINAL_FLOW_PHASES:
                self.wake()  # newer results came meanwhile, or the flow may end now
        finally:
            self.release_start()

    async def settle(self) -> None:
        if self.saving is not None:
            with contextlib.suppress(Exception):
                await self.saving
            self.saving = None

    async def write(self, status: TaskflowStatus, *, generation: Any) -> bool:
        """Write status; False when the spec is no longer the one at ``generation`` (the
        decision is void). ``generation=None`` writes whatever the spec is now."""
        if generation is not None and self.body["metadata"].get("generation") != generation:
            return False
        content = status.model_dump(by_alias=True, exclude_none=True, mode="json")
        self.last_write = time.monotonic()  # from its start: results that land meanwhile wait
        for _ in range(10):
            # PUT .../status takes status only; metadata carries the resourceVersion.
            body = {
                "apiVersion": self.body.get("apiVersion", API_VERSION),
                "kind": "Taskflow",
                "metadata": self.body["metadata"],
                "status": content,
            }
            try:
                result = await self.kube.replace_status(body)
            except Conflict:
                metrics.STATUS_CONFLICTS.inc()
                fresh = await self.kube.get(self.namespace, self.name)
                if rv(fresh) > rv(self.body):
                    self.observe(fresh)
                if generation is not None and fresh["metadata"].get("generation") != generation:
                    return False
                continue
            metrics.STATUS_WRITES.inc()
            if status.write_seq and "writeSeq" not in (result.get("status") or {}):
                self.registry.journal_unusable()
            if rv(result) > rv(self.body):
                self.body = lean(result)
            return True
        raise RuntimeError("status write kept conflicting")
