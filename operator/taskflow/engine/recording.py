"""Where a decision is recorded before its effects happen: the one rule, pure.

A dispatch or an event must not leave before something durable says it was decided, or a
crash would send it twice or lose it; a task's result alone may wait, because the reply it came
from stays in the reply stream. The journal (NATS KV, ~0.3 ms) is that record when it is on;
the API (~9 ms) follows, before the effects for a stage or flow transition (a client that gets
the event finds the object saying so), in the background after a dispatch, lazily for results.
"""

from __future__ import annotations

from enum import StrEnum


class Recording(StrEnum):
    JOURNAL_THEN_BACKGROUND = "journal, then the API in the background"
    JOURNAL_THEN_API = "journal, then the API, then the effects"
    JOURNAL_THEN_LAZY = "journal, the API lazily"
    API_FIRST = "the API, then the effects"
    LAZY = "the API lazily"

    @property
    def journaled(self) -> bool:
        return self.name.startswith("JOURNAL")


def recording(*, journal: bool, dispatches: bool, emits: bool, durable: bool) -> Recording:
    """How to record a decision: ``journal`` (usable now), whether it ``dispatches`` or
    ``emits`` events, and whether the engine called it ``durable`` (a transition)."""
    if journal and (dispatches or emits):
        if dispatches:
            return Recording.JOURNAL_THEN_BACKGROUND
        return Recording.JOURNAL_THEN_API if durable else Recording.JOURNAL_THEN_LAZY
    return Recording.API_FIRST if durable else Recording.LAZY
