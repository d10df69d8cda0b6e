"""The pure parts of active/active replicas: a flow's bucket, the fair share, the fence."""

from __future__ import annotations

import hashlib
import uuid
from collections import Counter

import pytest

from taskflow.shell.buckets import (
    Seen,
    Timing,
    bucket_of,
    fair_share,
    live_replicas,
    other_counts,
    plan,
)

T = Timing(lease_s=15.0)


def test_bucket_is_the_first_bytes_of_sha256_of_the_uid() -> None:
    uid = "6f1c1d4e-0000-4000-8000-000000000001"
    digest = hashlib.sha256(uid.encode()).digest()
    assert bucket_of(uid, 12) == int.from_bytes(digest[:8], "big") % 12
    assert bucket_of(uid, 1) == 0
    assert bucket_of(uid, 12) == bucket_of(uid, 12)  # the same on every replica


def test_buckets_spread_uids_evenly() -> None:
    counts = Counter(bucket_of(str(uuid.UUID(int=i, version=4)), 12) for i in range(12_000))
    assert set(counts) == set(range(12))
    assert max(counts.values()) < 1.15 * 1000


@pytest.mark.parametrize(
    ("buckets", "replicas", "share"),
    [
        (12, 1, 12),
        (12, 2, 6),
        (12, 3, 4),
        (12, 5, 3),
        (12, 12, 1),
        (12, 20, 1),
        (1, 3, 1),
        (7, 0, 7),
    ],
)
def test_fair_share(buckets: int, replicas: int, share: int) -> None:
    assert fair_share(buckets=buckets, replicas=replicas) == share
    assert share * max(1, replicas) >= buckets  # every bucket has room somewhere


def test_fence_comes_before_anyone_may_take_the_bucket() -> None:
    """The holder sent its last successful renewal at 100; another replica saw that version
    no earlier than 100. The holder stops its writers at D - M, cancels the stragglers at
    D - M/2; the other may take it at D + M from when it saw it: 1.5 M later at least."""
    assert (T.margin_s, T.renew_s) == (3.0, 5.0)
    assert T.fence_at(renewed=100.0) == 112.0
    assert T.cancel_at(renewed=100.0) == 113.5
    assert T.expires_at(observed=100.0, duration_s=15) == 118.0
    assert T.expires_at(observed=100.0, duration_s=15) - T.cancel_at(renewed=100.0) == 1.5 * 3.0
    short = Timing(lease_s=3.0)
    assert short.fence_at(renewed=0.0) < short.cancel_at(renewed=0.0)
    assert short.cancel_at(renewed=0.0) < short.expires_at(observed=0.0, duration_s=3)
    assert Timing(lease_s=2.5).duration_field == 3  # others wait at least as long


def seen(holder: str, *, at: float = 0.0, version: str = "1", buckets: int | None = 12) -> Seen:
    return Seen(version=version, holder=holder, duration_s=15, observed=at, buckets=buckets)


def test_expiry_counts_from_when_this_replica_first_saw_the_version() -> None:
    first = seen("a", at=10.0)
    assert first.live(now=27.9, timing=T)
    assert not first.live(now=28.0, timing=T)
    renewed = first.again(seen("a", at=20.0, version="2"))
    assert renewed.observed == 20.0 and renewed.live(now=30.0, timing=T)
    unchanged = first.again(seen("a", at=20.0))
    assert unchanged.observed == 10.0  # seen again: still counted from the first time
    assert not seen("", at=10.0).live(now=10.0, timing=T)  # given back: free at once


def test_plan_takes_free_and_expired_buckets_up_to_the_share() -> None:
    leases = {0: seen("b", at=50.0), 1: seen("b", at=0.0), 2: seen("")}
    got = plan(buckets=4, held=[], seen=leases, replicas=2, now=60.0, timing=T)
    # 0 is alive; 1 expired (seen at 0, unchanged); 2 given back; 3 has no Lease yet
    assert got.take == (1, 2) and got.give == ()
    got = plan(buckets=4, held=[], seen=leases, replicas=1, now=60.0, timing=T)
    assert got.take == (1, 2, 3)
    got = plan(buckets=4, held=[], seen=leases, replicas=2, now=60.0, timing=T, start=3)
    assert got.take == (3, 1)  # each replica starts looking elsewhere


def test_plan_gives_back_beyond_the_share_and_never_retakes_what_it_is_giving_back() -> None:
    got = plan(buckets=12, held=range(12), seen={}, replicas=3, now=0.0, timing=T)
    assert got.give == (4, 5, 6, 7, 8, 9, 10, 11) and got.take == ()
    got = plan(buckets=4, held=[0], busy=[0, 1], seen={}, replicas=1, now=0.0, timing=T)
    assert got.take == (2, 3)


def test_live_replicas_and_other_bucket_counts() -> None:
    peers = {"taskflow-replica-b": seen("b", at=50.0), "taskflow-replica-c": seen("c", at=0.0)}
    assert live_replicas(peers, now=60.0, timing=T) == 2  # this one and b; c stopped renewing
    assert live_replicas({}, now=0.0, timing=T) == 1
    leases = [seen("b", at=50.0, buckets=16), seen("c", at=0.0, buckets=8), seen("d", at=50.0)]
    assert other_counts(leases, buckets=12, now=60.0, timing=T) == {16}
