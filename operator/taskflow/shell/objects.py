"""Small facts about a flow's object and the clock, shared by the writer's parts."""

from __future__ import annotations

import time
from typing import Any

from taskflow.engine import iso


def now_ms() -> int:
    return int(time.time() * 1000)


def iso_now() -> str:
    return iso(now_ms())


def rv(body: dict[str, Any]) -> int:
    try:
        return int(body["metadata"].get("resourceVersion") or 0)
    except (TypeError, ValueError):
        return 0


def lean(body: dict[str, Any]) -> dict[str, Any]:
    """What a writer keeps of an object: identity, metadata and spec. Not status (the writer
    has its own, as a model) nor managedFields: a seed-sized object decodes to ~40 KB of
    Python objects, most of it those two, and an active flow keeps its body as long as it runs."""
    meta = body.get("metadata") or {}
    if "managedFields" in meta:
        meta = {k: v for k, v in meta.items() if k != "managedFields"}
    lean: dict[str, Any] = {k: body[k] for k in ("apiVersion", "kind", "spec") if k in body}
    lean["metadata"] = meta
    return lean
