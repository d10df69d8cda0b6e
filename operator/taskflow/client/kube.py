"""The client's view of the shared Kubernetes module (``taskflow.kube``): the same calls, with
refusals turned into the client's error envelope.

A 404 becomes a ``NotFound`` ``TaskflowError`` naming the flow; anything else the API server
refuses on a read or a patch keeps the server's own message. A refused create stays an
``ApiException`` (the client looks at a 409 itself: a redelivered child may already exist).
"""

from __future__ import annotations

from typing import Any

from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException

from taskflow import kube
from taskflow.api.names import API_VERSION as API_VERSION
from taskflow.api.names import PLURAL as PLURAL
from taskflow.client.envelope import TaskflowError
from taskflow.kube import load_kube as load_kube


class Kube(kube.Kube):
    """The calls the client makes, on the default thread pool; the API client is the user's
    and is left as it was given."""

    def __init__(self, api_client: k8s.ApiClient) -> None:
        super().__init__(api_client, workers=None)

    async def get(self, namespace: str, name: str) -> dict[str, Any]:
        try:
            return await super().get(namespace, name)
        except kube.Gone as exc:
            raise TaskflowError(f"taskflow {namespace}/{name} not found", "NotFound") from exc
        except ApiException as exc:
            raise TaskflowError.from_api(exc) from exc

    async def patch(self, namespace: str, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        try:
            return await super().patch(namespace, name, patch)
        except kube.Gone as exc:
            raise TaskflowError(f"taskflow {namespace}/{name} not found", "NotFound") from exc
        except ApiException as exc:
            raise TaskflowError.from_api(exc) from exc
