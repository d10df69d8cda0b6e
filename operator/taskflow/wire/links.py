"""How a child flow is linked to its parent task: the label and annotations the operator writes
on inline children and the SDK/NATS API write on children a service starts. One definition, so
every writer and reader agrees."""

from __future__ import annotations

from typing import Any

from taskflow.api.links import (
    DEPTH,
    PARENT_ATTEMPT,
    PARENT_CONTEXT,
    PARENT_NAME,
    PARENT_TASK,
    PARENT_UID,
)

__all__ = ["DEPTH", "PARENT_ATTEMPT", "PARENT_CONTEXT", "PARENT_NAME", "PARENT_TASK",
           "PARENT_UID", "link_problem"]


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
