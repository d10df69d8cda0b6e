"""The language-neutral NATS protocol, in both directions: subjects, a request's headers and
its execution context, replies, heartbeats, cancel notices, events, child links.

Pure code only; ``taskflow.shell`` and the SDK send and receive the bytes. Each shape encodes
and decodes itself in one place (``request.RequestHeaders``, ``cancel.Notice``, ``replies``).
"""

from taskflow.wire.cancel import Notice
from taskflow.wire.context import IDEMPOTENCY_HEADER, execution_context
from taskflow.wire.events import event_payload
from taskflow.wire.replies import ReplyLimits, read_reply
from taskflow.wire.request import AttemptKey, ExecutionContext, RequestHeaders
from taskflow.wire.subjects import Subjects

__all__ = [
    "IDEMPOTENCY_HEADER",
    "AttemptKey",
    "ExecutionContext",
    "Notice",
    "ReplyLimits",
    "RequestHeaders",
    "Subjects",
    "event_payload",
    "execution_context",
    "read_reply",
]
