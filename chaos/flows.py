"""The flows of a chaos run: the seed's own scenario, ``examples/configure-group.yaml``.

Stage 1 creates a group (one task), stage 2 adds ten appliances to it in parallel; the same
services (``group-core``, ``appliance-core``), actions and per-task ``maxRetries: 3``. What
changes, per flow: its name, its group id (so every request differs), and the options:
every task may retry 3 times, the timeout is large enough that no service delay trips it
(only a lost request or reply does), there is no ``maxAge`` (a run with 50 operator restarts
would spend it on restarts, not on the service), and every other flow sets
``exactlyOnceTaskExecution``.
"""

from __future__ import annotations

import copy
import json
from functools import cache
from pathlib import Path
from typing import Any

SEED = Path(__file__).resolve().parent.parent / "examples" / "configure-group.yaml"


@cache
def seed() -> dict[str, Any]:
    import yaml

    loaded: dict[str, Any] = yaml.safe_load(SEED.read_text())
    return loaded


def exactly_once(index: int) -> bool:
    """Half of the flows, alternating."""
    return index % 2 == 1


def flow_name(index: int) -> str:
    return f"cg-{index:05d}"


def body(index: int, *, timeout_s: float, retry_delay_s: float) -> bytes:
    """The Taskflow to create for flow ``index``."""
    flow = copy.deepcopy(seed())
    flow["metadata"] = {"name": flow_name(index)}
    group = f"g{index:05d}"
    options = flow["spec"]["options"]
    options.pop("maxAge", None)
    options.update(
        timeout=f"{timeout_s:g}s",
        retryDelay=f"{int(retry_delay_s * 1000)}ms",
        maxRetries=3,
        exactlyOnceTaskExecution=exactly_once(index),
    )
    for stage in flow["spec"]["stages"]:
        for task in stage["tasks"]:
            task["params"]["groupId"] = group
    return json.dumps(flow, separators=(",", ":")).encode()
