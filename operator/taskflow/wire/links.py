"""How a child flow is linked to its parent task: the label and annotations the operator writes
on inline children and the SDK/NATS API write on children a service starts. One definition, so
every writer and reader agrees."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from typing import Any

from taskflow.api.links import (
    DEPTH,
    PARENT_ATTEMPT,
    PARENT_CONTEXT,
    PARENT_NAME,
    PARENT_TASK,
    PARENT_UID,
)
from taskflow.api.status import Status
from taskflow.engine.inputs import ChildFinished

__all__ = [
    "DEPTH",
    "PARENT_ATTEMPT",
    "PARENT_CONTEXT",
    "PARENT_NAME",
    "PARENT_TASK",
    "PARENT_UID",
    "child_input",
    "child_name",
    "link_problem",
    "parent_context",
]


def link_problem(
    child: dict[str, Any], *, uid: str, namespace: str, attempt: int | None = None
) -> str | None:
    """Why ``child`` (a Taskflow object) is not a child of the flow ``uid`` in ``namespace``
    (for ``attempt``, when given), or None when it is. Labels and annotations can be written
    by whoever creates a flow: only the namespace and an owner reference to the parent's uid
    (which Kubernetes resolves within the namespace only) make the link."""
    meta = child.get("metadata") or {}
    ref = f"{meta.get('namespace')}/{meta.get('name')}"
    if meta.get("namespace") != namespace:
        return f"child flow {ref} is not in this flow's namespace {namespace}"
    owners = meta.get("ownerReferences") or []
    if not any(isinstance(o, dict) and o.get("uid") == uid for o in owners):
        return f"child flow {ref} is not owned by this flow"
    if attempt is not None:
        linked = (meta.get("annotations") or {}).get(PARENT_ATTEMPT)
        if linked is not None and linked != str(attempt):
            return f"child flow {ref} was started for attempt {linked}, not {attempt}"
    return None


def parent_context(meta: Mapping[str, Any]) -> dict[str, Any] | None:
    """The parent task's execution context a child flow's annotation holds (None: not a
    child, or an annotation that is not a JSON object)."""
    raw = (meta.get("annotations") or {}).get(PARENT_CONTEXT)
    if not raw or not isinstance(raw, str):
        return None
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def child_name(parent: str, stage: str, task: str, attempt: int) -> str:
    """A deterministic, DNS-safe name, so that a restart never creates a second child."""
    digest = hashlib.sha256(f"{parent}/{stage}/{task}/{attempt}".encode()).hexdigest()[:8]
    stem = re.sub(r"[^a-z0-9-]", "-", f"{parent}-{task}".lower()).strip("-")[:200]
    return f"{stem}-{attempt}-{digest}"


def child_input(body: dict[str, Any]) -> ChildFinished | None:
    """What a child flow's object tells its parent task (None: not a child, or no outcome)."""
    meta = body.get("metadata", {})
    annotations = meta.get("annotations") or {}
    ref = annotations.get(PARENT_TASK, "")
    stage, _, task = ref.partition(".")
    status = body.get("status") or {}
    phase = status.get("phase")
    if not stage or not task or not phase:
        return None
    outcome = {
        "SUCCEEDED": Status.SUCCEEDED,
        "COMPLETED_WITH_FAILURES": Status.FAILED,
        "FAILED": Status.FAILED,
        "CANCELLED": Status.CANCELLED,
    }.get(phase, Status.RUNNING)
    summary = {
        "taskflowId": meta.get("uid"),
        "name": meta.get("name"),
        "phase": phase,
        "progress": status.get("progress"),
    }
    attempt = annotations.get(PARENT_ATTEMPT)
    return ChildFinished(
        stage=stage,
        task=task,
        child=f"{meta.get('namespace')}/{meta.get('name')}",
        status=outcome,
        summary=summary,
        # (ASCII digits, few: an annotation is anyone's to write, and int("²") raises)
        attempt=int(attempt)
        if attempt and attempt.isascii() and attempt.isdigit() and len(attempt) <= 18
        else None,
    )
