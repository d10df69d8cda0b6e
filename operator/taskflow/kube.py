r"""The one way to the Kubernetes API, for the operator and the client alike.

Finding credentials (``load_kube``, ``connection_config``) and the package's calls: read,
create, patch and list flows, write status with optimistic concurrency, post Events, the few
reads of the other resources, and the Leases that active/active replicas hold their buckets by
(``shell/buckets.py``). Every call runs on a thread (a pool sized to the connection
pool when the operator asks for ``workers``), so no event loop ever blocks, and goes through
``_send``: the generated client's credentials and connections without its model layer.

A 409 raises ``Conflict`` and a 404 ``Gone``; both are ``ApiException``\s with the server's
status and body, so a caller may catch either the specific case or any refusal. In the
operator, kopf owns the watch; the client (``taskflow.client``) turns refusals into its error
envelope.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import urllib.parse
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kubernetes import client
from kubernetes import config as _config
from kubernetes.client import rest
from kubernetes.client.exceptions import ApiException

from taskflow.api.names import API_VERSION as API_VERSION
from taskflow.api.names import GROUP, PLURAL, VERSION
from taskflow.api.policy import PLURAL as POLICY_PLURAL

_METADATA_ONLY = "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1"
_MERGE_PATCH = "application/merge-patch+json"
config: Any = _config  # its loaders are untyped
log = logging.getLogger("taskflow.kube")


class Conflict(ApiException):
    """The object changed since we read it (HTTP 409): re-read and decide again."""


class Gone(ApiException):
    """The object no longer exists (HTTP 404)."""


def _refusal(exc: ApiException) -> ApiException:
    kind = {409: Conflict, 404: Gone}.get(exc.status)
    if kind is None:
        return exc
    specific = kind(status=exc.status, reason=exc.reason)
    specific.body, specific.headers = exc.body, exc.headers
    return specific


def connection_config(kubeconfig: str | None) -> client.Configuration:
    """The kubeconfig file if given, else in-cluster, else ~/.kube/config."""
    cfg = client.Configuration()
    if kubeconfig:
        config.load_kube_config(config_file=kubeconfig, client_configuration=cfg)
        return cfg
    try:
        config.load_incluster_config(client_configuration=cfg)
    except config.ConfigException:
        config.load_kube_config(client_configuration=cfg)
    return cfg


def load_api_client(kubeconfig: str | None) -> client.ApiClient:
    return client.ApiClient(connection_config(kubeconfig))


def load_kube(
    kubeconfig: str | None = None, context: str | None = None
) -> tuple[client.ApiClient, str]:
    """An API client and the default namespace: the kubeconfig file if given (or $KUBECONFIG),
    else in-cluster, else ~/.kube/config; the namespace is the context's (or the pod's)."""
    cfg = client.Configuration()
    path = kubeconfig or os.environ.get("KUBECONFIG")
    if not path:
        try:
            config.load_incluster_config(client_configuration=cfg)
        except config.ConfigException:
            pass
        else:
            sa = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
            namespace = sa.read_text().strip() if sa.exists() else "default"
            return client.ApiClient(cfg), namespace
    config.load_kube_config(config_file=path, context=context, client_configuration=cfg)
    namespace = "default"
    with contextlib.suppress(Exception):
        contexts, active = config.list_kube_config_contexts(config_file=path)
        chosen = next((c for c in contexts if c["name"] == context), active) if context else active
        namespace = (chosen.get("context") or {}).get("namespace") or "default"
    return client.ApiClient(cfg), namespace


class Kube:
    """The calls, each on a thread. ``workers``: a pool of that many threads and as many
    pooled connections (the operator's many writers); None: the default thread pool and the
    API client as it was given (a user's client, which this leaves alone)."""

    def __init__(self, api_client: client.ApiClient, *, workers: int | None = 16) -> None:
        self.api_client = api_client
        self.custom = client.CustomObjectsApi(api_client)
        self.core = client.CoreV1Api(api_client)
        self._pool: ThreadPoolExecutor | None = None
        if workers is None:
            return
        api_client.configuration.connection_pool_maxsize = workers
        # The connection pool was sized when the client was made: make it again at this size,
        # or every connection beyond the default (5 per core) is dropped after one request and
        # the next one pays a new TLS handshake.
        old_pool = api_client.rest_client.pool_manager
        api_client.rest_client = rest.RESTClientObject(api_client.configuration)
        old_pool.clear()
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="kube")

    async def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        loop = asyncio.get_running_loop()
        try:  # (None: the loop's default pool)
            return await loop.run_in_executor(self._pool, lambda: fn(*args, **kwargs))
        except ApiException as exc:
            specific = _refusal(exc)
            if specific is exc:
                raise
            raise specific from exc

    def _send(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        *,
        accept: str = "application/json",
        content_type: str = "application/json",
    ) -> Any:
        """One call through the generated client's own pool, credentials and default headers,
        without its model layer: plain-JSON bodies are encoded once and replies decoded once
        (the generated methods walk every node of the body and of the reply in Python, which
        cost more CPU than the HTTP exchange itself). Errors are the same ``ApiException``."""
        api = self.api_client
        _, url, headers, _, _ = api.param_serialize(
            method,
            path,
            header_params={"Accept": accept, "Content-Type": content_type},
            auth_settings=["BearerToken"],
        )
        response = api.call_api(method, url, header_params=headers, body=body)
        response.read()
        if not 200 <= response.status <= 299:
            text = response.data.decode("utf-8", "replace") if response.data else None
            raise ApiException.from_response(http_resp=response, body=text, data=None)
        return json.loads(response.data) if response.data else None

    @staticmethod
    def _path(
        namespace: str, name: str | None = None, sub: str | None = None, plural: str = PLURAL
    ) -> str:
        path = f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{plural}"
        return path + (f"/{name}" if name else "") + (f"/{sub}" if sub else "")

    async def get(self, namespace: str, name: str) -> dict[str, Any]:
        result: dict[str, Any] = await self._call(self._send, "GET", self._path(namespace, name))
        return result

    async def replace_status(self, body: dict[str, Any]) -> dict[str, Any]:
        """PUT /status with the resourceVersion we last saw: optimistic concurrency.

        Only what the status subresource reads is sent: identity, resourceVersion and status
        (the apiserver takes everything else from the stored object, and keeps managedFields
        when they are left out), so the request is about half the size of the object."""
        meta = body["metadata"]
        lean_meta = {
            k: meta[k]
            for k in ("name", "namespace", "uid", "resourceVersion")
            if meta.get(k) is not None
        }
        lean = {
            "apiVersion": body.get("apiVersion", API_VERSION),
            "kind": body.get("kind", "Taskflow"),
            "metadata": lean_meta,
            "status": body.get("status"),
        }
        result: dict[str, Any] = await self._call(
            self._send, "PUT", self._path(meta["namespace"], meta["name"], "status"), lean
        )
        return result

    async def create(self, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = await self._call(self._send, "POST", self._path(namespace), body)
        return result

    async def patch(self, namespace: str, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        """A JSON merge patch of one flow (e.g. ``{"spec": {"cancel": true}}``)."""
        result: dict[str, Any] = await self._call(
            self._send, "PATCH", self._path(namespace, name), patch, content_type=_MERGE_PATCH
        )
        return result

    async def list_flows(
        self,
        namespace: str | None,
        *,
        label_selector: str | None = None,
        metadata_only: bool = False,
    ) -> list[dict[str, Any]]:
        """Every flow of a namespace (all namespaces when None), page by page; with
        ``metadata_only``, only their metadata (a small answer however big the flows)."""
        base = self._path(namespace) if namespace else f"/apis/{GROUP}/{VERSION}/{PLURAL}"
        query: dict[str, str] = {"limit": "500"}
        if label_selector:
            query["labelSelector"] = label_selector
        accept = _METADATA_ONLY if metadata_only else "application/json"
        items: list[dict[str, Any]] = []
        while True:
            path = f"{base}?{urllib.parse.urlencode(query)}"
            page = await self._call(self._send, "GET", path, accept=accept)
            items.extend(page.get("items") or [])
            token = (page.get("metadata") or {}).get("continue")
            if not token:
                return items
            query["continue"] = token

    async def delete(self, namespace: str, name: str, *, uid: str) -> None:
        """Delete a flow, only if it is still the one with ``uid``; its children follow by
        their owner references (background propagation)."""
        body = {
            "kind": "DeleteOptions",
            "apiVersion": "v1",
            "propagationPolicy": "Background",
            "preconditions": {"uid": uid},
        }
        with contextlib.suppress(Gone):
            await self._call(self._send, "DELETE", self._path(namespace, name), body)

    async def list_children(self, namespace: str, parent_uid: str) -> list[dict[str, Any]]:
        return await self.list_flows(
            namespace, label_selector=f"taskflow.dev/parent-uid={parent_uid}"
        )

    async def event(self, flow: dict[str, Any], *, reason: str, message: str, type_: str) -> None:
        """Post a Kubernetes Event on the flow; never let a failure here stop the flow."""
        meta = flow["metadata"]
        now = datetime.now(UTC).isoformat()
        involved = {
            "apiVersion": API_VERSION,
            "kind": "Taskflow",
            "name": meta["name"],
            "namespace": meta["namespace"],
            "uid": meta["uid"],
        }
        if meta.get("resourceVersion"):
            involved["resourceVersion"] = meta["resourceVersion"]
        body = {
            "metadata": {
                "name": f"{meta['name']}.{uuid.uuid4().hex[:12]}",
                "namespace": meta["namespace"],
            },
            "involvedObject": involved,
            "reason": reason,
            "message": message[:1024],
            "type": type_,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
            "source": {"component": "taskflow-operator"},
            "reportingComponent": "taskflow.dev/operator",
            "reportingInstance": "taskflow-operator",
        }
        try:
            await self._call(
                self._send, "POST", f"/api/v1/namespaces/{meta['namespace']}/events", body
            )
        except Exception as exc:  # events are best effort by design
            log.warning(
                "could not post event %s on %s/%s: %s", reason, meta["namespace"], meta["name"], exc
            )

    # -- tenant policies and their credentials ------------------------------------------------

    async def list_policies(self, namespace: str | None = None) -> list[dict[str, Any]]:
        """Every TaskflowPolicy (of one namespace, or of all)."""
        where = f"namespaces/{namespace}/" if namespace else ""
        result = await self._call(
            self._send, "GET", f"/apis/{GROUP}/{VERSION}/{where}{POLICY_PLURAL}"
        )
        items: list[dict[str, Any]] = result.get("items", [])
        return items

    async def get_of(self, plural: str, namespace: str, name: str) -> dict[str, Any]:
        """One object of the package's other resources (templates, schedules, policies)."""
        result: dict[str, Any] = await self._call(
            self._send, "GET", self._path(namespace, name, plural=plural)
        )
        return result

    async def put_status(
        self, plural: str, body: dict[str, Any], status: dict[str, Any]
    ) -> dict[str, Any]:
        """PUT ``status`` of one such object with the resourceVersion ``body`` was read at
        (Conflict: it changed since)."""
        meta = body["metadata"]
        lean = {
            "apiVersion": body.get("apiVersion", API_VERSION),
            "kind": body.get("kind"),
            "metadata": {k: meta[k] for k in ("name", "namespace", "resourceVersion")},
            "status": status,
        }
        path = self._path(meta["namespace"], meta["name"], "status", plural=plural)
        result: dict[str, Any] = await self._call(self._send, "PUT", path, lean)
        return result

    async def patch_cluster_status(
        self, plural: str, name: str, status: dict[str, Any]
    ) -> dict[str, Any]:
        """A merge patch of the status of one cluster-scoped object (a report the operator
        keeps current: no resourceVersion, the last write wins)."""
        path = f"/apis/{GROUP}/{VERSION}/{plural}/{name}/status"
        result: dict[str, Any] = await self._call(
            self._send, "PATCH", path, {"status": status}, content_type=_MERGE_PATCH
        )
        return result

    async def list_runs(self, namespace: str, cron: str) -> list[dict[str, Any]]:
        """The Taskflows a CronTaskflow started."""
        from taskflow.api.schedules import CRON_LABEL

        return await self.list_flows(namespace, label_selector=f"{CRON_LABEL}={cron}")

    async def get_secret(self, namespace: str, name: str) -> dict[str, Any]:
        result: dict[str, Any] = await self._call(
            self._send, "GET", f"/api/v1/namespaces/{namespace}/secrets/{name}"
        )
        return result

    # -- coordination.k8s.io Leases (active/active replicas: shell/buckets.py) ------------

    @staticmethod
    def _lease_path(namespace: str, name: str | None = None) -> str:
        path = f"/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases"
        return path + (f"/{name}" if name else "")

    async def list_leases(self, namespace: str) -> list[dict[str, Any]]:
        """Every Lease of a namespace (one page: the operator's namespace holds a few)."""
        result = await self._call(self._send, "GET", self._lease_path(namespace))
        items: list[dict[str, Any]] = result.get("items") or []
        return items

    async def create_lease(self, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        """Create a Lease (Conflict: someone made it first)."""
        result: dict[str, Any] = await self._call(
            self._send, "POST", self._lease_path(namespace), body
        )
        return result

    async def replace_lease(self, body: dict[str, Any]) -> dict[str, Any]:
        """PUT a Lease with the resourceVersion it was read at (Conflict: it changed since)."""
        meta = body["metadata"]
        result: dict[str, Any] = await self._call(
            self._send, "PUT", self._lease_path(meta["namespace"], meta["name"]), body
        )
        return result

    async def delete_lease(self, namespace: str, name: str, *, resource_version: str) -> None:
        """Delete a Lease, only if it is still at ``resource_version``."""
        body = {
            "kind": "DeleteOptions",
            "apiVersion": "v1",
            "preconditions": {"resourceVersion": resource_version},
        }
        with contextlib.suppress(Gone):
            await self._call(self._send, "DELETE", self._lease_path(namespace, name), body)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        with contextlib.suppress(Exception):
            self.api_client.close()
