"""The last line of defence against a poison input: one that makes a decision fail.

``read_reply`` already refuses what it knows cannot be kept, so this runs only when a round has
failed. Each input is tried alone; one whose decision raises, or whose decided status cannot be
serialised, is replaced by a failure of its attempt (reason ``BadReply``), so the flow moves on
(retry, timeout, cancel) instead of failing the same way on every restart.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from taskflow.api.spec import TaskflowSpec
from taskflow.api.status import ErrorReason, TaskError, TaskflowStatus
from taskflow.engine.engine import decide
from taskflow.engine.inputs import ChildFinished, Input, Reply


def quarantine(
    *,
    spec: TaskflowSpec,
    status: TaskflowStatus,
    inputs: Sequence[Input],
    now: int,
    uid: str,
    generation: int,
    event_subject: str,
) -> list[Input]:
    """``inputs`` with every input that cannot be decided and recorded replaced (or, when it
    names no attempt, left out)."""
    kept: list[Input] = []
    for item in inputs:
        problem = _problem(
            spec=spec,
            status=status,
            item=item,
            now=now,
            uid=uid,
            generation=generation,
            event_subject=event_subject,
        )
        if problem is None:
            kept.append(item)
        elif isinstance(item, Reply | ChildFinished) and item.attempt is not None:
            error = TaskError(
                message=f"the reply could not be recorded: {problem}"[:1024],
                reason=ErrorReason.BAD_REPLY,
            )
            kept.append(
                Reply(stage=item.stage, task=item.task, attempt=item.attempt, ok=False, error=error)
            )
    return kept


def _problem(
    *,
    spec: TaskflowSpec,
    status: TaskflowStatus,
    item: Input,
    now: int,
    uid: str,
    generation: int,
    event_subject: str,
) -> str | None:
    try:
        decision = decide(
            spec=spec,
            status=status,
            now=now,
            inputs=[item],
            uid=uid,
            generation=generation,
            event_subject=event_subject,
        )
        # Both ways status leaves the operator: the journal's JSON and the API's body.
        decision.status.model_dump_json(by_alias=True, exclude_none=True)
        json.dumps(decision.status.model_dump(by_alias=True, exclude_none=True, mode="json"))
        # Both write NaN and Infinity as null without a word (events and headers, written
        # with json.dumps, would carry them as invalid JSON): refused here, with anything
        # else that is not plain JSON.
        json.dumps(decision.status.model_dump(by_alias=True, exclude_none=True), allow_nan=False)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"[:300]
    return None
