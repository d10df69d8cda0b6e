"""The client's way to the Kubernetes API: finding the credentials and the few Taskflow calls.

The ``kubernetes`` package is synchronous; every call runs on a thread so the client's event
loop never blocks. A 404 becomes a ``NotFound`` ``TaskflowError`` naming the flow; anything else
the API server refuses keeps the server's own message.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kubernetes import client as k8s
from kubernetes import config as _k8s_config
from kubernetes.client.exceptions import ApiException

from taskflow.api.crd import GROUP, VERSION
from taskflow.client.envelope import TaskflowError

PLURAL = "taskflows"
API_VERSION = f"{GROUP}/{VERSION}"
_METADATA_ONLY = "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1"
k8s_config: Any = _k8s_config  # its loaders are untyped


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


class Kube:
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
                self.custom.patch_namespaced_custom_object,
                GROUP,
                VERSION,
                namespace,
                PLURAL,
                name,
                patch,
                _content_type="application/merge-patch+json",
            )
        except ApiException as exc:
            if exc.status == 404:
                raise TaskflowError(f"taskflow {namespace}/{name} not found", "NotFound") from exc
            raise TaskflowError.from_api(exc) from exc
        return result

    async def list(
        self,
        namespace: str | None,
        *,
        label_selector: str | None = None,
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
                    self.custom.list_cluster_custom_object,
                    GROUP,
                    VERSION,
                    PLURAL,
                    limit=500,
                    **extra,
                )
            else:
                page = await self._call(
                    self.custom.list_namespaced_custom_object,
                    GROUP,
                    VERSION,
                    namespace,
                    PLURAL,
                    limit=500,
                    **extra,
                )
            items.extend(page.get("items") or [])
            token = (page.get("metadata") or {}).get("continue")
            if not token:
                return items
