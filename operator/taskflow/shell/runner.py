"""One writer per flow.

A ``FlowRunner`` owns a flow's status while the flow is active: it feeds replies and timers to
the engine, records the decided status, and only then performs the decision's effects
(dispatches, cancel notices, events). It is made of parts, one job each:

- here: resume (read the flow fresh, the journal, stored replies, children), the loop, sleep
  and wake, finish;
- ``recorder``: recording a decision (journal, API write, background save);
- ``effects``: performing its effects;
- ``stalls``: a round or a write that fails;
- ``idle``: the serialised state of a writer that waits.

Replies that arrive while a write is in flight queue up and are applied together, so API writes
grow with stages, not with tasks.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from typing import TYPE_CHECKING, Any, Literal

from pydantic import ValidationError

from taskflow.api.names import PLURAL
from taskflow.api.spec import TaskflowSpec, TemplateRef
from taskflow.api.status import (
    TERMINAL_FLOW_PHASES,
    FlowPhase,
    Status,
    TaskflowStatus,
    WaitingReason,
)
from taskflow.api.templates import PLURAL as TEMPLATES
from taskflow.api.templates import TaskflowTemplateSpec, instantiate
from taskflow.engine import (
    Admission,
    Ask,
    Decision,
    Dispatch,
    Input,
    Reply,
    decide,
    expressions,
    parse_iso,
    running_asks,
)
from taskflow.kube import Gone
from taskflow.shell import metrics
from taskflow.shell.effects import Effects
from taskflow.shell.idle import IdleState
from taskflow.shell.objects import iso_now, lean, now_ms, rv
from taskflow.shell.recorder import Recorder
from taskflow.shell.settings import RunnerSettings
from taskflow.shell.stalls import Stalls
from taskflow.wire import journal as journal_entry
from taskflow.wire.links import child_input

if TYPE_CHECKING:
    from taskflow.shell.registry import Registry

log = logging.getLogger("taskflow.runner")


class FlowRunner(IdleState, Stalls, Recorder, Effects):
    """One flow's writer: resume, the loop of decide-record-perform, sleep, finish."""

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
        # A task of this flow waits for a slot or a token (the registry wakes it), and since
        # when (the longest-waiting flow is woken first).
        self.throttled = False
        self.throttled_since: float | None = None
        # Whether the parsed spec (the one object it was computed for) uses expressions.
        self._cel_spec: TaskflowSpec | None = None
        self._cel = False
        # Responses of the object store that expressions read, by responseRef.
        self.fetched: dict[str, Any] = {}
        # Set when something arrives; sleep() waits on a future made only while it sleeps
        # (an asyncio.Event would keep a deque per writer, and wait_for a task per sleep).
        self._woken = False
        self._waiter: asyncio.Future[None] | None = None
        self.task: asyncio.Task[None] | None = None
        self.stopped = False
        self.write_later = False
        # Counts decided changes; tells a background write whether it wrote the newest status
        # (identity would not do: an idle writer's status is re-created from its pickle).
        self.changes = 0
        # The API's copy is behind ``status`` (which is in the journal): write it soon.
        self.write_now = False
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

    # -- inputs from outside -----------------------------------------------------------------

    def push(self, item: Input) -> None:
        self.inbox.append(item)
        metrics.REPLY_QUEUE.inc()
        self.wake()

    def reask(
        self, idempotent: frozenset[str], only: set[tuple[str, str, int]] | None = None
    ) -> None:
        """Send again each in-flight attempt (``only`` those, if given) of a service that
        declares idempotent replies: its answer may have been lost, and such a service answers
        a repeated attempt without running it twice. Others time out as documented."""
        if not idempotent or self.stopped or not self.status.stages:
            return
        spec = self.spec()
        subjects = self.settings.subjects
        for stage in self.status.stages:
            for task in stage.tasks:
                key = (stage.name, task.name, task.attempt)
                task_spec = spec.task(stage.name, task.name)
                details = task_spec.task_details if task_spec else None
                if (
                    task.status != Status.RUNNING
                    or task.waiting_reason
                    or details is None
                    or (only is not None and key not in only)
                ):
                    continue
                if (
                    subjects.request(details.service_id, details.action_name, self.namespace)
                    in idempotent
                ):
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
            item = (
                None
                if msg is None
                else await self.registry.to_input(msg, (self.uid, stage, task, attempt))
            )
            if item is not None:
                self.push(item)

    def observe(self, body: dict[str, Any]) -> None:
        """A newer object from the watch: take its spec and resourceVersion, keep our status."""
        if rv(body) <= rv(self.body):
            return
        changed = body["metadata"].get("generation") != self.body["metadata"].get("generation")
        self.body = lean(body)
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
            self.release_start()
            try:
                with contextlib.suppress(Exception):
                    await self.settle()  # a stopping writer still leaves the API up to date
            finally:
                self.registry.finished(self)

    def release_start(self) -> None:
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
        self.body = lean(fresh)
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
            self.status.last_event_seq = max(
                [self.status.last_event_seq, *(seq for seq, _ in self.outbox)]
            )
        else:
            self.outbox = journal_entry.unpublished(self.outbox, stream_last=last)
            # Number on from what the stream has or is about to get: events recorded but lost
            # before the journal kept them (an operator without it) leave no hole in seq.
            self.status.last_event_seq = max([last, *(seq for seq, _ in self.outbox)])
        if self.outbox:
            self.log.info(
                "publishing %d events of the journal the event stream lacks", len(self.outbox)
            )
        lookups = []
        for stage in self.status.stages:
            for task in stage.tasks:
                waiting = task.waiting_reason == WaitingReason.NO_RESPONDERS
                if task.status == Status.RUNNING or waiting:
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
        with contextlib.suppress(ValidationError):  # (an invalid spec runs nothing)
            await self.hold_running(self.spec())
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
            self.log.info(
                "resuming from the journal (record %d; the API has %d)",
                copy.write_seq,
                self.status.write_seq,
            )
            self.status = copy
            self.write_later = self.write_now = True

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
            if self.failures and not self.write_now:
                self.recovered()
            await self.perform(decision)
            if self.write_now or (self.write_later and not self.flush_in()):
                self.write_now = True
                self.save_soon()
            if self.saving is None or self.saving.done():
                self.release_start()  # (otherwise the background write says when)
            wake_at = decision.wake_at
            if self.outbox:  # events NATS did not take: try again soon
                retry = now_ms() + 1000
                wake_at = retry if wake_at is None else min(wake_at, retry)
            elif (
                self.status.phase in TERMINAL_FLOW_PHASES
                and not self.write_later
                and not self.inbox
                and not self._woken
            ):  # (woken: e.g. a retry patched in during this round)
                linger = self.linger_until()
                if linger is None:
                    await self.finish()
                    return
                wake_at = linger
            del decision, inputs  # nothing of this round stays alive while the writer sleeps
            await self.sleep(wake_at)

    async def decide_and_write(self, inputs: list[Input]) -> Decision | None:
        """Decide on the inputs and record the decision (None: the spec is invalid)."""
        while True:
            generation = self.body["metadata"].get("generation")
            try:
                spec = self.spec()
            except ValidationError as exc:
                self.log.error("spec is invalid, flow not run: %s", exc)
                return None
            if spec.template_ref is not None and not spec.stages:
                if not await self.from_template(spec.template_ref):
                    return None
                continue  # the spec now holds the template's stages
            fetched = await self.stored_responses(spec, inputs)
            decision = decide(
                spec=spec,
                status=self.status,
                now=now_ms(),
                inputs=inputs,
                uid=self.uid,
                generation=int(generation or 0),
                event_subject=self.settings.subjects.events(self.uid),
                refuse=self.registry.tenants.refusal(self.namespace),
                fetched=fetched,
                admit=self.admission(),
            )
            self.note_throttled(decision.status)
            if await self.record(decision, generation=generation):
                return decision

    def admission(self) -> Admission | None:
        """The engine's view of the shared flow control: the task's concurrency key (per
        namespace) and its service's limits (per cluster)."""
        slots, registry, namespace = self.registry.slots, self.registry, self.namespace
        if slots is None:
            return None

        def admit(ask: Ask) -> bool:
            gates = registry.gates(namespace, ask)
            return not gates or slots.admit(gates, ask.holder)

        return admit

    def note_throttled(self, status: TaskflowStatus) -> None:
        """Which of this flow's attempts wait for flow control; those that no longer do give
        up their places in line (cancelled, skipped, or sent)."""
        waiting = {
            f"{self.uid}/{s.name}/{t.name}/{t.attempt}"
            for s in status.stages
            for t in s.tasks
            if t.waiting_reason == WaitingReason.THROTTLED and t.status == Status.WAITING
        }
        if waiting and not self.throttled:
            self.throttled_since = time.monotonic()
        self.throttled = bool(waiting)
        slots = self.registry.slots
        if slots is not None:
            slots.withdraw(slots.waiting_of(f"{self.uid}/") - waiting)

    async def hold_running(self, spec: TaskflowSpec) -> None:
        """After a restart: the attempts in their services take their slots again at once,
        so no other attempt starts in their place while they run."""
        slots = self.registry.slots
        if slots is None:
            return
        for ask in running_asks(
            spec=spec, status=self.status, uid=self.uid, fetched=self.fetched or None
        ):
            gates = self.registry.gates(self.namespace, ask)
            if gates and not slots.holds(ask.holder):
                await slots.acquire(gates, ask.holder, force=True)

    async def stored_responses(
        self, spec: TaskflowSpec, inputs: list[Input]
    ) -> dict[str, Any] | None:
        """Responses kept in the object store (over the inline limit) that this flow's
        expressions may read, those of this round's replies included: fetched once each,
        kept while the writer lives."""
        if self._cel_spec is not spec:  # (walked once per parsed spec, not per round)
            self._cel_spec, self._cel = spec, expressions.uses_expressions(spec)
        if not self._cel:
            return None
        refs = [t.response_ref for s in self.status.stages for t in s.tasks if t.response_ref]
        refs += [i.response_ref for i in inputs if isinstance(i, Reply) and i.response_ref]
        refs = [r for r in dict.fromkeys(refs) if r not in self.fetched]
        for ref in refs:
            try:
                self.fetched[ref] = json.loads(await self.bus.load_response(ref))
            except Exception as exc:  # the expression sees null, and says so if it needs it
                self.log.warning("could not read the stored response %s: %s", ref, exc)
                self.fetched[ref] = None
        return self.fetched

    async def from_template(self, ref: TemplateRef) -> bool:
        """A flow made from a template: write the template's stages, options, context and
        the arguments (as inputs) into its spec, with the template's resourceVersion. False:
        it cannot be made (no such template, bad arguments): the flow is failed saying why."""
        problem: str
        try:
            found = await self.kube.get_of(TEMPLATES, self.namespace, ref.name)
        except Gone:
            problem = f"no TaskflowTemplate {ref.name!r} in namespace {self.namespace}"
        else:
            try:
                template = TaskflowTemplateSpec.model_validate(found.get("spec") or {})
            except ValidationError as exc:
                problem = f"TaskflowTemplate {ref.name!r} is invalid: {exc.errors()[0]['msg']}"
            else:
                fields, problems = instantiate(template, ref.arguments)
                if not problems:
                    own = self.spec().inputs or {}
                    fields["inputs"] = {**own, **fields["inputs"]}
                    version = found["metadata"].get("resourceVersion")
                    fields["templateRef"] = {"resourceVersion": version}
                    await self.kube.patch(self.namespace, self.name, {"spec": fields})
                    self.body = lean(await self.kube.get(self.namespace, self.name))
                    self._spec = None
                    self.log.info(
                        "made from TaskflowTemplate %s (resourceVersion %s)", ref.name, version
                    )
                    return True
                problem = f"TaskflowTemplate {ref.name!r}: " + "; ".join(problems)
        self.log.warning("not run: %s", problem)
        now = iso_now()
        status = TaskflowStatus.model_validate(
            {
                "taskflowId": self.uid,
                "phase": FlowPhase.FAILED,
                "startTime": now,
                "completionTime": now,
                "eventSubscription": self.settings.subjects.events(self.uid),
                "conditions": [
                    {
                        "type": "Succeeded",
                        "status": "False",
                        "reason": "InvalidTemplate",
                        "message": problem[:2000],
                        "lastTransitionTime": now,
                    }
                ],
            }
        )
        await self.write(status, generation=None)
        self.status = status
        self.registry.spawn(
            self.kube.event(
                self.body, reason="InvalidTemplate", message=problem[:1024], type_="Warning"
            )
        )
        return False

    async def sleep(self, wake_at: int | None) -> None:
        if self.inbox or self.stopped:
            return
        timeouts = []
        if wake_at is not None:
            timeouts.append(max(0.0, (wake_at - now_ms()) / 1000))
        if self.write_later and not self.write_now:  # (when due now, the background write has it)
            timeouts.append(self.flush_in())
        if self.write_now and (self.saving is None or self.saving.done()):
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
