"""A fast deep copy of status, for a decision to mutate.

``decide`` never changes the status it is given: each decision works on its own copy of the
flow's whole status, so the copy is paid for on every reply, timer and spec change, and this
one costs about half of pydantic's ``model_copy(deep=True)``.
"""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel

_M = TypeVar("_M")
_CONTAINERS = (BaseModel, list, dict)


def clone(value: _M) -> _M:
    """A deep copy of status for one decision to mutate: models, lists and dicts are copied,
    everything else (str, int, bool, enums, None) is immutable and shared. Same result as
    ``model_copy(deep=True)`` at about half the cost (no memo, no per-leaf dispatch), which
    matters because every decision copies the flow's whole status."""
    if isinstance(value, BaseModel):
        new = value.__copy__()  # a model's own shallow copy: __dict__, fields set, extras
        fields: dict[str, Any] = new.__dict__
        for key, item in fields.items():
            if isinstance(item, _CONTAINERS):
                fields[key] = clone(item)
        return new
    if isinstance(value, list):
        return [clone(v) if isinstance(v, _CONTAINERS) else v for v in value]  # type: ignore[return-value]
    if isinstance(value, dict):
        return {
            k: clone(v) if isinstance(v, _CONTAINERS) else v  # type: ignore[return-value]
            for k, v in value.items()
        }
    return value
