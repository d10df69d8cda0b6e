"""The pure engine: (spec, status, now, inputs) -> new status + effects. No I/O here.

The shell (``taskflow.shell``) performs the effects: it writes status, sends requests over
NATS, publishes events. Keeping decisions here makes every transition testable by table.
"""

from taskflow.engine.clock import iso, parse_iso
from taskflow.engine.effects import (
    CancelChild,
    CancelNotice,
    CreateChild,
    Decision,
    Dispatch,
    Effect,
    Emit,
    EventKind,
    Record,
)
from taskflow.engine.engine import POLICY_DENIED, decide, running_asks
from taskflow.engine.inputs import (
    BAD_REPLY,
    Ask,
    ChildFinished,
    Heartbeat,
    Input,
    NoResponders,
    Reply,
    Throttled,
)
from taskflow.engine.options import EffectiveOptions, effective_options
from taskflow.engine.quarantine import quarantine
from taskflow.engine.step import Admission, Refusal

__all__ = [
    "BAD_REPLY",
    "POLICY_DENIED",
    "Admission",
    "Ask",
    "CancelChild",
    "CancelNotice",
    "ChildFinished",
    "CreateChild",
    "Decision",
    "Dispatch",
    "Effect",
    "EffectiveOptions",
    "Emit",
    "EventKind",
    "Heartbeat",
    "Input",
    "NoResponders",
    "Record",
    "Refusal",
    "Reply",
    "Throttled",
    "decide",
    "effective_options",
    "iso",
    "parse_iso",
    "quarantine",
    "running_asks",
]
