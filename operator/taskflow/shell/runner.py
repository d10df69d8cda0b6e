"""One writer per flow.

A ``FlowRunner`` owns a flow's status while the flow is active: it feeds replies and timers to
the engine, records the decided status, and only then performs the decision's effects
(dispatches, cancel notices, events). A decision that dispatches is recorded first in the NATS
journal (a write-ahead copy, ~1 ms) and written to the API right after the dispatch, in the
background, so a stage starts without waiting for the API; other decisions that must be durable
are written to the API first. Replies that arrive while a write is in flight queue up and are
applied together, so API writes grow with stages, not with tasks: a task's result alone is
written lazily (at most once per ``flush_interval``), because the reply it came from stays in
the JetStream reply stream until the flow ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import pickle
import time
import zlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from pydantic import ValidationError

from taskflow.api.spec import TaskflowSpec
from taskflow.api.status import (
    TERMINAL_FLOW_PHASES,
    FlowPhase,
    Status,
    TaskflowStatus,
)
from taskflow.engine import (
    Decision,
    Dispatch,
    Emit,
    Input,
    decide,
    iso,
    parse_iso,
    quarantine,
)
from taskflow.engine.recording import Recording, recording
from taskflow.shell import metrics
from taskflow.shell.effects import Effects, describe
from taskflow.shell.kube import PLURAL, Conflict, Gone
from taskflow.wire import journal as journal_entry
from taskflow.wire.events import event_payload
from taskflow.wire.links import (
    child_input,
)
from taskflow.wire.replies import ReplyLimits, clip
from taskflow.wire.subjects import Subjects

if TYPE_CHECKING:
    from taskflow.shell.registry import Registry

log = logging.getLogger("taskflow.runner")



@dataclass(frozen=True)
class RunnerSettings:
    subjects: Subjects = field(default_factory=Subjects)
    reply_limits: ReplyLimits = field(default_factory=ReplyLimits)
    # Responses larger than this go to the NATS object store; status keeps a reference.
    inline_response_bytes: int = 32 * 1024
    # All inline responses of one flow share this budget, so status stays far below etcd's
    # ~1.5 MB object limit however many tasks a flow has.
    inline_responses_budget: int = 512 * 1024
    # Task results alone are written at most this often (stage and flow changes at once).
    flush_interval_s: float = 1.0
    max_depth: int = 10
    # After a cancel, the writer stays this long to record late replies (they change nothing).
    late_reply_window_s: float = 30.0
    # A writer idle this long keeps its status and spec serialised until it is woken.
    compact_after_s: float = 2.0
    # Writers between their start (the first read) and the end of their first round, at most.
    # A burst of new flows (or a restart with many active ones) otherwise has every writer
    # holding its spec, status and models while it waits its turn for the API.
    max_starting: int = 64


def now_ms() -> int:
    return int(time.time() * 1000)


def _iso_now() -> str:
    return iso(now_ms())


def _rv(body: dict[str, Any]) -> int:
    try:
        return int(body["metadata"].get("resourceVersion") or 0)
    except (TypeError, ValueError):
        return 0


def _lean(body: dict[str, Any]) -> dict[str, Any]:
    """What a writer keeps of an object: identity, metadata and spec. Not status (the writer
    has its own, as a model) nor managedFields: a seed-sized object decodes to ~40 KB of
    Python objects, most of it those two, and an active flow keeps its body as long as it runs."""
    meta = body.get("metadata") or {}
    if "managedFields" in meta:
        meta = {k: v for k, v in meta.items() if k != "managedFields"}
    lean: dict[str, Any] = {k: body[k] for k in ("apiVersion", "kind", "spec") if k in body}
    lean["metadata"] = meta
    return lean


class FlowRunner(Effects):
    def __init__(self, *, registry: Registry, body: dict[str, Any]) -> None:
        self.registry = registry
        self.kube = registry.kube
        self.bus = registry.bus
        self.settings = registry.settings
        meta = body["metadata"]
        self.uid: str = meta["uid"]
        self.namespace: str = meta["namespace"]
        self.name: str = meta["name"]
        # Only what observe() compares until resume() reads the object fresh: a writer may
        # wait a while for its turn to start, and the spec is read again then anyway.
        keep = ("name", "namespace", "uid", "resourceVersion", "generation")
        self.body: dict[str, Any] = {"metadata": {k: meta[k] for k in keep if k in meta}}
        self._starting = False
        # The parsed spec and the generation it was parsed at (a spec change bumps it).
        self._spec: tuple[Any, TaskflowSpec] | None = None
        # An idle writer's status and spec, serialised (see compact()).
        self._status: TaskflowStatus | None = None
        self._frozen_status: bytes | None = None
        self._frozen_spec: bytes | None = None
        self.status = TaskflowStatus()
        self.inbox: list[Input] = []
        # Set when something arrives; sleep() waits on a future made only while it sleeps
        # (an asyncio.Event would keep a deque per writer, and wait_for a task per sleep).
        self._woken = False
        self._waiter: asyncio.Future[None] | None = None
        self.task: asyncio.Task[None] | None = None
        self.stopped = False
        self.dirty = False
        # Counts decided changes; tells a background write whether it wrote the newest status
        # (identity would not do: an idle writer's status is re-created from its pickle).
        self.changes = 0
        # The API's copy is behind ``status`` (which is in the journal): write it soon.
        self.unsaved = False
        self.saving: asyncio.Task[None] | None = None
        self.journal_rev: int | None = None  # of this writer's last journal entry
        self.last_write = 0.0
        self.sent_at: dict[tuple[str, str, int], float] = {}
        # Events decided and not yet acknowledged by the event stream, (seq, payload), in order.
        self.outbox: list[tuple[int, bytes]] = []
        # Attempts whose reply the NATS client dropped (see Registry.on_dropped).
        self.missed: set[tuple[str, str, int]] = set()
        # The last error that failed a round (reported once), and how many rounds in a row.
        self.trouble: str | None = None
        self.failures = 0
        self.save_after = 0.0  # (monotonic) no background write before, after a failed one
        self.log = logging.LoggerAdapter(
            log, {"flow": f"{self.namespace}/{self.name}", "uid": self.uid}
        )

    @property
    def status(self) -> TaskflowStatus:
        if self._status is None:
            assert self._frozen_status is not None
            self._status = pickle.loads(zlib.decompress(self._frozen_status))
            self._frozen_status = None
        return self._status

    @status.setter
    def status(self, value: TaskflowStatus) -> None:
        self._status = value
        self._frozen_status = None

    def compact(self) -> None:
        """Idle for a while (e.g. waiting on slow services): keep status and spec serialised,
        about a tenth of the memory of the models and dicts, until something wakes the writer.
        Reading ``status`` or ``spec()`` brings them back exactly as they were."""
        if self._status is not None:
            self._frozen_status = zlib.compress(
                pickle.dumps(self._status, pickle.HIGHEST_PROTOCOL), 1)
            self._status = None
        spec = self.body.get("spec")
        if spec is not None:
            self._frozen_spec = zlib.compress(json.dumps(spec, separators=(",", ":")).encode(), 1)
            self.body["spec"] = None
        self._spec = None

    # -- inputs from outside -----------------------------------------------------------------

    def push(self, item: Input) -> None:
        self.inbox.append(item)
        metrics.REPLY_QUEUE.inc()
        self.wake()

    def reask(self, idempotent: frozenset[str], only: set[tuple[str, str, int]] | None = None
              ) -> None:
        """Send again each in-flight attempt (``only`` those, if given) of a service that
        declares idempotent replies: its answer may have been lost, and such a service answers
        a repeated attempt without running it twice. Others time out as documented."""
        if not idempotent or self.stopped or not self.status.stages:
            return
        spec = self.spec()
        subjects = self.settings.subjects
        for stage_spec, stage in zip(spec.stages, self.status.stages, strict=False):
            for task_spec, task in zip(stage_spec.tasks, stage.tasks, strict=False):
                key = (stage.name, task.name, task.attempt)
                details = task_spec.task_details
                if (task.status != Status.RUNNING or task.waiting_reason or details is None
                        or (only is not None and key not in only)):
                    continue
                if subjects.request(details.service_id, details.action_name,
                                    self.namespace) in idempotent:
                    metrics.REASKED.inc()
                    self.registry.spawn(self.dispatch(spec, Dispatch(*key)))

    async def _reask_unanswered(self, unanswered: set[tuple[str, str, int]]) -> None:
        self.reask(await self.link.idempotent_subjects(), only=unanswered)

    def reread(self, attempt: tuple[str, str, int]) -> None:
        """Read this attempt's reply from the stream soon (once for a burst of drops)."""
        first = not self.missed
        self.missed.add(attempt)
        if first:
            self.registry.spawn(self._reread())

    async def _reread(self) -> None:
        await asyncio.sleep(0.2)  # a burst of drops: read them together, once stored
        missed, self.missed = self.missed, set()
        subjects = self.settings.subjects
        for stage, task, attempt in missed:
            msg = await self.link.stored_reply(subjects.reply(self.uid, stage, task, attempt))
            item = None if msg is None else await self.registry.to_input(
                msg, (self.uid, stage, task, attempt))
            if item is not None:
                self.push(item)

    def observe(self, body: dict[str, Any]) -> None:
        """A newer object from the watch: take its spec and resourceVersion, keep our status."""
        if _rv(body) <= _rv(self.body):
            return
        changed = body["metadata"].get("generation") != self.body["metadata"].get("generation")
        self.body = _lean(body)
        if changed:
            self.wake()

    def stop(self) -> None:
        self.stopped = True
        self.wake()

    def wake(self) -> None:
        self._woken = True
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def _wait(self, timeout: float | None) -> None:
        """Until wake() or the timeout (TimeoutError); at once if woken since the last clear."""
        if self._woken:
            return
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            async with asyncio.timeout(timeout):
                await self._waiter
        finally:
            self._waiter = None

    # -- the loop ----------------------------------------------------------------------------

    async def run(self) -> None:
        try:
            await self.registry.starting.acquire()
            self._starting = True
            if self.stopped:
                return  # deleted (or shutting down) while waiting for its turn
            await self.resume()
            await self.loop()
        except Gone:
            self.log.info("flow deleted")
        except asyncio.CancelledError:
            raise
        except Exception:
            self.log.exception("flow writer failed; it restarts on the next watch event")
        finally:
            self.started()
            try:
                with contextlib.suppress(Exception):
                    await self.settle()  # a stopping writer still leaves the API up to date
            finally:
                self.registry.finished(self)

    def started(self) -> None:
        """The first round is done (or the writer ends): let the next writer start."""
        if self._starting:
            self._starting = False
            self.registry.starting.release()

    async def resume(self) -> None:
        """Read the flow fresh (never act on a stale watch event) and collect what arrived
        while nobody was writing it: stored replies, finished children, the last event."""
        fresh = await self.kube.get(self.namespace, self.name)
        if fresh["metadata"].get("uid") != self.uid:
            raise Gone(f"{self.namespace}/{self.name} was deleted and created again")
        self.body = _lean(fresh)
        try:
            self.status = TaskflowStatus.model_validate(fresh.get("status") or {})
        except ValidationError as exc:
            self.log.warning("status unreadable, starting over: %s", exc)
            self.status = TaskflowStatus()
        await self.recover_journal()
        if not self.status.stages:
            return
        subjects = self.settings.subjects
        last = await self.link.last_event_seq(subjects.events(self.uid))
        if last is None:  # NATS cannot say: publish the whole outbox (repeats are dropped)
            self.outbox = sorted(self.outbox)
            self.status.last_event_seq = max([self.status.last_event_seq,
                                              *(seq for seq, _ in self.outbox)])
        else:
            self.outbox = journal_entry.unpublished(self.outbox, stream_last=last)
            # Number on from what the stream has or is about to get: events recorded but lost
            # before the journal kept them (an operator without it) leave no hole in seq.
            self.status.last_event_seq = max([last, *(seq for seq, _ in self.outbox)])
        if self.outbox:
            self.log.info("publishing %d events of the journal the event stream lacks",
                          len(self.outbox))
        lookups = []
        for stage in self.status.stages:
            for task in stage.tasks:
                if task.status == Status.RUNNING or task.waiting_reason == "NoResponders":
                    lookups.append((stage.name, task.name, task.attempt))
        replies = await asyncio.gather(
            *(self.link.stored_reply(subjects.reply(self.uid, s, t, a)) for s, t, a in lookups)
        )
        unanswered = set()
        for (s, t, a), msg in zip(lookups, replies, strict=True):
            if msg is None:
                unanswered.add((s, t, a))
                continue
            item = await self.registry.to_input(msg, (self.uid, s, t, a))
            if item is not None:
                self.push(item)
        if unanswered:
            # Sent (the record says so) with no reply kept: the operator may have stopped
            # before the request left, or the reply was lost with NATS. Ask idempotent
            # services again; the others answer late or time out.
            self.registry.spawn(self._reask_unanswered(unanswered))
        if any(s.status == Status.RUNNING for s in self.status.stages):
            for child in await self.kube.list_children(self.namespace, self.uid):
                item = child_input(child)
                if item is not None:
                    self.push(item)

    async def recover_journal(self) -> None:
        """The operator may have stopped after a record in the journal but before the API
        write that follows: the journal's copy is then the newer one, the attempts it holds
        were sent (so a reply or a timeout decides them, never a blind second send), and its
        events may not have reached the event stream (resume() publishes them again)."""
        if self.status.stages and not self.status.write_seq:
            # Written by an operator without the journal, or by this one through a CRD too old
            # to keep writeSeq (see write()): there is no way to tell which copy is newer.
            return
        found = await self.bus.journaled(self.uid)
        if found is None:
            return
        raw, self.journal_rev = found  # (dropped at the end, if still this one)
        try:
            entry = journal_entry.decode_entry(raw, key=self.settings.subjects.key)
        except ValueError as exc:
            self.log.warning("journal copy ignored: %s", exc)
            return
        self.outbox = list(entry.events)  # (resume() keeps those the stream lacks)
        copy = entry.status
        if journal_entry.resume_from(self.status, copy) is copy:
            self.log.info("resuming from the journal (record %d; the API has %d)",
                          copy.write_seq, self.status.write_seq)
            self.status = copy
            self.dirty = self.unsaved = True

    async def loop(self) -> None:
        while not self.stopped:
            self._woken = False  # a wake from here on (e.g. a spec change) means one more round
            inputs, self.inbox = self.inbox, []
            metrics.REPLY_QUEUE.dec(len(inputs))
            decision: Decision | Literal[False] | None
            try:
                decision = await self.decide_and_write(inputs)
            except (Gone, asyncio.CancelledError):
                raise
            except Exception as exc:
                decision = await self.decide_despite(inputs, exc)
            if decision is False:
                continue
            if decision is None:
                return
            if self.failures and not self.unsaved:
                self.recovered()
            await self.perform(decision)
            if self.unsaved or (self.dirty and not self.flush_in()):
                self.unsaved = True
                self.save_soon()
            if self.saving is None or self.saving.done():
                self.started()  # (otherwise the background write says when)
            wake_at = decision.wake_at
            if self.outbox:  # events NATS did not take: try again soon
                retry = now_ms() + 1000
                wake_at = retry if wake_at is None else min(wake_at, retry)
            elif (self.status.phase in TERMINAL_FLOW_PHASES and not self.dirty and not self.inbox
                  and not self._woken):  # (woken: e.g. a retry patched in during this round)
                linger = self.linger_until()
                if linger is None:
                    await self.finish()
                    return
                wake_at = linger
            del decision, inputs  # nothing of this round stays alive while the writer sleeps
            await self.sleep(wake_at)

    async def decide_despite(
        self, inputs: list[Input], exc: Exception
    ) -> Decision | Literal[False] | None:
        """A round failed. An input that cannot be decided or recorded fails its attempt
        (``BadReply``) and the round is made again without it. Any other failure is reported
        (a ``Stalled`` condition and a Warning Event) and the round is made again after a
        pause, with its inputs kept: the writer never gives up on a flow, so its timeouts,
        ``maxAge`` and cancel still act once the cause is gone. False: nothing decided."""
        if inputs:
            try:
                cleaned = quarantine(
                    spec=self.spec(), status=self.status, inputs=inputs, now=now_ms(),
                    uid=self.uid, generation=int(self.body["metadata"].get("generation") or 0),
                    event_subject=self.settings.subjects.events(self.uid),
                )
            except Exception as inner:  # (the spec itself, say): reported below
                cleaned, exc = inputs, inner
            # By identity: comparing a deep input by value could itself raise.
            replaced = len(cleaned) != len(inputs) or any(
                a is not b for a, b in zip(inputs, cleaned, strict=False))
            if replaced:
                metrics.BAD_REPLIES.labels(reason="unrecordable").inc(len(inputs) - sum(
                    1 for a, b in zip(inputs, cleaned, strict=False) if a is b))
                self.log.warning("a reply could not be recorded; its attempt fails: %s", exc)
                try:
                    return await self.decide_and_write(cleaned)
                except (Gone, asyncio.CancelledError):
                    raise
                except Exception as again:
                    exc, inputs = again, cleaned
        self.inbox[:0] = inputs  # nothing is lost: the next round has them again
        metrics.REPLY_QUEUE.inc(len(inputs))
        await asyncio.sleep(self.note_trouble(exc))
        return False

    def note_trouble(self, exc: Exception) -> float:
        """A round or a write failed: say so (a ``Stalled`` condition and a Warning Event,
        once per distinct error) and return how long to pause before trying again."""
        self.failures += 1
        pause: float = min(0.5 * 2.0 ** (self.failures - 1), 30.0)
        message = clip(describe(exc), 300, "message")
        self.log.error("flow writer failed (%d in a row), trying again in %.1f s: %s",
                       self.failures, pause, message)
        metrics.WRITER_FAILURES.inc()
        if message != self.trouble:  # once per distinct error, not per try
            self.trouble = message
            text = f"the operator cannot record this flow and keeps trying: {message}"
            # The Event names the kind of error only; its text (which may quote status) goes
            # to the condition, as namespace-private as the status itself.
            code = getattr(exc, "status", None)
            kind = f"{type(exc).__name__}{f' {code}' if code else ''}"
            self.registry.spawn(self.kube.event(
                self.body, reason="WriterFailing", type_="Warning",
                message=f"the operator cannot record this flow and keeps trying ({kind}); "
                        "see the Stalled condition"))
            self.registry.spawn(self.mark_stalled(text))
        return pause

    def recovered(self) -> None:
        if self.failures:
            self.log.info("flow writer recovered")
        self.trouble, self.failures, self.save_after = None, 0, 0.0

    async def mark_stalled(self, message: str) -> None:
        """A ``Stalled`` condition on the stored status as it is (the writer's own status may
        be what cannot be written). The next full write drops it: the engine's conditions do
        not include it."""
        try:
            fresh = await self.kube.get(self.namespace, self.name)
            status = fresh.setdefault("status", {})
            conditions = [c for c in status.get("conditions") or []
                          if isinstance(c, dict) and c.get("type") != "Stalled"]
            conditions.append({"type": "Stalled", "status": "True", "reason": "WriterFailing",
                               "message": message, "lastTransitionTime": _iso_now()})
            status["conditions"] = conditions
            await self.kube.replace_status(fresh)
        except Exception as exc:  # (a conflict: the writer got through meanwhile)
            self.log.warning("could not set the Stalled condition: %s", exc)

    def spec(self) -> TaskflowSpec:
        generation = self.body["metadata"].get("generation")
        if self._spec is None or self._spec[0] != generation or generation is None:
            if self.body.get("spec") is None and self._frozen_spec is not None:
                self.body["spec"] = json.loads(zlib.decompress(self._frozen_spec))
            self._frozen_spec = None
            self._spec = (generation, TaskflowSpec.model_validate(self.body["spec"]))
        return self._spec[1]

    async def decide_and_write(self, inputs: list[Input]) -> Decision | None:
        while True:
            meta = self.body["metadata"]
            generation = meta.get("generation")
            try:
                spec = self.spec()
            except ValidationError as exc:
                self.log.error("spec is invalid, flow not run: %s", exc)
                return None
            decision = decide(
                spec=spec,
                status=self.status,
                now=now_ms(),
                inputs=inputs,
                uid=self.uid,
                generation=int(generation or 0),
                event_subject=self.settings.subjects.events(self.uid),
                refuse=self.registry.tenants.refusal(self.namespace),
            )
            status = decision.status
            events = self.events_of(decision)
            how = recording(
                journal=self.registry.journal_on, durable=decision.durable, emits=bool(events),
                dispatches=any(isinstance(e, Dispatch) for e in decision.effects))
            if how.journaled:
                status.write_seq = self.status.write_seq + 1
                if await self.journal(status, [*self.outbox, *events]):
                    self.adopt(status, decision.changed)
                    self.outbox.extend(events)
                    if how == Recording.JOURNAL_THEN_BACKGROUND:
                        self.unsaved = True
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
                            self.unsaved = True
                        else:
                            self.dirty = self.unsaved = False
                    return decision
                how = Recording.API_FIRST if decision.durable else Recording.LAZY  # no journal
            if how == Recording.API_FIRST:
                await self.settle()  # our own background write goes first
                status.write_seq = self.status.write_seq + 1
                if not await self.write(status, generation=generation):
                    continue  # the spec changed under us: decide again with the same inputs
                self.adopt(status, decision.changed)
                self.outbox.extend(events)
                self.dirty = self.unsaved = False
                return decision
            self.adopt(status, decision.changed)
            self.outbox.extend(events)
            return decision

    def events_of(self, decision: Decision) -> list[tuple[int, bytes]]:
        """The decision's events as they will be published: (seq, payload)."""
        time_ms = now_ms()
        return [
            (effect.seq, json.dumps(
                event_payload(effect, name=self.name, namespace=self.namespace,
                              status=decision.status, time_ms=time_ms),
                separators=(",", ":"), default=str).encode())
            for effect in decision.effects if isinstance(effect, Emit)
        ]

    def adopt(self, status: TaskflowStatus, changed: bool) -> None:
        """Take a decided status; ``changes`` moves with ``status`` (no await between), so a
        background write never pairs an older status with a newer count."""
        self.status = status
        if changed:
            self.dirty = True
            self.changes += 1

    async def journal(self, status: TaskflowStatus, events: list[tuple[int, bytes]]) -> bool:
        try:
            self.journal_rev = await self.bus.journal(
                self.uid, journal_entry.encode(status, events, key=self.settings.subjects.key))
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
        if (self.unsaved and (self.saving is None or self.saving.done())
                and time.monotonic() >= self.save_after):
            self.saving = asyncio.get_running_loop().create_task(self.save())

    async def save(self) -> None:
        """Write the newest status while one is owed (``unsaved``); the only background writer
        of a flow. A new writer's first API write is part of its start: the slot goes after.
        A failed write is tried again by the loop after a pause that grows (``save_after``);
        meanwhile the writer goes on deciding (timeouts, cancel), each decision journaled."""
        try:
            while self.unsaved:
                self.unsaved = False
                status, changes = self.status, self.changes  # the newest, results included
                try:
                    # Never void: the journaled status was acted on, whatever the spec says
                    # now; a spec change reaches the engine through the watch.
                    await self.write(status, generation=None)
                except Gone:
                    self.stop()
                    return
                except Exception as exc:
                    self.unsaved = True
                    self.started()  # a failing write must not hold a start slot
                    if not self.stopped:  # (else the journal has it for the next writer)
                        self.save_after = time.monotonic() + self.note_trouble(exc)
                        self.wake()  # the loop's sleep now counts to save_after
                    return
                if changes == self.changes:
                    self.dirty = False
            self.recovered()
            if self.dirty or self.status.phase in TERMINAL_FLOW_PHASES:
                self.wake()  # newer results came meanwhile, or the flow may end now
        finally:
            self.started()

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
                "apiVersion": self.body.get("apiVersion", "taskflow.dev/v1alpha1"),
                "kind": "Taskflow",
                "metadata": self.body["metadata"],
                "status": content,
            }
            try:
                result = await self.kube.replace_status(body)
            except Conflict:
                metrics.STATUS_CONFLICTS.inc()
                fresh = await self.kube.get(self.namespace, self.name)
                if _rv(fresh) > _rv(self.body):
                    self.observe(fresh)
                if generation is not None and fresh["metadata"].get("generation") != generation:
                    return False
                continue
            metrics.STATUS_WRITES.inc()
            if status.write_seq and "writeSeq" not in (result.get("status") or {}):
                self.registry.journal_unusable()
            if _rv(result) > _rv(self.body):
                self.body = _lean(result)
            return True
        raise RuntimeError("status write kept conflicting")

    async def sleep(self, wake_at: int | None) -> None:
        if self.inbox or self.stopped:
            return
        timeouts = []
        if wake_at is not None:
            timeouts.append(max(0.0, (wake_at - now_ms()) / 1000))
        if self.dirty and not self.unsaved:  # (when unsaved, the background write has it)
            timeouts.append(self.flush_in())
        if self.unsaved and (self.saving is None or self.saving.done()):
            timeouts.append(max(0.0, self.save_after - time.monotonic()))  # a failed write
        timeout = min(timeouts) if timeouts else None
        idle = self.settings.compact_after_s
        with contextlib.suppress(TimeoutError):
            if timeout is None or timeout > idle:
                with contextlib.suppress(TimeoutError):
                    await self._wait(idle)
                    return
                self.compact()  # a long sleep: keep only the serialised state meanwhile
                timeout = None if timeout is None else timeout - idle
            await self._wait(timeout)

    def linger_until(self) -> int | None:
        """Epoch ms until which a cancelled flow still records late replies, if not past."""
        if self.status.phase != FlowPhase.CANCELLED or not self.status.cancelled_at:
            return None
        until = parse_iso(self.status.cancelled_at) + int(self.settings.late_reply_window_s * 1000)
        return until if until > now_ms() else None

    async def finish(self) -> None:
        phase = self.status.phase
        metrics.FLOWS_FINISHED.labels(phase=str(phase)).inc()
        self.registry.spawn(self.link.forget_replies(self.uid))
        if self.journal_rev is not None:
            self.registry.spawn(self.bus.forget_journal(self.uid, self.journal_rev))
        self.log.info("flow ended %s", phase)


__all__ = ["PLURAL", "FlowPhase", "FlowRunner", "RunnerSettings"]
