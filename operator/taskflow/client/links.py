"""How a child flow hangs under its parent's task, written and read the operator's way.

A service that starts a child flow while serving a task (the SDK's ``ctx.start_child``) must
link it exactly as the operator's runner links an inline nested flow, with the same label and
annotation keys (``taskflow.wire.links``), so the operator routes the child to the parent task
and the details tree finds it. ``ParentLink`` writes the link; ``parent_of`` reads it back.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from taskflow.client.kube import API_VERSION
from taskflow.wire.links import (
    DEPTH,
    PARENT_ATTEMPT,
    PARENT_CONTEXT,
    PARENT_NAME,
    PARENT_TASK,
    PARENT_UID,
)


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
        meta["ownerReferences"] = [
            {
                "apiVersion": API_VERSION,
                "kind": "Taskflow",
                "name": self.name,
                "uid": self.uid,
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ]
        return body

    def child_name(self, index: int) -> str:
        """A deterministic name per (parent attempt, child index): a redelivered request
        starts the same child again, which the API server refuses as already existing."""
        digest = hashlib.sha256(
            f"{self.uid}/{self.stage}/{self.task}/{self.attempt}/{index}".encode()
        ).hexdigest()[:8]
        stem = re.sub(r"[^a-z0-9-]", "-", f"{self.name}-{self.task}".lower()).strip("-")[:200]
        return f"{stem}-{self.attempt}-{index}-{digest}"

    def made(self, meta: Mapping[str, Any]) -> bool:
        """Whether a flow with this metadata is the child this link's attempt started (a
        redelivered request finds it already there)."""
        return (meta.get("labels") or {}).get(PARENT_UID) == self.uid and (
            meta.get("annotations") or {}
        ).get(PARENT_ATTEMPT) == str(self.attempt)


def parent_of(meta: Mapping[str, Any]) -> dict[str, Any] | None:
    """The ``parent`` of a flow's details: where its link says it hangs, or None for a root."""
    labels = meta.get("labels") or {}
    annotations = meta.get("annotations") or {}
    uid = labels.get(PARENT_UID)
    if not uid:
        return None
    stage, _, task = (annotations.get(PARENT_TASK) or "").partition(".")
    attempt = annotations.get(PARENT_ATTEMPT)
    owner: dict[str, Any] = next(
        (o for o in meta.get("ownerReferences") or [] if o.get("uid") == uid), {}
    )
    return {
        "taskflowId": uid,
        "name": owner.get("name") or labels.get(PARENT_NAME),
        "namespace": meta.get("namespace"),
        "stage": stage or None,
        "task": task or None,
        "attempt": int(attempt) if attempt and attempt.isdigit() else None,
        "depth": int(annotations.get(DEPTH, "1") or 1),
    }
