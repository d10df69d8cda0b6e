"""Where a decision is recorded before its effects: the rule, by table. No I/O."""

from __future__ import annotations

import pytest

from taskflow.engine.recording import Recording, recording

R = Recording


@pytest.mark.parametrize(
    ("journal", "dispatches", "emits", "durable", "expected"),
    [
        # A stage starts: journaled, dispatched, then the API in the background.
        (True, True, True, True, R.JOURNAL_THEN_BACKGROUND),
        (True, True, False, False, R.JOURNAL_THEN_BACKGROUND),  # a redelivery
        # A stage or the flow ends: journaled with its events, the API before the effects.
        (True, False, True, True, R.JOURNAL_THEN_API),
        # Results alone: journaled with their events, the API lazily.
        (True, False, True, False, R.JOURNAL_THEN_LAZY),
        # Nothing sent, nothing emitted (a late reply noted, observedGeneration).
        (True, False, False, True, R.API_FIRST),
        (True, False, False, False, R.LAZY),
        # Without the journal (a CRD too old for writeSeq, NATS refusing the put).
        (False, True, True, True, R.API_FIRST),
        (False, False, True, True, R.API_FIRST),
        (False, False, True, False, R.LAZY),
        (False, False, False, False, R.LAZY),
    ],
)
def test_the_recording_of_a_decision(
    journal: bool, dispatches: bool, emits: bool, durable: bool, expected: Recording
) -> None:
    how = recording(journal=journal, dispatches=dispatches, emits=emits, durable=durable)
    assert how == expected
    # Anything sent or emitted is recorded somewhere before it goes, or it has to be durable.
    if dispatches or emits:
        assert how.journaled or how == R.API_FIRST or (not durable and not dispatches)
