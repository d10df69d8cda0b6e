"""The flow-control entry's rules (``wire/slots.py``), which every replica applies to the same
KV entry: never more holders than the limit, the earliest-ready waiter first, a rate's tokens
refilling up to its burst, lapsed leases freeing their places."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from taskflow.api.limits import Gate
from taskflow.wire.slots import Entry

LEASE = 30.0


def test_at_most_limit_holders_and_a_holder_renews_its_own() -> None:
    gate = Gate(key="k", limit=2)
    entry = Entry()
    for holder in ("a", "b"):
        taken = entry.take(gate, holder, now=0, lease=LEASE)
        assert taken is not None
        entry = taken
    assert entry.take(gate, "c", now=1, lease=LEASE) is None
    renewed = entry.take(gate, "a", now=1, lease=LEASE)
    assert renewed is not None and renewed.holders["a"] == 1 + LEASE
    assert entry.release("a", now=2).take(gate, "c", now=2, lease=LEASE) is not None


def test_a_lapsed_lease_frees_its_slot() -> None:
    gate = Gate(key="k", limit=1)
    entry = Entry().take(gate, "dead", now=0, lease=LEASE)
    assert entry is not None
    assert not entry.admits(gate, "b", now=LEASE - 1)
    assert entry.admits(gate, "b", now=LEASE + 1)


def test_the_earliest_ready_waiter_goes_first() -> None:
    gate = Gate(key="k", limit=1)
    entry = Entry().take(gate, "running", now=0, lease=LEASE)
    assert entry is not None
    entry = entry.wait("late", ready=5, now=5, lease=LEASE).wait(
        "early", ready=2, now=6, lease=LEASE
    )
    entry = entry.release("running", now=7)
    assert not entry.admits(gate, "late", now=7)  # "early" was ready first
    assert not entry.admits(gate, "newcomer", now=7)
    assert entry.admits(gate, "early", now=7)
    taken = entry.take(gate, "early", now=7, lease=LEASE)
    assert taken is not None and "early" not in taken.waiters
    # A waiter's place is the time it was first held back, whenever it is renewed.
    assert taken.wait("late", ready=99, now=8, lease=LEASE).waiters["late"][0] == 5


def test_a_forced_take_holds_whatever_the_limit() -> None:
    """A running attempt an operator resumes holds its slot again, even over the limit (it is
    in the service already): no new attempt starts until it ends."""
    gate = Gate(key="k", limit=1)
    entry = Entry().take(gate, "other", now=0, lease=LEASE)
    assert entry is not None
    forced = entry.take(gate, "resumed", now=1, lease=LEASE, force=True)
    assert forced is not None and set(forced.holders) == {"other", "resumed"}
    assert not forced.release("other", now=2).admits(gate, "new", now=2)


def test_a_rate_spends_tokens_and_refills_up_to_its_burst() -> None:
    gate = Gate(key="r", rate=2.0, burst=2)
    entry = Entry()
    for holder in ("a", "b"):  # the burst
        taken = entry.take(gate, holder, now=10, lease=LEASE)
        assert taken is not None
        entry = taken
    assert entry.take(gate, "c", now=10, lease=LEASE) is None
    assert entry.next_token(gate, "c", now=10) == 10.5
    assert entry.take(gate, "c", now=10.5, lease=LEASE) is not None
    assert entry.tokens_at(gate, now=1000) == 2  # never more than the burst
    assert not entry.holders  # a rate alone holds nothing


def test_an_entry_that_is_not_one_decodes_empty() -> None:
    for data in (None, b"", b"[]", b"{", b'{"holders": {"a": "x"}}', b'{"waiters": {"a": 1}}'):
        assert Entry.decode(data) == Entry()
    entry = Entry(holders={"a": 1.0}, waiters={"b": (2.0, 3.0)}, tokens=1.5, at=4.0)
    assert Entry.decode(entry.encode("k")) == entry


events = st.lists(
    st.tuples(
        st.sampled_from(["take", "wait", "release", "tick"]),
        st.sampled_from(["a", "b", "c", "d", "e"]),
        st.floats(0, 5),
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(limit=st.integers(1, 3), script=events)
def test_no_sequence_of_moves_exceeds_the_limit_or_jumps_the_line(
    limit: int, script: list[tuple[str, str, float]]
) -> None:
    gate = Gate(key="k", limit=limit)
    entry, now = Entry(), 0.0
    for move, holder, step in script:
        now += step
        if move == "take":
            before = entry.live(now)
            taken = entry.take(gate, holder, now=now, lease=LEASE)
            if taken is not None and holder not in before.holders:
                # Nobody still waiting was ready before it.
                assert before.rank(holder) < limit - len(before.holders)
            entry = taken or entry
        elif move == "wait":
            entry = entry.wait(holder, ready=now, now=now, lease=LEASE)
        elif move == "release":
            entry = entry.release(holder, now=now)
        assert len(entry.live(now).holders) <= limit
        assert Entry.decode(entry.encode("k")) == entry
