"""The write-ahead copy of a flow's status in the NATS KV bucket ``taskflow-journal``.

Encoded here and decoded here, so the writer that keeps it and the writer that resumes from it
agree; ``resume_from`` is the rule that picks the newer of the API's copy and the journal's.
"""

from __future__ import annotations

from pydantic import ValidationError

from taskflow.api.status import TaskflowStatus


def encode(status: TaskflowStatus) -> bytes:
    return status.model_dump_json(by_alias=True, exclude_none=True).encode()


def decode(raw: bytes) -> TaskflowStatus:
    """The status kept in a journal entry; ValueError (naming the problem) if unreadable."""
    try:
        return TaskflowStatus.model_validate_json(raw)
    except ValidationError as exc:
        raise ValueError(f"journal entry unreadable: {exc.error_count()} errors, first: "
                         f"{exc.errors()[0]['msg']}") from None


def resume_from(api: TaskflowStatus, journaled: TaskflowStatus | None) -> TaskflowStatus:
    """The copy to resume from: the journal's when it records more (a higher ``writeSeq``:
    the operator stopped between a dispatch and the API write that records it)."""
    if journaled is not None and journaled.write_seq > api.write_seq:
        return journaled
    return api
