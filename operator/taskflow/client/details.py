"""The details tree: one flow and, under each of its tasks, the flows it started, recursively.

``get_details`` answers with it (and ``kubectl taskflow`` draws it). ``flow_node`` is the pure
part, a flow's spec and status merged into the seed's shape; ``details_tree`` walks the
children (by the parent-uid label, and by the ``nestedTaskflows`` a task names in other
namespaces); ``fill_responses`` fetches the large responses kept in the NATS object store.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from taskflow.api.spec import base_name
from taskflow.client.envelope import Envelope, TaskflowError
from taskflow.client.kube import Kube
from taskflow.client.links import parent_of
from taskflow.engine.clock import parse_iso
from taskflow.wire.links import PARENT_TASK, PARENT_UID

_MAX_REF_DEPTH = 64  # how deep nestedTaskflows references outside the label index are followed


def _ms_between(start: str | None, end: str | None) -> int | None:
    if not start:
        return None
    try:
        stop = parse_iso(end) if end else int(time.time() * 1000)
        return max(0, stop - parse_iso(start))
    except ValueError:
        return None


def flow_node(
    body: Mapping[str, Any], children: Mapping[tuple[str, str], list[Envelope]]
) -> dict[str, Any]:
    """One flow of the tree: its status with every stage and task, children under their task."""
    meta = body.get("metadata") or {}
    spec = body.get("spec") or {}
    status = body.get("status") or {}
    phase = status.get("phase") or "PENDING"
    spec_tasks = {
        (s.get("name"), t.get("name")): t
        for s in spec.get("stages") or []
        for t in s.get("tasks") or []
    }
    stage_states = {s.get("name"): s for s in status.get("stages") or []}
    stages = []
    for stage_spec in spec.get("stages") or []:
        stage = stage_states.get(stage_spec.get("name")) or {}
        states = stage.get("tasks") or []
        tasks = []
        for task_spec, state in (
            (t, s)
            for t in stage_spec.get("tasks") or []
            # a fan-out task is its entries ("add[0]", ...): one node each
            for s in [s for s in states if base_name(str(s.get("name"))) == t.get("name")] or [{}]
        ):
            name = state.get("name") or task_spec.get("name")
            key = (stage_spec.get("name"), name)
            source = spec_tasks.get((stage_spec.get("name"), task_spec.get("name"))) or {}
            tasks.append(
                {
                    "id": state.get("id"),
                    "name": name,
                    "type": source.get("type", "ACTION"),
                    "taskDetails": source.get("taskDetails"),
                    # as sent, when expressions resolved them; else the spec's
                    "params": state.get("params", source.get("params")),
                    "item": state.get("item"),
                    "skipReason": state.get("skipReason"),
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
                    "nestedActiveRunningTaskFlowIds": state.get(
                        "nestedActiveRunningTaskFlowIds", []
                    ),
                    "children": children.get(key, []),
                }
            )
        stages.append(
            {
                "id": stage.get("id"),
                "name": stage_spec.get("name"),
                "status": stage.get("status", "WAITING"),
                "startTime": stage.get("startTime"),
                "endTime": stage.get("endTime"),
                "durationMs": _ms_between(stage.get("startTime"), stage.get("endTime")),
                "tasks": tasks,
            }
        )
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
        "parent": parent_of(meta),
        "stages": stages,
    }


async def details_tree(
    root: dict[str, Any], *, kube: Kube, allowed: Callable[[str], bool]
) -> dict[str, Any]:
    """``flow_node`` of ``root`` with its children's nodes under their tasks, recursively.

    Children are found by the parent-uid label (one listing per namespace) and by the
    ``nestedTaskflows`` references of the tasks (in namespaces ``allowed`` lets the client
    read); a child that names no task of its parent is kept in the node's ``children``.
    """
    indexes: dict[str, dict[str, list[dict[str, Any]]]] = {}

    async def children_by_parent(namespace: str) -> dict[str, list[dict[str, Any]]]:
        if namespace not in indexes:
            items = await kube.list_flows(namespace, label_selector=PARENT_UID)
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
                    if ref not in known and "/" in ref and depth < _MAX_REF_DEPTH:
                        ns, _, nm = ref.partition("/")
                        with contextlib.suppress(TaskflowError):
                            if allowed(ns):
                                kids.append(await kube.get(ns, nm))
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
        orphans = [
            c
            for k, v in grouped.items()
            if not any((s["name"], t["name"]) == k for s in node["stages"] for t in s["tasks"])
            for c in v
        ]
        if orphans:
            node["children"] = orphans
        return node

    return await build(root, set(), 0)


async def fill_responses(node: dict[str, Any], *, nats: Callable[[], Awaitable[Any]]) -> None:
    """Large responses live in the NATS object store; fetch them when NATS is reachable
    (``nats`` connects on first use). A response that cannot be fetched keeps its reference,
    for the caller to fetch later."""
    refs = [
        t
        for s in node["stages"]
        for t in s["tasks"]
        if t.get("responseRef") and t.get("response") is None
    ]
    if refs:
        try:
            nc = await nats()
            js = nc.jetstream()
            for task in refs:
                bucket, _, key = (
                    str(task["responseRef"]).removeprefix("nats-object://").partition("/")
                )
                store = await js.object_store(bucket)
                result = await store.get(key)
                task["response"] = json.loads(result.data or b"null")
        except Exception:
            pass  # the reference stays; the caller can fetch it later
    for stage in node["stages"]:
        for task in stage["tasks"]:
            for child in task["children"]:
                await fill_responses(child, nats=nats)
