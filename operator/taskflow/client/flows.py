"""``TaskflowClient``: produce, inspect, cancel, retry and follow Taskflows (async).

The one stateful piece of the users' side: it holds the connections (Kubernetes, made from
the kubeconfig on first use; NATS, connected on first use or shared) and a cache of where each
uid lives, and turns every public call into the seed's envelope. What a call writes or returns
is built by the pure modules beside it (``links``, ``details``, ``retries``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException
from pydantic import BaseModel

from taskflow.api.links import OWN_METADATA
from taskflow.api.status import TERMINAL_FLOW_PHASES
from taskflow.client.details import details_tree, fill_responses
from taskflow.client.envelope import Envelope, TaskflowError, _guard, ok
from taskflow.client.kube import API_VERSION, Kube, load_kube
from taskflow.client.links import ParentLink
from taskflow.client.retries import retry_request
from taskflow.engine import parse_iso
from taskflow.wire.links import DEPTH
from taskflow.wire.request import AttemptKey
from taskflow.wire.subjects import Subjects

EVENT_STREAM = "TASKFLOW_EVENTS"
DEFAULT_NATS_URL = "nats://127.0.0.1:4222"
DEFAULT_MAX_DEPTH = 10
FINAL_PHASES = frozenset(str(p) for p in TERMINAL_FLOW_PHASES)
UID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")

log = logging.getLogger("taskflow.client")


def is_final_event(event: Mapping[str, Any]) -> bool:
    """Whether an event is its flow's last word: the TASKFLOW event with a final status."""
    data = event.get("data") or {}
    return event.get("eventType") == "TASKFLOW" and data.get("taskflowStatus") in FINAL_PHASES


class TaskflowClient:
    """Produce, inspect, cancel, retry and watch Taskflows (async).

    ``namespace`` is where ``produce`` creates flows and where bare names are looked up
    (default: the kubeconfig context's namespace). ``search_namespaces`` limits where a uid is
    looked up (default: the client's namespace, then every namespace).
    """

    def __init__(
        self,
        *,
        kubeconfig: str | None = None,
        context: str | None = None,
        api_client: k8s.ApiClient | None = None,
        namespace: str | None = None,
        search_namespaces: Sequence[str] | None = None,
        nats_url: str | None = None,
        nc: Any = None,
        subjects: Subjects | None = None,
        max_depth: int = DEFAULT_MAX_DEPTH,
    ) -> None:
        self._kubeconfig = kubeconfig
        self._context = context
        self._api_client = api_client
        self._own_api_client = api_client is None
        self._namespace = namespace
        self.search_namespaces = list(search_namespaces) if search_namespaces else None
        self.nats_url = nats_url or os.environ.get("NATS_URL") or DEFAULT_NATS_URL
        self._nc = nc
        self._own_nc = nc is None
        self.subjects = subjects or Subjects()
        self.max_depth = max_depth
        self._kube: Kube | None = None
        self._where: dict[str, tuple[str, str]] = {}  # uid -> (namespace, name)
        self._lock = asyncio.Lock()

    # -- connections -------------------------------------------------------------------------

    @property
    def kube(self) -> Kube:
        if self._kube is None:
            if self._api_client is None:
                self._api_client, default = load_kube(self._kubeconfig, self._context)
                self._namespace = self._namespace or default
            self._kube = Kube(self._api_client)
        return self._kube

    @property
    def namespace(self) -> str:
        """Where flows are created and bare names looked up."""
        if self._namespace is None:
            _ = self.kube  # loading the kubeconfig sets its context's namespace
            self._namespace = self._namespace or "default"
        return self._namespace

    async def nats(self) -> Any:
        """The NATS connection, made on first use."""
        async with self._lock:
            if self._nc is None or self._nc.is_closed:
                import nats

                async def on_error(exc: Exception) -> None:
                    log.warning("nats: %s", exc)

                # Fail fast when NATS is not there at all (nats-py uses one setting for the
                # first connect and for reconnects), then reconnect for ever once connected.
                self._nc = await nats.connect(
                    self.nats_url,
                    name="taskflow-client",
                    connect_timeout=5,
                    max_reconnect_attempts=2,
                    reconnect_time_wait=0.5,
                    error_cb=on_error,
                )
                self._nc.options["max_reconnect_attempts"] = -1
                self._nc.options["reconnect_time_wait"] = 2
                self._own_nc = True
            return self._nc

    @property
    def has_nats(self) -> bool:
        return self._nc is not None and not self._nc.is_closed

    def use_nats(self, nc: Any) -> None:
        """Share a NATS connection the caller owns (the client never closes it)."""
        self._nc, self._own_nc = nc, False

    async def close(self) -> None:
        if self._own_nc and self._nc is not None and not self._nc.is_closed:
            with contextlib.suppress(Exception):
                await self._nc.drain()
        if self._own_api_client and self._api_client is not None:
            closing: Any = self._api_client
            with contextlib.suppress(Exception):
                closing.close()
            self._api_client = None
            self._kube = None

    async def __aenter__(self) -> TaskflowClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    # -- ids ---------------------------------------------------------------------------------

    def allowed(self, namespace: str) -> bool:
        return self.search_namespaces is None or namespace in self.search_namespaces

    def check_namespace(self, namespace: str) -> None:
        if not self.allowed(namespace):
            allowed = ", ".join(self.search_namespaces or [])
            raise TaskflowError(
                f"namespace {namespace!r} is not allowed here (allowed: {allowed})", "Forbidden"
            )

    async def locate(self, ident: str) -> tuple[str, str]:
        """(namespace, name) of a flow given its uid, "namespace/name" or bare name."""
        ident = ident.strip()
        if not ident:
            raise TaskflowError("a taskflow id is required", "BadRequest")
        if "/" in ident:
            namespace, _, name = ident.partition("/")
            self.check_namespace(namespace)
            return namespace, name
        if not UID_RE.match(ident):
            self.check_namespace(self.namespace)
            return self.namespace, ident
        if ident in self._where:
            return self._where[ident]
        found = await self._from_events(ident) or await self._by_listing(ident)
        if found is None:
            where = ", ".join(self.search_namespaces) if self.search_namespaces else "any namespace"
            raise TaskflowError(f"no taskflow with uid {ident} in {where}", "NotFound")
        self.check_namespace(found[0])
        self._where[ident] = found
        return found

    async def fetch(self, ident: str) -> dict[str, Any]:
        namespace, name = await self.locate(ident)
        body = await self.kube.get(namespace, name)
        if UID_RE.match(ident.strip()) and body["metadata"].get("uid") != ident.strip():
            self._where.pop(ident.strip(), None)  # a stale entry: the flow was re-created
            namespace, name = await self.locate(ident)
            body = await self.kube.get(namespace, name)
        uid = body["metadata"].get("uid")
        if uid:
            self._where[uid] = (namespace, name)
        return body

    async def _from_events(self, uid: str) -> tuple[str, str] | None:
        """The flow's last event names its namespace and name (cheap, when NATS is up)."""
        if self._nc is None or not self._nc.is_connected:
            return None
        try:
            raw = await self._nc.jetstream().get_last_msg(
                EVENT_STREAM, self.subjects.events(uid), direct=True
            )
            summary = json.loads(raw.data or b"{}")["data"]["taskflowObject"]
            where = (str(summary["namespace"]), str(summary["name"]))
        except Exception:
            return None
        try:
            body = await self.kube.get(*where)
        except TaskflowError:
            return None
        return where if body["metadata"].get("uid") == uid else None

    async def _by_listing(self, uid: str) -> tuple[str, str] | None:
        scopes: list[str | None] = list(self.search_namespaces or [])
        if not scopes:
            scopes = [self.namespace, None]
        for scope in scopes:
            try:
                items = await self.kube.list_flows(scope, metadata_only=True)
            except ApiException as exc:
                if scope is None and exc.status == 403:
                    continue  # not allowed to list every namespace: only ours was searched
                raise TaskflowError.from_api(exc) from exc
            for item in items:
                meta = item.get("metadata") or {}
                if meta.get("uid") == uid:
                    return str(meta["namespace"]), str(meta["name"])
        return None

    # -- produce -----------------------------------------------------------------------------

    async def produce(
        self,
        schema: Mapping[str, Any] | BaseModel,
        namespace: str | None = None,
        name: str | None = None,
        *,
        labels: Mapping[str, str] | None = None,
        parent: ParentLink | None = None,
    ) -> Envelope:
        """Create a Taskflow from the seed's ``TaskFlowSchema`` (a camelCase dict or a
        ``TaskflowSpec``); also takes a whole manifest (``{"metadata": ..., "spec": ...}``).

        Returns ``{"success": True, "data": {"taskflowId", "eventSubscription"}}``, or the API
        server's validation message in ``{"success": False, "error": {...}}``.
        """
        return await _guard(self._produce(schema, namespace, name, labels, parent))

    async def _produce(
        self,
        schema: Mapping[str, Any] | BaseModel,
        namespace: str | None,
        name: str | None,
        labels: Mapping[str, str] | None,
        parent: ParentLink | None,
    ) -> Envelope:
        metadata: dict[str, Any] = {}
        if isinstance(schema, BaseModel):
            spec: Any = schema.model_dump(by_alias=True, exclude_none=True, mode="json")
        elif isinstance(schema, Mapping):
            spec = dict(schema)
            if "spec" in spec and "stages" not in spec:  # a whole manifest
                manifest_meta = spec.get("metadata") or {}
                metadata = {
                    k: v
                    for k, v in manifest_meta.items()
                    if k in ("name", "generateName", "labels", "annotations")
                }
                namespace = namespace or manifest_meta.get("namespace")
                spec = spec["spec"]
        else:
            raise TaskflowError(
                f"a taskflow schema is a dict or a TaskflowSpec, not {type(schema).__name__}",
                "BadRequest",
            )
        if parent is not None:
            if parent.depth > self.max_depth:
                raise TaskflowError(
                    f"nesting depth {parent.depth} exceeds the limit of {self.max_depth}",
                    "DepthLimit",
                )
            namespace = parent.namespace  # an owner reference only works in one namespace
        namespace = namespace or self.namespace
        self.check_namespace(namespace)
        if name:
            metadata["name"] = name
        elif "name" not in metadata:
            metadata.setdefault("generateName", "taskflow-")
        if labels:
            metadata["labels"] = {**(metadata.get("labels") or {}), **labels}
        for kind in ("labels", "annotations"):  # the operator's own: only parent.apply sets them
            if isinstance(metadata.get(kind), Mapping):
                metadata[kind] = {
                    k: v for k, v in metadata[kind].items() if not str(k).startswith(OWN_METADATA)
                }
        body: dict[str, Any] = {
            "apiVersion": API_VERSION,
            "kind": "Taskflow",
            "metadata": metadata,
            "spec": spec,
        }
        if parent is not None:
            parent.apply(body)
        try:
            created = await self.kube.create(namespace, body)
        except ApiException as exc:
            if exc.status == 409 and parent is not None and name:
                created = await self._same_child(namespace, name, parent, exc)
            else:
                raise TaskflowError.from_api(exc) from exc
        uid = created["metadata"]["uid"]
        self._where[uid] = (namespace, created["metadata"]["name"])
        return ok({"taskflowId": uid, "eventSubscription": self.subjects.events(uid)})

    async def _same_child(
        self, namespace: str, name: str, parent: ParentLink, exc: ApiException
    ) -> dict[str, Any]:
        """The child already exists (a redelivered request): reuse it if it is ours."""
        existing = await self.kube.get(namespace, name)
        if not parent.made(existing["metadata"]):
            raise TaskflowError.from_api(exc) from exc
        return existing

    async def parent_link(
        self, context: Mapping[str, Any], idempotency_key: str | None = None
    ) -> ParentLink:
        """The link for a child flow started while serving a task with this execution context
        (the ``taskflowExecutionContext`` header's JSON)."""
        flow = context.get("taskflow") if isinstance(context, Mapping) else None
        if not isinstance(flow, Mapping) or not flow.get("id"):
            raise TaskflowError(
                "no taskflowExecutionContext: a child flow can only be started while serving "
                "a task",
                "BadRequest",
            )
        uid = str(flow["id"])
        info = flow.get("taskInfo") or {}
        key = AttemptKey.decode(idempotency_key)
        if key is not None and key.uid == uid:
            stage, task, attempt = key.stage, key.task, key.attempt
        else:
            stage, task, attempt = "", str(info.get("name") or ""), int(info.get("attempt") or 0)
        body = await self.fetch(uid)
        meta = body["metadata"]
        if not stage:
            stage_id = flow.get("stageId")
            stage = next(
                (
                    s.get("name", "")
                    for s in (body.get("status") or {}).get("stages", [])
                    if s.get("id") == stage_id
                ),
                "",
            )
        if not stage or not task:
            raise TaskflowError("the execution context names no stage or task", "BadRequest")
        depth = int((meta.get("annotations") or {}).get(DEPTH, "0") or 0) + 1
        return ParentLink(
            uid=uid,
            name=meta["name"],
            namespace=meta["namespace"],
            stage=stage,
            task=task,
            attempt=attempt,
            context=dict(context),
            depth=depth,
        )

    # -- details -----------------------------------------------------------------------------

    async def get_details(self, taskflow_id: str, *, fetch_responses: bool = True) -> Envelope:
        """The whole tree: every stage and task (status, attempt, attempts, response, error)
        and, under each task, the nested flows it started, recursively."""
        return await _guard(self._details(taskflow_id, fetch_responses))

    async def _details(self, taskflow_id: str, fetch_responses: bool) -> Envelope:
        root = await self.fetch(taskflow_id)
        tree = await details_tree(root, kube=self.kube, allowed=self.allowed)
        if fetch_responses:
            await fill_responses(tree, nats=self.nats)
        return ok(tree)

    # -- suspend, resume, history -------------------------------------------------------------

    async def suspend(self, taskflow_id: str, *, suspend: bool = True) -> Envelope:
        """``spec.suspend``: true holds new dispatches back (attempts in flight finish), false
        resumes. Returns at once; the flow's ``Suspended`` condition says when it took effect."""

        async def call() -> Envelope:
            body = await self.fetch(taskflow_id)
            meta = body["metadata"]
            await self.kube.patch(meta["namespace"], meta["name"], {"spec": {"suspend": suspend}})
            return ok(
                {
                    "taskflowId": meta["uid"],
                    "name": meta["name"],
                    "namespace": meta["namespace"],
                    "suspend": suspend,
                }
            )

        return await _guard(call())

    async def history(
        self,
        *,
        namespace: str | None = None,
        phase: str | None = None,
        service: str | None = None,
        since_ms: int | None = None,
        limit: int = 1000,
    ) -> list[dict[str, Any]]:
        """Finished flows the operator deleted after their TTL (``TASKFLOW_HISTORY``), oldest
        first: ``namespace`` (None: all), a ``phase``, a ``service`` one of their tasks
        called, completed at or after ``since_ms`` (epoch ms)."""
        from nats.js.api import DeliverPolicy

        nc = await self.nats()
        js = nc.jetstream()
        subject = f"taskflow.history.{namespace or '*'}.*"
        try:
            sub = await js.subscribe(
                subject, ordered_consumer=True, deliver_policy=DeliverPolicy.ALL
            )
        except Exception as exc:
            raise TaskflowError(
                f"cannot read the history ({subject}): {exc}", "Unavailable"
            ) from exc
        found: list[dict[str, Any]] = []
        try:
            while True:
                try:
                    msg = await sub.next_msg(timeout=1.0)
                except Exception:  # nothing (more) stored
                    break
                with contextlib.suppress(ValueError, TypeError):
                    item = json.loads(msg.data)
                    if isinstance(item, dict) and _matches(item, phase, service, since_ms):
                        found.append(item)
                with contextlib.suppress(Exception):
                    if int(msg.metadata.num_pending) == 0:
                        break
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        return found[-limit:]

    # -- cancel ------------------------------------------------------------------------------

    async def cancel(self, taskflow_id: str, *, wait: float | None = 10.0) -> Envelope:
        """Cancel a running flow (``spec.cancel: true``); in-flight tasks become CANCELLED and
        the services get a cancel notice. Waits up to ``wait`` seconds for the operator."""
        return await _guard(self._cancel(taskflow_id, wait))

    async def _cancel(self, taskflow_id: str, wait: float | None) -> Envelope:
        body = await self.fetch(taskflow_id)
        meta, status = body["metadata"], body.get("status") or {}
        namespace, name = meta["namespace"], meta["name"]
        settled = status.get("observedGeneration") == meta.get("generation")
        if status.get("phase") in FINAL_PHASES and settled:
            raise TaskflowError(
                f"taskflow {namespace}/{name} already ended {status['phase']}: nothing to cancel",
                "AlreadyFinished",
                taskflowId=meta["uid"],
            )
        before = status.get("cancelledAt")
        await self.kube.patch(namespace, name, {"spec": {"cancel": True}})
        data: dict[str, Any] = {"taskflowId": meta["uid"], "name": name, "namespace": namespace}
        if not wait:
            return ok({**data, "acknowledged": False})
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            fresh = await self.kube.get(namespace, name)
            st = fresh.get("status") or {}
            if st.get("cancelledAt") not in (None, before) and st.get(
                "observedGeneration"
            ) == fresh["metadata"].get("generation"):
                cond: dict[str, Any] = next(
                    (c for c in st.get("conditions") or [] if c.get("type") == "Cancelled"), {}
                )
                if cond.get("status") == "False":
                    raise TaskflowError(
                        cond.get("message") or "cancel refused",
                        cond.get("reason") or "Refused",
                        taskflowId=meta["uid"],
                    )
                return ok({**data, "acknowledged": True, "phase": st.get("phase")})
            await asyncio.sleep(0.2)
        return ok({**data, "acknowledged": False})

    # -- retry -------------------------------------------------------------------------------

    async def retry(
        self,
        taskflow_id: str,
        stages: Sequence[Any] | None = None,
        tasks: Sequence[Any] | None = None,
        failed_only: bool = False,
        *,
        retry_id: str | None = None,
        wait: float | None = 10.0,
    ) -> Envelope:
        """The seed's ``retryTaskflow(taskflowId, stagesInfo?, tasksInfo?)``.

        ``stages``: stage names or ids, or the seed's ``{"stageId": ..., "taskIds": [...]}``;
        ``tasks``: ``"stage/task"`` strings, ``(stage, task)`` pairs or the same dicts. None of
        them retries the whole flow (SUCCEEDED tasks are kept under exactlyOnceTaskExecution);
        ``failed_only`` keeps only FAILED, TIMED_OUT and CANCELLED tasks of the selection.
        Writes a fresh ``spec.retry`` (and ``spec.cancel: false``) and waits up to ``wait``
        seconds for the operator to accept or refuse it.
        """
        return await _guard(self._retry(taskflow_id, stages, tasks, failed_only, retry_id, wait))

    async def _retry(
        self,
        taskflow_id: str,
        stages: Sequence[Any] | None,
        tasks: Sequence[Any] | None,
        failed_only: bool,
        retry_id: str | None,
        wait: float | None,
    ) -> Envelope:
        body = await self.fetch(taskflow_id)
        meta = body["metadata"]
        request = retry_request(body, stages, tasks, failed_only=failed_only, retry_id=retry_id)
        rid = request["id"]
        await self.kube.patch(
            meta["namespace"], meta["name"], {"spec": {"cancel": False, "retry": request}}
        )
        data: dict[str, Any] = {"taskflowId": meta["uid"], "retryId": rid}
        if not wait:
            return ok({**data, "acknowledged": False})
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            fresh = await self.kube.get(meta["namespace"], meta["name"])
            ack = (fresh.get("status") or {}).get("retry") or {}
            if ack.get("id") == rid:
                if not ack.get("accepted"):
                    raise TaskflowError(
                        ack.get("message") or "retry refused",
                        "RetryRefused",
                        retryId=rid,
                        taskflowId=meta["uid"],
                    )
                return ok(
                    {
                        **data,
                        "acknowledged": True,
                        "accepted": True,
                        "message": ack.get("message", ""),
                    }
                )
            await asyncio.sleep(0.2)
        return ok({**data, "acknowledged": False})

    # -- events ------------------------------------------------------------------------------

    async def subscribe_events(
        self, taskflow_id: str, replay: bool = True, *, until_final: bool = True
    ) -> AsyncIterator[dict[str, Any]]:
        """The flow's events (the seed's ``{"eventType", "data"}`` plus ``seq`` and ``time``),
        in order, from JetStream: all of its history first when ``replay``. Ends after the
        TASKFLOW event with a final status (when nothing newer is stored)."""
        from nats.js.api import DeliverPolicy

        ident = taskflow_id.strip()
        uid = ident if UID_RE.match(ident) else (await self.fetch(ident))["metadata"]["uid"]
        nc = await self.nats()
        js = nc.jetstream()
        try:
            sub = await js.subscribe(
                self.subjects.events(uid),
                ordered_consumer=True,
                deliver_policy=DeliverPolicy.ALL if replay else DeliverPolicy.NEW,
            )
        except Exception as exc:
            raise TaskflowError(
                f"cannot subscribe to {self.subjects.events(uid)}: {exc} (is the operator "
                "running? it creates the TASKFLOW_EVENTS stream)",
                "Unavailable",
            ) from exc
        try:
            async for msg in sub.messages:
                try:
                    event = json.loads(msg.data)
                except ValueError:
                    continue
                if not isinstance(event, dict):
                    continue
                yield event
                if until_final and is_final_event(event):
                    pending = 0
                    with contextlib.suppress(Exception):
                        pending = int(msg.metadata.num_pending)
                    if pending == 0:
                        return
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()


def _matches(
    item: dict[str, Any], phase: str | None, service: str | None, since_ms: int | None
) -> bool:
    if phase and item.get("phase") != phase:
        return False
    if service and not any(
        t.get("serviceId") == service
        for s in item.get("stages") or []
        for t in s.get("tasks") or []
    ):
        return False
    if since_ms is not None:
        done = item.get("completionTime")
        if not isinstance(done, str):
            return False
        try:
            return parse_iso(done) >= since_ms
        except ValueError:
            return False
    return True
