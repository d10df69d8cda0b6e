"""Kubernetes API calls the operator makes, run on a thread pool so the event loop never blocks.

kopf owns the watch; this module only reads, writes status, creates child flows and posts
Events. Every call names the flow it is for, so errors are attributable.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from taskflow.api.crd import GROUP, VERSION

PLURAL = "taskflows"
log = logging.getLogger("taskflow.kube")


class Conflict(Exception):
    """The object changed since we read it (HTTP 409): re-read and decide again."""


class Gone(Exception):
    """The object no longer exists (HTTP 404)."""


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


class Kube:
    def __init__(self, api_client: client.ApiClient, *, workers: int = 16) -> None:
        api_client.configuration.connection_pool_maxsize = workers
        self.api_client = api_client
        self.custom = client.CustomObjectsApi(api_client)
        self.core = client.CoreV1Api(api_client)
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="kube")

    async def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._pool, lambda: fn(*args, **kwargs))
        except ApiException as exc:
            if exc.status == 409:
                raise Conflict(str(exc.reason)) from exc
            if exc.status == 404:
                raise Gone(str(exc.reason)) from exc
            raise

    async def get(self, namespace: str, name: str) -> dict[str, Any]:
        result: dict[str, Any] = await self._call(
            self.custom.get_namespaced_custom_object, GROUP, VERSION, namespace, PLURAL, name
        )
        return result

    async def replace_status(self, body: dict[str, Any]) -> dict[str, Any]:
        """PUT /status with the resourceVersion we last saw: optimistic concurrency."""
        meta = body["metadata"]
        result: dict[str, Any] = await self._call(
            self.custom.replace_namespaced_custom_object_status,
            GROUP, VERSION, meta["namespace"], PLURAL, meta["name"], body,
        )
        return result

    async def create(self, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = await self._call(
            self.custom.create_namespaced_custom_object, GROUP, VERSION, namespace, PLURAL, body
        )
        return result

    async def patch_spec(self, namespace: str, name: str, patch: dict[str, Any]) -> None:
        await self._call(
            self.custom.patch_namespaced_custom_object,
            GROUP, VERSION, namespace, PLURAL, name, patch,
        )

    async def list_children(self, namespace: str, parent_uid: str) -> list[dict[str, Any]]:
        result = await self._call(
            self.custom.list_namespaced_custom_object, GROUP, VERSION, namespace, PLURAL,
            label_selector=f"taskflow.dev/parent-uid={parent_uid}",
        )
        items: list[dict[str, Any]] = result.get("items", [])
        return items

    async def event(
        self, flow: dict[str, Any], *, reason: str, message: str, type_: str
    ) -> None:
        """Post a Kubernetes Event on the flow; never let a failure here stop the flow."""
        meta = flow["metadata"]
        now = datetime.now(UTC)
        body = client.CoreV1Event(
            metadata=client.V1ObjectMeta(
                name=f"{meta['name']}.{uuid.uuid4().hex[:12]}", namespace=meta["namespace"]
            ),
            involved_object=client.V1ObjectReference(
                api_version=f"{GROUP}/{VERSION}", kind="Taskflow", name=meta["name"],
                namespace=meta["namespace"], uid=meta["uid"],
                resource_version=meta.get("resourceVersion"),
            ),
            reason=reason,
            message=message[:1024],
            type=type_,
            first_timestamp=now,
            last_timestamp=now,
            count=1,
            source=client.V1EventSource(component="taskflow-operator"),
            reporting_component="taskflow.dev/operator",
            reporting_instance="taskflow-operator",
        )
        try:
            await self._call(self.core.create_namespaced_event, meta["namespace"], body)
        except Exception as exc:  # events are best effort by design
            log.warning("could not post event %s on %s/%s: %s", reason, meta["namespace"],
                        meta["name"], exc)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        with contextlib.suppress(Exception):
            self.api_client.close()
