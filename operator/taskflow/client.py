"""The application client: produce, get details, cancel, retry and watch Taskflows.

Async first (``TaskflowClient``), with a small synchronous wrapper (``Client``). Every call
returns the seed's envelope, ``{"success": True, "data": ...}`` or
``{"success": False, "error": {"message": ..., "code": ...}}``, so application code ported
from the seed's TypeScript keeps its shape::

    async with TaskflowClient(namespace="default") as taskflow:
        res = await taskflow.produce(taskflow_obj)          # the seed's TaskFlowSchema
        details = await taskflow.get_details(res["data"]["taskflowId"])
        async for event in taskflow.subscribe_events(res["data"]["taskflowId"]):
            ...

Kubernetes is reached with the ``kubernetes`` package (run on threads, so the event loop never
blocks); NATS (events, large responses) with nats-py, connected on first use. An id is the
flow's uid (``status.taskflowId``) or ``"namespace/name"``; a bare name means the client's
namespace.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import re
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from kubernetes import client as k8s
from kubernetes import config as _k8s_config
from kubernetes.client.exceptions import ApiException
from pydantic import BaseModel

from taskflow.api.crd import GROUP, VERSION
from taskflow.api.links import OWN_METADATA
from taskflow.api.status import TERMINAL_FLOW_PHASES
from taskflow.wire.links import (
    DEPTH,
    PARENT_ATTEMPT,
    PARENT_CONTEXT,
    PARENT_NAME,
    PARENT_TASK,
    PARENT_UID,
)
from taskflow.wire.subjects import Subjects

PLURAL = "taskflows"
API_VERSION = f"{GROUP}/{VERSION}"
EVENT_STREAM = "TASKFLOW_EVENTS"
DEFAULT_NATS_URL = "nats://127.0.0.1:4222"
DEFAULT_MAX_DEPTH = 10
FINAL_PHASES = frozenset(str(p) for p in TERMINAL_FLOW_PHASES)
UID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
_RETRY_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
_METADATA_ONLY = "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1"
k8s_config: Any = _k8s_config  # its loaders are untyped

T = TypeVar("T")
log = logging.getLogger("taskflow.client")
Envelope = dict[str, Any]


# -- envelopes and errors ----------------------------------------------------------------------


def ok(data: Any) -> Envelope:
    return {"success": True, "data": data}


def fail(message: str, code: str | None = None, **extra: Any) -> Envelope:
    error: dict[str, Any] = {"message": message}
    if code is not None:
        error["code"] = code
    error.update({k: v for k, v in extra.items() if v is not None})
    return {"success": False, "error": error}


class TaskflowError(Exception):
    """A call that cannot be answered; public methods turn it into a failure envelope."""

    def __init__(self, message: str, code: str | None = None, **extra: Any) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.extra = extra

    def envelope(self) -> Envelope:
        return fail(self.message, self.code, **self.extra)

    @classmethod
    def from_api(cls, exc: ApiException, what: str | None = None) -> TaskflowError:
        """The API server's own message (e.g. a validation error naming the field)."""
        body: Any = None
        with contextlib.suppress(ValueError, TypeError):
            body = json.loads(exc.body) if exc.body else None
        if isinstance(body, dict) and body.get("message"):
            causes = (body.get("details") or {}).get("causes")
            return cls(str(body["message"]), str(body.get("reason") or exc.reason or "Error"),
                       status=exc.status, causes=causes)
        message = f"{what}: {exc.reason}" if what else str(exc.reason or exc)
        return cls(message, str(exc.reason or "Error"), status=exc.status)


async def _guard(call: Awaitable[Envelope]) -> Envelope:
    try:
        return await call
    except TaskflowError as exc:
        return exc.envelope()
    except ApiException as exc:
        return TaskflowError.from_api(exc).envelope()


# -- the Kubernetes side -----------------------------------------------------------------------


def load_kube(
    kubeconfig: str | None = None, context: str | None = None
) -> tuple[k8s.ApiClient, str]:
    """An API client and the default namespace: the kubeconfig file if given (or $KUBECONFIG),
    else in-cluster, else ~/.kube/config; the namespace is the context's (or the pod's)."""
    cfg = k8s.Configuration()
    path = kubeconfig or os.environ.get("KUBECONFIG")
    if not path:
        try:
            k8s_config.load_incluster_config(client_configuration=cfg)
        except k8s_config.ConfigException:
            pass
        else:
            sa = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
            namespace = sa.read_text().strip() if sa.exists() else "default"
            return k8s.ApiClient(cfg), namespace
    k8s_config.load_kube_config(config_file=path, context=context, client_configuration=cfg)
    namespace = "default"
    with contextlib.suppress(Exception):
        contexts, active = k8s_config.list_kube_config_contexts(config_file=path)
        chosen = next((c for c in contexts if c["name"] == context), active) if context else active
        namespace = (chosen.get("context") or {}).get("namespace") or "default"
    return k8s.ApiClient(cfg), namespace


class _Kube:
    """The few Taskflow API calls the client makes, each on a thread."""

    def __init__(self, api_client: k8s.ApiClient) -> None:
        self.api_client = api_client
        self.custom = k8s.CustomObjectsApi(api_client)

    async def _call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return await asyncio.to_thread(fn, *args, **kwargs)

    async def get(self, namespace: str, name: str) -> dict[str, Any]:
        try:
            body: dict[str, Any] = await self._call(
                self.custom.get_namespaced_custom_object, GROUP, VERSION, namespace, PLURAL, name
            )
        except ApiException as exc:
            if exc.status == 404:
                raise TaskflowError(f"taskflow {namespace}/{name} not found", "NotFound") from exc
            raise TaskflowError.from_api(exc) from exc
        return body

    async def create(self, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = await self._call(
            self.custom.create_namespaced_custom_object, GROUP, VERSION, namespace, PLURAL, body
        )
        return result

    async def patch(self, namespace: str, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        try:
            result: dict[str, Any] = await self._call(
                self.custom.patch_namespaced_custom_object, GROUP, VERSION, namespace, PLURAL,
                name, patch, _content_type="application/merge-patch+json",
            )
        except ApiException as exc:
            if exc.status == 404:
                raise TaskflowError(f"taskflow {namespace}/{name} not found", "NotFound") from exc
            raise TaskflowError.from_api(exc) from exc
        return result

    async def list(
        self, namespace: str | None, *, label_selector: str | None = None,
        metadata_only: bool = False,
    ) -> list[dict[str, Any]]:
        """Every flow of a namespace (all namespaces when None), page by page."""
        items: list[dict[str, Any]] = []
        token: str | None = None
        extra: dict[str, Any] = {"_headers": {"Accept": _METADATA_ONLY}} if metadata_only else {}
        if label_selector:
            extra["label_selector"] = label_selector
        while True:
            if token:
                extra["_continue"] = token
            if namespace is None:
                page: dict[str, Any] = await self._call(
                    self.custom.list_cluster_custom_object, GROUP, VERSION, PLURAL, limit=500,
                    **extra,
                )
            else:
                page = await self._call(
                    self.custom.list_namespaced_custom_object, GROUP, VERSION, namespace, PLURAL,
                    limit=500, **extra,
                )
            items.extend(page.get("items") or [])
            token = (page.get("metadata") or {}).get("continue")
            if not token:
                return items


# -- linking a child flow to its parent --------------------------------------------------------


@dataclass(frozen=True)
class ParentLink:
    """Where a child flow started by a service hangs in its parent's tree.

    ``apply`` writes exactly what the operator's runner writes for an inline nested flow, so
    the operator links the child to the parent task the same way: the parent-uid label, the
    parent-task/attempt/context/depth annotations and a controller ownerReference.
    """

    uid: str
    name: str
    namespace: str
    stage: str
    task: str
    attempt: int
    context: Mapping[str, Any]
    depth: int

    def apply(self, body: dict[str, Any]) -> dict[str, Any]:
        meta = body.setdefault("metadata", {})
        labels = meta.setdefault("labels", {})
        labels[PARENT_UID] = self.uid
        labels[PARENT_NAME] = self.name[:63].rstrip("-.")
        annotations = meta.setdefault("annotations", {})
        annotations[PARENT_TASK] = f"{self.stage}.{self.task}"
        annotations[PARENT_ATTEMPT] = str(self.attempt)
        annotations[DEPTH] = str(self.depth)
        annotations[PARENT_CONTEXT] = json.dumps(self.context, separators=(",", ":"))
        meta["ownerReferences"] = [{
            "apiVersion": API_VERSION,
            "kind": "Taskflow",
            "name": self.name,
            "uid": self.uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }]
        return body

    def child_name(self, index: int) -> str:
        """A deterministic name per (parent attempt, child index): a redelivered request
        starts the same child again, which the API server refuses as already existing."""
        digest = hashlib.sha256(
            f"{self.uid}/{self.stage}/{self.task}/{self.attempt}/{index}".encode()
        ).hexdigest()[:8]
        stem = re.sub(r"[^a-z0-9-]", "-", f"{self.name}-{self.task}".lower()).strip("-")[:200]
        return f"{stem}-{self.attempt}-{index}-{digest}"


def parse_idempotency_key(key: str) -> tuple[str, str, str, int] | None:
    """``uid/stage/task/attempt`` -> its parts (stage and task names are NATS tokens)."""
    parts = key.split("/")
    # ASCII digits, and few enough for int() and 64 bits ("²".isdigit() is true too).
    if len(parts) != 4 or not (parts[3].isascii() and parts[3].isdigit()) or len(parts[3]) > 18:
        return None
    return parts[0], parts[1], parts[2], int(parts[3])


# -- the details tree --------------------------------------------------------------------------


def _ms_between(start: str | None, end: str | None) -> int | None:
    from taskflow.engine.clock import parse_iso

    if not start:
        return None
    try:
        stop = parse_iso(end) if end else int(time.time() * 1000)
        return max(0, stop - parse_iso(start))
    except ValueError:
        return None


def _parent_of(meta: Mapping[str, Any]) -> dict[str, Any] | None:
    labels = meta.get("labels") or {}
    annotations = meta.get("annotations") or {}
    uid = labels.get(PARENT_UID)
    if not uid:
        return None
    stage, _, task = (annotations.get(PARENT_TASK) or "").partition(".")
    attempt = annotations.get(PARENT_ATTEMPT)
    owner: dict[str, Any] = next(
        (o for o in meta.get("ownerReferences") or [] if o.get("uid") == uid), {})
    return {
        "taskflowId": uid,
        "name": owner.get("name") or labels.get(PARENT_NAME),
        "namespace": meta.get("namespace"),
        "stage": stage or None,
        "task": task or None,
        "attempt": int(attempt) if attempt and attempt.isdigit() else None,
        "depth": int(annotations.get(DEPTH, "1") or 1),
    }


def flow_node(body: Mapping[str, Any], children: Mapping[tuple[str, str], list[Envelope]]
              ) -> dict[str, Any]:
    """One flow of the tree: its status with every stage and task, children under their task."""
    meta = body.get("metadata") or {}
    spec = body.get("spec") or {}
    status = body.get("status") or {}
    phase = status.get("phase") or "PENDING"
    spec_tasks = {
        (s.get("name"), t.get("name")): t
        for s in spec.get("stages") or [] for t in s.get("tasks") or []
    }
    stage_states = {s.get("name"): s for s in status.get("stages") or []}
    stages = []
    for stage_spec in spec.get("stages") or []:
        stage = stage_states.get(stage_spec.get("name")) or {}
        task_states = {t.get("name"): t for t in stage.get("tasks") or []}
        tasks = []
        for task_spec in stage_spec.get("tasks") or []:
            state = task_states.get(task_spec.get("name")) or {}
            key = (stage_spec.get("name"), task_spec.get("name"))
            source = spec_tasks.get(key) or {}
            tasks.append({
                "id": state.get("id"),
                "name": task_spec.get("name"),
                "type": source.get("type", "ACTION"),
                "taskDetails": source.get("taskDetails"),
                "params": source.get("params"),
                "options": source.get("options"),
                "status": state.get("status", "WAITING"),
                "attempt": state.get("attempt", 0),
                "response": state.get("response"),
                "responseRef": state.get("responseRef"),
                "error": state.get("error"),
                "startTime": state.get("startTime"),
                "endTime": state.get("endTime"),
                "durationMs": _ms_between(state.get("startTime"), state.get("endTime")),
                "waitingReason": state.get("waitingReason"),
                "attempts": state.get("attempts", []),
                "nestedTaskflows": state.get("nestedTaskflows", []),
                "nestedActiveRunningTaskFlowIds": state.get("nestedActiveRunningTaskFlowIds", []),
                "children": children.get(key, []),
            })
        stages.append({
            "id": stage.get("id"),
            "name": stage_spec.get("name"),
            "status": stage.get("status", "WAITING"),
            "startTime": stage.get("startTime"),
            "endTime": stage.get("endTime"),
            "durationMs": _ms_between(stage.get("startTime"), stage.get("endTime")),
            "tasks": tasks,
        })
    return {
        "taskflowId": meta.get("uid"),
        "name": meta.get("name"),
        "namespace": meta.get("namespace"),
        "status": phase,
        "phase": phase,
        "currentStage": status.get("currentStage"),
        "progress": status.get("progress"),
        "eventSubscription": status.get("eventSubscription"),
        "createdAt": status.get("createdAt"),
        "creationTimestamp": meta.get("creationTimestamp"),
        "startTime": status.get("startTime"),
        "completionTime": status.get("completionTime"),
        "durationMs": _ms_between(status.get("startTime"), status.get("completionTime")),
        "cancel": bool(spec.get("cancel")),
        "cancelledAt": status.get("cancelledAt"),
        "retry": status.get("retry"),
        "conditions": status.get("conditions", []),
        "options": spec.get("options"),
        "context": spec.get("context"),
        "parent": _parent_of(meta),
        "stages": stages,
    }


# -- the client --------------------------------------------------------------------------------


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
        self._kube: _Kube | None = None
        self._where: dict[str, tuple[str, str]] = {}  # uid -> (namespace, name)
        self._lock = asyncio.Lock()

    # -- connections -------------------------------------------------------------------------

    @property
    def kube(self) -> _Kube:
        if self._kube is None:
            if self._api_client is None:
                self._api_client, default = load_kube(self._kubeconfig, self._context)
                self._namespace = self._namespace or default
            self._kube = _Kube(self._api_client)
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
                    self.nats_url, name="taskflow-client", connect_timeout=5,
                    max_reconnect_attempts=2, reconnect_time_wait=0.5, error_cb=on_error,
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
            where = (", ".join(self.search_namespaces) if self.search_namespaces
                     else "any namespace")
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
                items = await self.kube.list(scope, metadata_only=True)
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
                metadata = {k: v for k, v in manifest_meta.items()
                            if k in ("name", "generateName", "labels", "annotations")}
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
                metadata[kind] = {k: v for k, v in metadata[kind].items()
                                  if not str(k).startswith(OWN_METADATA)}
        body: dict[str, Any] = {
            "apiVersion": API_VERSION, "kind": "Taskflow", "metadata": metadata, "spec": spec,
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
        meta = existing["metadata"]
        same = ((meta.get("labels") or {}).get(PARENT_UID) == parent.uid
                and (meta.get("annotations") or {}).get(PARENT_ATTEMPT) == str(parent.attempt))
        if not same:
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
                "a task", "BadRequest",
            )
        uid = str(flow["id"])
        info = flow.get("taskInfo") or {}
        parts = parse_idempotency_key(idempotency_key) if idempotency_key else None
        if parts is not None and parts[0] == uid:
            stage, task, attempt = parts[1], parts[2], parts[3]
        else:
            stage, task, attempt = "", str(info.get("name") or ""), int(info.get("attempt") or 0)
        body = await self.fetch(uid)
        meta = body["metadata"]
        if not stage:
            stage_id = flow.get("stageId")
            stage = next((s.get("name", "") for s in (body.get("status") or {}).get("stages", [])
                          if s.get("id") == stage_id), "")
        if not stage or not task:
            raise TaskflowError("the execution context names no stage or task", "BadRequest")
        depth = int((meta.get("annotations") or {}).get(DEPTH, "0") or 0) + 1
        return ParentLink(uid=uid, name=meta["name"], namespace=meta["namespace"], stage=stage,
                          task=task, attempt=attempt, context=dict(context), depth=depth)

    # -- details -----------------------------------------------------------------------------

    async def get_details(self, taskflow_id: str, *, fetch_responses: bool = True) -> Envelope:
        """The whole tree: every stage and task (status, attempt, attempts, response, error)
        and, under each task, the nested flows it started, recursively."""
        return await _guard(self._details(taskflow_id, fetch_responses))

    async def _details(self, taskflow_id: str, fetch_responses: bool) -> Envelope:
        root = await self.fetch(taskflow_id)
        indexes: dict[str, dict[str, list[dict[str, Any]]]] = {}

        async def children_by_parent(namespace: str) -> dict[str, list[dict[str, Any]]]:
            if namespace not in indexes:
                items = await self.kube.list(namespace, label_selector=PARENT_UID)
                index: dict[str, list[dict[str, Any]]] = {}
                for item in items:
                    parent = (item["metadata"].get("labels") or {}).get(PARENT_UID, "")
                    index.setdefault(parent, []).append(item)
                indexes[namespace] = index
            return indexes[namespace]

        async def build(body: dict[str, Any], seen: set[str], depth: int) -> dict[str, Any]:
            meta = body["metadata"]
            uid = meta.get("uid", "")
            seen = seen | {uid}
            kids = list((await children_by_parent(meta["namespace"])).get(uid, []))
            known = {f"{k['metadata']['namespace']}/{k['metadata']['name']}" for k in kids}
            owner: dict[str, tuple[str, str]] = {}
            for stage in (body.get("status") or {}).get("stages") or []:
                for task in stage.get("tasks") or []:
                    for ref in task.get("nestedTaskflows") or []:
                        owner[ref] = (stage.get("name"), task.get("name"))
                        if ref not in known and "/" in ref and depth < 64:
                            ns, _, nm = ref.partition("/")
                            with contextlib.suppress(TaskflowError):
                                if self.allowed(ns):
                                    kids.append(await self.kube.get(ns, nm))
                                    known.add(ref)
            kids.sort(key=lambda k: str(k["metadata"].get("creationTimestamp") or ""))
            grouped: dict[tuple[str, str], list[dict[str, Any]]] = {}
            for kid in kids:
                kmeta = kid["metadata"]
                if kmeta.get("uid") in seen:
                    continue  # never loop, whatever the labels say
                ref = f"{kmeta['namespace']}/{kmeta['name']}"
                stage_name, _, task_name = (
                    (kmeta.get("annotations") or {}).get(PARENT_TASK) or ""
                ).partition(".")
                key = (stage_name, task_name) if task_name else owner.get(ref, ("", ""))
                node = await build(kid, seen, depth + 1)
                node["parentAttempt"] = (node.get("parent") or {}).get("attempt")
                grouped.setdefault(key, []).append(node)
            node = flow_node(body, grouped)
            orphans = [c for k, v in grouped.items()
                       if not any((s["name"], t["name"]) == k for s in node["stages"]
                                  for t in s["tasks"]) for c in v]
            if orphans:
                node["children"] = orphans
            return node

        tree = await build(root, set(), 0)
        if fetch_responses:
            await self._fill_responses(tree)
        return ok(tree)

    async def _fill_responses(self, node: dict[str, Any]) -> None:
        """Large responses live in the NATS object store; fetch them when NATS is reachable."""
        refs = [t for s in node["stages"] for t in s["tasks"]
                if t.get("responseRef") and t.get("response") is None]
        if refs:
            try:
                nc = await self.nats()
                js = nc.jetstream()
                for task in refs:
                    bucket, _, key = str(task["responseRef"]).removeprefix(
                        "nats-object://").partition("/")
                    store = await js.object_store(bucket)
                    result = await store.get(key)
                    task["response"] = json.loads(result.data or b"null")
            except Exception:
                pass  # the reference stays; the caller can fetch it later
        for stage in node["stages"]:
            for task in stage["tasks"]:
                for child in task["children"]:
                    await self._fill_responses(child)

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
                "AlreadyFinished", taskflowId=meta["uid"],
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
                    "observedGeneration") == fresh["metadata"].get("generation"):
                cond: dict[str, Any] = next(
                    (c for c in st.get("conditions") or [] if c.get("type") == "Cancelled"), {})
                if cond.get("status") == "False":
                    raise TaskflowError(cond.get("message") or "cancel refused",
                                        cond.get("reason") or "Refused", taskflowId=meta["uid"])
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
        selection = retry_selection(body, stages, tasks)
        rid = retry_id or f"r-{uuid.uuid4().hex[:12]}"
        if not _RETRY_ID_RE.match(rid) or len(rid) > 63:
            raise TaskflowError(f"retry id {rid!r} is not a valid name", "BadRequest")
        request: dict[str, Any] = {
            "id": rid,
            # A merge patch keeps what it does not mention: say "no stages" explicitly.
            "stages": selection,
            "failedOnly": bool(failed_only),
        }
        await self.kube.patch(meta["namespace"], meta["name"],
                              {"spec": {"cancel": False, "retry": request}})
        data: dict[str, Any] = {"taskflowId": meta["uid"], "retryId": rid}
        if not wait:
            return ok({**data, "acknowledged": False})
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            fresh = await self.kube.get(meta["namespace"], meta["name"])
            ack = (fresh.get("status") or {}).get("retry") or {}
            if ack.get("id") == rid:
                if not ack.get("accepted"):
                    raise TaskflowError(ack.get("message") or "retry refused", "RetryRefused",
                                        retryId=rid, taskflowId=meta["uid"])
                return ok({**data, "acknowledged": True, "accepted": True,
                           "message": ack.get("message", "")})
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
                self.subjects.events(uid), ordered_consumer=True,
                deliver_policy=DeliverPolicy.ALL if replay else DeliverPolicy.NEW,
            )
        except Exception as exc:
            raise TaskflowError(
                f"cannot subscribe to {self.subjects.events(uid)}: {exc} (is the operator "
                "running? it creates the TASKFLOW_EVENTS stream)", "Unavailable",
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


def is_final_event(event: Mapping[str, Any]) -> bool:
    data = event.get("data") or {}
    return event.get("eventType") == "TASKFLOW" and data.get("taskflowStatus") in FINAL_PHASES


def _names(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    return [str(v) for v in value]


def retry_selection(
    body: Mapping[str, Any], stages: Sequence[Any] | None, tasks: Sequence[Any] | None
) -> list[dict[str, Any]] | None:
    """``spec.retry.stages`` from the seed's stagesInfo/tasksInfo; stage and task ids (from
    status) or names both work. None means the whole flow."""
    spec_stages = (body.get("spec") or {}).get("stages") or []
    status_stages = {s.get("name"): s for s in (body.get("status") or {}).get("stages") or []}

    def stage_name(ref: str) -> str:
        for stage in spec_stages:
            if stage.get("name") == ref:
                return str(ref)
        for name, stage in status_stages.items():
            if stage.get("id") == ref:
                return str(name)
        raise TaskflowError(f"unknown stage {ref!r}", "UnknownStage")

    def task_name(stage: str, ref: str) -> str:
        spec_tasks = next(s for s in spec_stages if s.get("name") == stage).get("tasks") or []
        if any(t.get("name") == ref for t in spec_tasks):
            return ref
        for task in (status_stages.get(stage) or {}).get("tasks") or []:
            if task.get("id") == ref:
                return str(task.get("name"))
        raise TaskflowError(f"unknown task {ref!r} in stage {stage!r}", "UnknownTask")

    chosen: dict[str, set[str] | None] = {}

    def add(stage_ref: str, task_refs: list[str] | None) -> None:
        stage = stage_name(stage_ref)
        if not task_refs:
            chosen[stage] = None
        elif stage not in chosen or chosen[stage] is not None:
            current = chosen.setdefault(stage, set())
            assert current is not None
            current.update(task_name(stage, t) for t in task_refs)

    for item in list(stages or []) + list(tasks or []):
        if isinstance(item, str) and "/" in item:
            stage_ref, _, task_ref = item.partition("/")
            add(stage_ref, [task_ref])
        elif isinstance(item, str):
            add(item, None)
        elif isinstance(item, tuple | list) and len(item) == 2:
            add(str(item[0]), _names(item[1]))
        elif isinstance(item, Mapping):
            ref = item.get("stageId") or item.get("stage") or item.get("name")
            if not ref:
                raise TaskflowError(f"a retry entry names no stage: {dict(item)!r}", "BadRequest")
            refs = _names(item.get("taskIds") or item.get("tasks") or item.get("taskId")
                          or item.get("task"))
            add(str(ref), refs or None)
        else:
            raise TaskflowError(f"cannot read a retry entry: {item!r}", "BadRequest")
    if not chosen:
        return None
    order = [s.get("name") for s in spec_stages]
    out: list[dict[str, Any]] = []
    for stage in sorted(chosen, key=order.index):
        names = chosen[stage]
        out.append({"name": stage} if names is None else {"name": stage, "tasks": sorted(names)})
    return out


# -- the synchronous wrapper -------------------------------------------------------------------


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
        self._thread = threading.Thread(target=self._loop.run_forever, name="taskflow-client",
                                        daemon=True)
        self._thread.start()
        self.aio = TaskflowClient(**kwargs)

    def _run(self, coro: Awaitable[T]) -> T:
        async def call() -> T:
            return await coro

        return asyncio.run_coroutine_threadsafe(call(), self._loop).result()

    def produce(self, schema: Mapping[str, Any] | BaseModel, namespace: str | None = None,
                name: str | None = None) -> Envelope:
        return self._run(self.aio.produce(schema, namespace=namespace, name=name))

    def get_details(self, taskflow_id: str) -> Envelope:
        return self._run(self.aio.get_details(taskflow_id))

    def cancel(self, taskflow_id: str, *, wait: float | None = 10.0) -> Envelope:
        return self._run(self.aio.cancel(taskflow_id, wait=wait))

    def retry(self, taskflow_id: str, stages: Sequence[Any] | None = None,
              tasks: Sequence[Any] | None = None, failed_only: bool = False, *,
              wait: float | None = 10.0) -> Envelope:
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


__all__ = [
    "Client",
    "Envelope",
    "ParentLink",
    "TaskflowClient",
    "TaskflowError",
    "fail",
    "flow_node",
    "is_final_event",
    "load_kube",
    "ok",
    "retry_selection",
]
