"""All active flow writers, by uid: the one place watch events and replies come in.

kopf's watch events start a writer for each flow that needs one and hand newer objects to it;
NATS replies are read (``wire.replies``), checked (child links, large responses to the object
store) and pushed to their flow's writer; a reconnect or a dropped reply makes the writers ask
again or read the reply stream. The writer itself is ``runner.FlowRunner``.

With active/active replicas (``buckets.Buckets``) every replica sees every watch event but
starts writers only for the flows of the buckets it holds. Of the other flows it keeps the
identity (name, namespace, uid, resourceVersion, generation) of each unfinished one, a few
hundred bytes a flow, so that taking a bucket over starts its writers at once, without listing
every flow (finished ones included) with their whole bodies; each writer reads its flow fresh
anyway. Finished flows whose journal entry is still there (their last events may not have
reached the stream) are found by the journal's keys when a bucket is taken.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import json
import logging
from typing import Any

from nats.aio.msg import Msg

from taskflow.api.limits import Gate
from taskflow.api.status import TERMINAL_FLOW_PHASES, TaskError
from taskflow.engine import BAD_REPLY, Ask, Input, Reply
from taskflow.kube import Gone, Kube
from taskflow.shell import metrics
from taskflow.shell.buckets import Buckets, bucket_of
from taskflow.shell.bus import Bus
from taskflow.shell.effects import child_error, describe
from taskflow.shell.limits import ServiceLimits
from taskflow.shell.reaper import Reaper, response_refs
from taskflow.shell.runner import FlowRunner
from taskflow.shell.settings import RunnerSettings
from taskflow.shell.slots import Slots
from taskflow.shell.tenants import Link, Tenants
from taskflow.wire.links import PARENT_UID, child_input, link_problem
from taskflow.wire.replies import read_heartbeat, read_reply

log = logging.getLogger("taskflow.runner")


class Registry:
    """All active flow writers, keyed by uid; routes watch events and replies to them."""

    def __init__(self, *, kube: Kube, bus: Bus, settings: RunnerSettings, tenants: Tenants) -> None:
        self.kube = kube
        self.bus = bus  # the operator's own connection: journal, object store
        self.tenants = tenants
        self.reaper: Reaper | None = None  # deletes finished flows after their TTL
        self.slots: Slots | None = None  # concurrency slots shared by every replica
        self.limits: ServiceLimits | None = None  # the cluster's ServiceLimits
        self.settings = settings
        self.runners: dict[str, FlowRunner] = {}
        self.starting = asyncio.Semaphore(settings.max_starting)
        self._background: set[asyncio.Task[Any]] = set()
        self.journal_on = True
        # Flows with a journal entry at startup: a writer may have stopped after recording the
        # end of its flow and before its last events reached the stream; one runs again for
        # each, even if it looks finished, and publishes what the stream lacks.
        self.unfinished: set[str] = set()
        # Active/active: the buckets this replica holds (None: every flow is this replica's),
        # the unfinished flows of every bucket (for a takeover), and the watched namespaces.
        self.buckets: Buckets | None = None
        self.known: dict[str, dict[str, Any]] = {}
        self.namespaces: list[str] | None = None

    def journal_unusable(self) -> None:
        """The API dropped status.writeSeq: the CRD predates it, and without it a restarted
        writer cannot tell the journal's copy from an older one. Write the API first again."""
        if self.journal_on:
            self.journal_on = False
            log.error(
                "the Taskflow CRD in the cluster is older than this operator (it drops "
                "status.writeSeq): apply crds/ from this release; until then dispatches "
                "wait for the API write"
            )

    def link(self, namespace: str) -> Link:
        """Where a flow of ``namespace`` dispatches, listens and publishes."""
        return self.tenants.link(namespace)

    def wake_throttled(self) -> None:
        """A slot or a limit changed: the writers whose tasks wait for one decide again, the
        one whose task has waited longest first."""
        waiting = [r for r in self.runners.values() if r.throttled]
        for runner in sorted(waiting, key=lambda r: r.throttled_since or 0.0):
            runner.wake()

    def gates(self, namespace: str, ask: Ask) -> tuple[Gate, ...]:
        """The flow-control gates an attempt must pass: its task's concurrency key (per
        namespace) and its service's limits (per cluster)."""
        gates: tuple[Gate, ...] = ()
        if ask.key is not None:
            gates = (Gate(key=f"{namespace}/{ask.key}", limit=ask.limit),)
        if self.limits is not None and ask.service_id is not None and ask.action_name:
            gates += self.limits.gates(ask.service_id, ask.action_name)
        return gates

    def spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro, context=contextvars.Context())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- watch events (kopf) -----------------------------------------------------------------

    def observe(self, event_type: str | None, body: dict[str, Any]) -> None:
        meta = body.get("metadata", {})
        uid = meta.get("uid")
        if not uid:
            return
        runner = self.runners.get(uid)
        if event_type == "DELETED":
            self.known.pop(uid, None)
            if runner:
                runner.stop()
            if self.reaper is not None:
                self.reaper.forget(uid)
            for key in response_refs(body):  # its large responses go with it
                self.spawn(self.bus.forget_response(key))
            return
        if self.reaper is not None:
            self.reaper.observe(body)
        if runner is not None:
            runner.observe(body)
        elif (needs_runner(body) or uid in self.unfinished) and self.owns(uid):
            self.unfinished.discard(uid)
            self.start(body)
        if self.buckets is not None:
            self.remember(body)
        self.notify_parent(body)

    # -- active/active: buckets taken and lost -------------------------------------------------

    def owns(self, uid: str) -> bool:
        """Whether this replica writes the flow ``uid`` (always, without buckets)."""
        return self.buckets is None or self.buckets.owns(uid)

    def remember(self, body: dict[str, Any]) -> None:
        meta = body["metadata"]
        if needs_runner(body) or meta["uid"] in self.unfinished:
            keep = ("name", "namespace", "uid", "resourceVersion", "generation")
            self.known[meta["uid"]] = {k: meta[k] for k in keep if k in meta}
        else:
            self.known.pop(meta["uid"], None)

    def take_bucket(self, bucket: int) -> None:
        """This replica now holds ``bucket``: a writer for each of its unfinished flows (each
        resumes from the API, the journal and the reply stream), and for its flows left in the
        journal."""
        assert self.buckets is not None
        count = self.buckets.count
        started = 0
        for uid, meta in list(self.known.items()):
            if uid not in self.runners and bucket_of(uid, count) == bucket:
                self.unfinished.discard(uid)
                self.start({"metadata": meta})
                started += 1
        log.info("bucket %d: %d writers started", bucket, started)
        self.spawn(self._journaled_of(bucket))

    async def _journaled_of(self, bucket: int) -> None:
        """Flows of ``bucket`` with a journal entry and no writer: a replica may have died after
        recording the end of a flow and before its last events left (their watch event said
        finished, so they are not among the known flows). Rare: listed by metadata only."""
        assert self.buckets is not None
        count = self.buckets.count
        try:
            keys = await self.bus.journal_keys()
        except Exception as exc:
            log.warning("bucket %d: could not read the journal's keys: %s", bucket, exc)
            return
        wanted = {k for k in keys if bucket_of(k, count) == bucket and k not in self.runners} - set(
            self.known
        )
        if not wanted:
            return
        where: list[str | None] = list(self.namespaces or []) or [None]
        for namespace in where:
            for item in await self.kube.list_flows(namespace, metadata_only=True):
                meta = item.get("metadata") or {}
                uid = meta.get("uid")
                if uid in wanted and uid not in self.runners and self.owns(uid):
                    self.unfinished.discard(uid)
                    self.start({"metadata": meta})

    async def drop_bucket(self, bucket: int, bound_s: float) -> None:
        """This replica no longer holds ``bucket`` (given back, or its Lease may expire):
        its writers stop at the end of their round, leaving the API up to date; those still
        busy after ``bound_s`` are cancelled, with their background writes, so none of them
        acts once another replica may hold the bucket."""
        assert self.buckets is not None
        count = self.buckets.count
        runners = [r for r in self.runners.values() if bucket_of(r.uid, count) == bucket]
        for runner in runners:
            runner.stop()
        tasks = {r.task for r in runners if r.task is not None}
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=max(0.0, bound_s))
        if pending:
            log.warning(
                "bucket %d: %d writers did not stop in %.1fs: cancelled",
                bucket,
                len(pending),
                bound_s,
            )
            for runner in runners:
                for task in (runner.task, runner.saving):
                    if task is not None and not task.done():
                        task.cancel()
            await asyncio.wait(pending, timeout=1.0)
        log.info("bucket %d: %d writers stopped", bucket, len(runners))

    def start(self, body: dict[str, Any]) -> FlowRunner:
        runner = FlowRunner(registry=self, body=body)
        self.runners[runner.uid] = runner
        metrics.ACTIVE_FLOWS.set(len(self.runners))
        # An empty context, not a copy of the caller's: a task started from a kopf handler
        # would otherwise keep kopf's context variables (the handler's cause, with the whole
        # watch-event body, its patch, logger and memo) alive for as long as the flow runs.
        runner.task = asyncio.get_running_loop().create_task(
            runner.run(), context=contextvars.Context()
        )
        return runner

    def finished(self, runner: FlowRunner) -> None:
        if self.runners.get(runner.uid) is runner:
            del self.runners[runner.uid]
        metrics.ACTIVE_FLOWS.set(len(self.runners))

    def notify_parent(self, body: dict[str, Any]) -> None:
        """A child flow changed: tell its parent's writer (if the parent is active)."""
        labels = body.get("metadata", {}).get("labels") or {}
        parent_uid = labels.get(PARENT_UID)
        if not parent_uid:
            return
        parent = self.runners.get(parent_uid)
        if parent is None:
            return
        problem = link_problem(body, uid=parent.uid, namespace=parent.namespace)
        if problem is not None:  # a label anyone creating a flow can write: not a link
            metrics.FORGED_LINKS.inc()
            log.warning(
                "ignored a flow that names %s/%s as its parent: %s",
                parent.namespace,
                parent.name,
                problem,
            )
            return
        item = child_input(body)
        if item is not None:
            parent.push(item)

    # -- replies (NATS) ----------------------------------------------------------------------

    async def on_reply(self, msg: Msg, via: str | None = None) -> None:
        """A message on a reply subject, over the operator's connection (``via`` None) or a
        tenant's (the name of its credentials Secret)."""
        parsed = self.settings.subjects.parse_reply(msg.subject)
        if parsed is None:  # a guess or a forgery: no reply subject this operator made
            metrics.FORGED_REPLIES.inc()
            return
        runner = self.runners.get(parsed[0])
        if runner is None:
            return  # the stream keeps it; the flow's writer finds it when it resumes
        if not self.tenants.serves(runner.namespace, via):
            metrics.FORGED_REPLIES.inc()  # from another tenant's account than the flow's
            return
        item = await self.to_input(msg, parsed)
        if item is not None:
            runner.push(item)

    async def on_heartbeat(self, msg: Msg, via: str | None = None) -> None:
        """A service says an attempt is alive (and how far it got)."""
        parsed = self.settings.subjects.parse_heartbeat(msg.subject)
        if parsed is None:
            metrics.FORGED_REPLIES.inc()
            return
        runner = self.runners.get(parsed[0])
        if runner is None or not self.tenants.serves(runner.namespace, via):
            return
        _, stage, task, attempt = parsed
        runner.push(read_heartbeat(stage=stage, task=task, attempt=attempt, data=msg.data or b""))

    def on_reconnected(self, via: str | None = None) -> None:
        """Replies sent while NATS was away were dropped by the services' clients: ask every
        in-flight attempt of an idempotent service again (the same attempt, the same key), on
        the connection that came back."""
        self.spawn(self._reask_all(via))

    async def _reask_all(self, via: str | None) -> None:
        await asyncio.sleep(1.0)  # services reconnect too (no responders: redelivered anyway)
        runners = [r for r in self.runners.values() if self.tenants.serves(r.namespace, via)]
        if runners:
            subjects = await runners[0].link.idempotent_subjects(max_age=0)
            for runner in runners:
                runner.reask(subjects)

    def on_dropped(self, subject: str) -> None:
        """The client dropped a reply (a slow consumer): the stream still has it, so its flow's
        writer reads it from there rather than letting the attempt time out."""
        parsed = self.settings.subjects.parse_reply(subject)
        runner = self.runners.get(parsed[0]) if parsed else None
        if parsed is not None and runner is not None:
            metrics.DROPPED_REPLIES.inc()
            runner.reread(parsed[1:])

    async def to_input(self, msg: Msg, parsed: tuple[str, str, str, int]) -> Input | None:
        """The engine input for a message on a reply subject. Never raises: whatever a service
        sends, the attempt gets an outcome (``BadReply`` when the message is unusable)."""
        uid, stage, task, attempt = parsed
        item = read_reply(
            stage=stage,
            task=task,
            attempt=attempt,
            data=msg.data or b"",
            headers=msg.headers,
            limits=self.settings.reply_limits,
        )
        if not isinstance(item, Reply):
            return item
        if item.error is not None and item.error.reason == BAD_REPLY:
            metrics.BAD_REPLIES.labels(reason="malformed").inc()
            log.warning(
                "bad reply for %s/%s/%s attempt %d: %s",
                uid,
                stage,
                task,
                attempt,
                item.error.message,
            )
        # Measured as status keeps it: a body of "1E15"s is 4.5 times larger once parsed, one of
        # raw DEL characters 6 times (escaped as \u007f); nothing grows more, so only a body
        # that could pass the limit is serialised again.
        limit = self.inline_limit(uid)
        could_pass = item.ok and len(msg.data) * 6 > limit
        stored = json.dumps(item.data, separators=(",", ":")).encode() if could_pass else b""
        if could_pass and max(len(msg.data), len(stored)) > limit:
            try:
                ref = await self.bus.store_response(f"{uid}/{stage}/{task}/{attempt}", stored)
            except Exception as exc:
                # Kept in the reply stream: a later writer of this flow reads it again.
                log.warning("could not store a large response of %s/%s: %s", uid, task, exc)
                return Reply(
                    stage=stage,
                    task=task,
                    attempt=attempt,
                    ok=False,
                    error=TaskError(
                        message=f"the response of {len(msg.data)} bytes could not be stored",
                        reason=BAD_REPLY,
                    ),
                )
            item = dataclasses.replace(item, data=None, response_ref=ref)
        if item.children:
            problem, children = await self.verify_children(uid, attempt, item.children)
            if problem is not None:
                metrics.BAD_REPLIES.labels(reason="child").inc()
                log.warning(
                    "reply for %s/%s/%s attempt %d names a child that does not count: %s",
                    uid,
                    stage,
                    task,
                    attempt,
                    problem,
                )
                return Reply(
                    stage=stage, task=task, attempt=attempt, ok=False, error=child_error(problem)
                )
            self.spawn(self.report_children(uid, children))
        return item

    def inline_limit(self, uid: str) -> int:
        runner = self.runners.get(uid)
        tasks = max(1, sum(len(s.tasks) for s in runner.status.stages)) if runner else 1
        share = self.settings.inline_responses_budget // tasks
        return max(256, min(self.settings.inline_response_bytes, share))

    async def verify_children(
        self, uid: str, attempt: int, refs: tuple[str, ...]
    ) -> tuple[str | None, list[dict[str, Any]]]:
        """The children a reply names, each checked to be this flow's own (same namespace,
        owned by it, started for this attempt); or the first problem found."""
        runner = self.runners.get(uid)
        if runner is None:
            return "the flow is not active", []
        bodies = []
        for ref in refs:
            namespace, _, name = ref.partition("/")
            if namespace != runner.namespace:
                return f"child flow {ref} is not in this flow's namespace {runner.namespace}", []
            try:
                body = await self.kube.get(namespace, name)
            except Gone:
                return f"child flow {ref} does not exist", []
            except Exception as exc:  # (retried per maxRetries, as any failed attempt)
                return f"child flow {ref} could not be read: {describe(exc)}", []
            problem = link_problem(body, uid=uid, namespace=runner.namespace, attempt=attempt)
            if problem is not None:
                return problem, []
            bodies.append(body)
        return None, bodies

    async def report_children(self, uid: str, children: list[dict[str, Any]]) -> None:
        """Children named in a reply may have finished before the reply arrived."""
        runner = self.runners.get(uid)
        for body in children:
            item = child_input(body)
            if item is not None and runner is not None:
                runner.push(item)

    async def close(self) -> None:
        for runner in list(self.runners.values()):
            runner.stop()
        for runner in list(self.runners.values()):
            if runner.task:
                with contextlib.suppress(BaseException):
                    await runner.task


def needs_runner(body: dict[str, Any]) -> bool:
    """Active flows, and finished ones whose spec changed since (a retry or a cancel)."""
    status = body.get("status") or {}
    if status.get("phase") not in {str(p) for p in TERMINAL_FLOW_PHASES}:
        return True
    return bool(body.get("metadata", {}).get("generation") != status.get("observedGeneration"))
