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

This module is the public surface only; the code lives by concern: ``envelope`` (the error
envelope), ``kube`` (the Kubernetes calls), ``links`` (a child flow's link to its parent),
``details`` (the details tree), ``retries`` (``spec.retry`` from the seed's selection),
``flows`` (``TaskflowClient``), ``sync`` (``Client``) and ``services`` (``list_services``: which
services answer on NATS, from the Services API).
"""

from taskflow.client.details import flow_node as flow_node
from taskflow.client.envelope import Envelope, TaskflowError
from taskflow.client.envelope import fail as fail
from taskflow.client.envelope import ok as ok
from taskflow.client.flows import DEFAULT_MAX_DEPTH as DEFAULT_MAX_DEPTH
from taskflow.client.flows import DEFAULT_NATS_URL as DEFAULT_NATS_URL
from taskflow.client.flows import EVENT_STREAM as EVENT_STREAM
from taskflow.client.flows import FINAL_PHASES as FINAL_PHASES
from taskflow.client.flows import UID_RE as UID_RE
from taskflow.client.flows import TaskflowClient, is_final_event
from taskflow.client.kube import API_VERSION as API_VERSION
from taskflow.client.kube import PLURAL as PLURAL
from taskflow.client.kube import load_kube as load_kube
from taskflow.client.links import ParentLink
from taskflow.client.retries import retry_stages as retry_stages
from taskflow.client.services import LiveService, list_services
from taskflow.client.sync import Client

# The keys a child flow's link is written with: the operator's own (tests check they agree).
from taskflow.wire.links import DEPTH as DEPTH
from taskflow.wire.links import PARENT_ATTEMPT as PARENT_ATTEMPT
from taskflow.wire.links import PARENT_CONTEXT as PARENT_CONTEXT
from taskflow.wire.links import PARENT_NAME as PARENT_NAME
from taskflow.wire.links import PARENT_TASK as PARENT_TASK
from taskflow.wire.links import PARENT_UID as PARENT_UID

__all__ = [
    "Client",
    "Envelope",
    "LiveService",
    "ParentLink",
    "TaskflowClient",
    "TaskflowError",
    "is_final_event",
    "list_services",
]
