"""A small, efficient async client for the kube-apiserver (aiohttp, keep-alive, client cert).

The driver creates flows with it, the ceiling run writes status with it, and it reads the
apiserver's own ``/metrics`` (``apiserver_request_total``) to count status writes.
"""

from __future__ import annotations

import json
import re
import ssl
from collections import defaultdict
from pathlib import Path
from typing import Any

import aiohttp

GROUP, VERSION, PLURAL = "taskflow.dev", "v1alpha1", "taskflows"
_LABELS = re.compile(r'(\w+)="([^"]*)"')


class ApiError(Exception):
    def __init__(self, status: int, text: str) -> None:
        super().__init__(f"HTTP {status}: {text[:300]}")
        self.status = status


class Api:
    def __init__(self, url: str, pki: Path, *, connections: int = 128) -> None:
        self.url = url
        context = ssl.create_default_context(cafile=str(pki / "ca.crt"))
        context.load_cert_chain(str(pki / "admin.crt"), str(pki / "admin.key"))
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=context, limit=connections),
            timeout=aiohttp.ClientTimeout(total=120),
        )

    def flows(self, namespace: str) -> str:
        return f"{self.url}/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}"

    async def request(
        self,
        method: str,
        url: str,
        body: bytes | None = None,
        content_type: str = "application/json",
    ) -> Any:
        headers = {"Content-Type": content_type, "Accept": "application/json"}
        async with self.session.request(method, url, data=body, headers=headers) as resp:
            data = await resp.read()
            if resp.status >= 300:
                raise ApiError(resp.status, data.decode(errors="replace"))
            return json.loads(data) if data else None

    async def create_namespace(self, name: str) -> None:
        body = json.dumps(
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}
        ).encode()
        try:
            await self.request("POST", f"{self.url}/api/v1/namespaces", body)
        except ApiError as exc:
            if exc.status != 409:
                raise

    async def create_flow(self, namespace: str, body: bytes) -> dict[str, Any]:
        result: dict[str, Any] = await self.request("POST", self.flows(namespace), body)
        return result

    async def get_flow(self, namespace: str, name: str) -> dict[str, Any]:
        result: dict[str, Any] = await self.request("GET", f"{self.flows(namespace)}/{name}")
        return result

    async def put_status(self, namespace: str, name: str, body: bytes) -> bytes:
        """PUT /status; returns the raw response (the caller picks the resourceVersion)."""
        url = f"{self.flows(namespace)}/{name}/status"
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        async with self.session.put(url, data=body, headers=headers) as resp:
            data = await resp.read()
            if resp.status >= 300:
                raise ApiError(resp.status, data.decode(errors="replace"))
            return data

    async def create_service_limit(self, name: str, spec: dict[str, Any]) -> None:
        """A ServiceLimit (cluster-scoped): the flow-control phase's."""
        body = json.dumps(
            {
                "apiVersion": f"{GROUP}/{VERSION}",
                "kind": "ServiceLimit",
                "metadata": {"name": name},
                "spec": spec,
            }
        ).encode()
        await self.request("POST", f"{self.url}/apis/{GROUP}/{VERSION}/servicelimits", body)

    async def delete_service_limit(self, name: str) -> None:
        await self.request("DELETE", f"{self.url}/apis/{GROUP}/{VERSION}/servicelimits/{name}")

    async def delete_flows(self, namespace: str) -> None:
        await self.request("DELETE", self.flows(namespace))

    async def metrics(self) -> dict[str, dict[str, float]]:
        """apiserver_request_total for taskflows: {"status": {verb: n, "409": n}, "main": ...}."""
        async with self.session.get(f"{self.url}/metrics") as resp:
            text = await resp.text()
        out: dict[str, dict[str, float]] = {
            "status": defaultdict(float),
            "main": defaultdict(float),
        }
        for line in text.splitlines():
            if not line.startswith("apiserver_request_total{"):
                continue
            if 'resource="taskflows"' not in line:
                continue
            head, _, value = line.rpartition(" ")
            labels = dict(_LABELS.findall(head))
            kind = (
                "status"
                if labels.get("subresource") == "status"
                else ("main" if not labels.get("subresource") else None)
            )
            if kind is None:
                continue
            out[kind][labels.get("verb", "?")] += float(value)
            out[kind]["code_" + labels.get("code", "?")] += float(value)
        return {k: dict(v) for k, v in out.items()}

    async def pprof(self, path: Path, seconds: int) -> None:
        """The apiserver's own CPU profile (Go pprof, served at /debug/pprof with --profiling)."""
        url = f"{self.url}/debug/pprof/profile?seconds={seconds}"
        async with self.session.get(url, timeout=aiohttp.ClientTimeout(total=seconds + 60)) as resp:
            path.write_bytes(await resp.read())

    async def close(self) -> None:
        await self.session.close()


def status_writes(metrics: dict[str, dict[str, float]]) -> float:
    """Every status write the apiserver served (PUT and PATCH, any outcome)."""
    status = metrics.get("status", {})
    return status.get("PUT", 0.0) + status.get("PATCH", 0.0) + status.get("APPLY", 0.0)


def delta(
    after: dict[str, dict[str, float]], before: dict[str, dict[str, float]]
) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for kind, values in after.items():
        prev = before.get(kind, {})
        out[kind] = {k: v - prev.get(k, 0.0) for k, v in values.items() if v - prev.get(k, 0.0)}
    return out
