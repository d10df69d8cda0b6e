"""The write-ahead record of a flow in the NATS KV bucket ``taskflow-journal``.

An entry holds the flow's status as decided and the events that decision (and any before it
not yet acknowledged by JetStream) emitted: the outbox. Kept before any effect, it lets a
restarted writer know what was sent and publish what may not have reached the event stream
(``Nats-Msg-Id`` makes a repeat harmless). Encoded and decoded here, so the writer that keeps
it and the writer that resumes from it agree; ``resume_from`` picks the newer of the API's
copy and the journal's.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Sequence
from dataclasses import dataclass

from pydantic import ValidationError

from taskflow.api.status import TaskflowStatus

# (seq, the event as published): one event of a flow's outbox.
Event = tuple[int, bytes]


@dataclass(frozen=True, slots=True)
class Entry:
    status: TaskflowStatus
    events: tuple[Event, ...] = ()


def encode(
    status: TaskflowStatus, events: Sequence[Event] = (), *, key: bytes | None = None
) -> bytes:
    """The entry's bytes; with a key, preceded by a line with their HMAC, so that an entry
    written by anyone else (any client with JetStream access) is refused."""
    body = status.model_dump_json(by_alias=True, exclude_none=True).encode()
    entry = b'{"status":' + body + b',"events":[' + b",".join(e for _, e in events) + b"]}"
    return entry if key is None else _mac(key, entry) + b"\n" + entry


def _mac(key: bytes, entry: bytes) -> bytes:
    return hmac.new(key, b"journal\n" + entry, hashlib.sha256).hexdigest().encode()


def decode_entry(raw: bytes, *, key: bytes | None = None) -> Entry:
    """A journal entry; ValueError (naming the problem) if it is unreadable, or, with a key,
    not signed by it."""
    if key is not None:
        mac, _, raw = raw.partition(b"\n")
        if not raw or not hmac.compare_digest(mac, _mac(key, raw)):
            raise ValueError("journal entry refused: not signed with the operator's key")
    try:
        doc = json.loads(raw, parse_constant=_not_ours)  # (encode never writes NaN)
    except (ValueError, RecursionError):
        raise ValueError("journal entry unreadable: not JSON") from None
    if not isinstance(doc, dict):
        raise ValueError("journal entry unreadable: not an object")
    events: tuple[Event, ...] = ()
    if isinstance(doc.get("status"), dict):
        events = tuple(
            (e["seq"], json.dumps(e, separators=(",", ":")).encode())
            for e in doc.get("events") or []
            if isinstance(e, dict) and isinstance(e.get("seq"), int)
        )
        doc = doc["status"]
    # (else: an entry of an operator before the outbox, the status alone)
    try:
        status = TaskflowStatus.model_validate(doc)
    except ValidationError as exc:
        raise ValueError(
            f"journal entry unreadable: {exc.error_count()} errors, first: {exc.errors()[0]['msg']}"
        ) from None
    try:
        # A status this operator cannot write again (nested too deep, say) would stall the
        # writer that resumes from it: refused here, so it resumes from the API's copy.
        status.model_dump_json(by_alias=True, exclude_none=True)
    except Exception as exc:
        raise ValueError(f"journal entry unusable: {type(exc).__name__}: {exc}"[:300]) from None
    return Entry(status=status, events=events)


def _not_ours(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


def decode(raw: bytes, *, key: bytes | None = None) -> TaskflowStatus:
    """The status kept in a journal entry; ValueError (naming the problem) if unreadable."""
    return decode_entry(raw, key=key).status


def resume_from(api: TaskflowStatus, journaled: TaskflowStatus | None) -> TaskflowStatus:
    """The copy to resume from: the journal's when it records more (a higher ``writeSeq``:
    the operator stopped between a record in the journal and the API write that follows)."""
    if journaled is not None and journaled.write_seq > api.write_seq:
        return journaled
    return api


def unpublished(events: Sequence[Event], *, stream_last: int) -> list[Event]:
    """The events of an outbox that the event stream does not have yet, in order."""
    return sorted((e for e in events if e[0] > stream_last), key=lambda e: e[0])
