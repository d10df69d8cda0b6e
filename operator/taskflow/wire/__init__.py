"""The language-neutral NATS protocol: subjects, the execution-context header, replies, events.

Pure functions only; ``taskflow.shell`` sends and receives the bytes.
"""

from taskflow.wire.context import IDEMPOTENCY_HEADER, execution_context, idempotency_key
from taskflow.wire.events import event_payload
from taskflow.wire.replies import ReplyLimits, read_reply
from taskflow.wire.subjects import Subjects

__all__ = [
    "IDEMPOTENCY_HEADER",
    "ReplyLimits",
    "Subjects",
    "event_payload",
    "execution_context",
    "idempotency_key",
    "read_reply",
]
