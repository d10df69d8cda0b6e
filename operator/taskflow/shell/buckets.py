"""Active/active replicas: the flows split into buckets, each held by one replica through a Lease.

With ``--replica-mode active`` every replica watches every flow (kopf runs without peering) and
runs the writers of the flows whose bucket it holds: bucket = the first 8 bytes of
sha256(uid), big-endian, mod ``--buckets``. Bucket ``i`` is the ``coordination.k8s.io`` Lease
``taskflow-bucket-<i>`` in ``--lease-namespace``; its ``holderIdentity`` is the replica's id
(pod name + a random suffix, new at every start). Each replica also keeps a Lease
``taskflow-replica-<id>`` alive, so the replicas can count each other: a replica holds at most
``ceil(buckets / live replicas)`` buckets, takes free or expired ones up to that share and gives
back what is beyond it (after its writers stopped), so the load spreads when a replica joins.

Every Lease write carries the resourceVersion it was read at, so two replicas never both
hold one. The timing, with D the lease duration and M = D/5 the margin:

- the holder renews every D/3; it counts a renewal from the moment it *sent* the request;
- a holder whose last successful renewal is D - M old stops the bucket's writers (each at the
  end of its round; those still busy at D - M/2 are cancelled), before anyone may take it;
- another replica takes a bucket only when the Lease's resourceVersion has not changed for
  D + M on its *own* clock, counted from when it first saw that version (as client-go's leader
  election does): it never compares timestamps written by another machine;
- a bucket given back (holder cleared after its writers stopped) is free at once.

The guarantee: as long as the replicas' clocks run at the same rate (within M/D = 20 % over
one lease, i.e. any working clock; wall-clock offsets between machines do not matter) and a
replica is not frozen for more than M (a stopped process, a very long GC pause) between
checking its deadline and acting, the old holder's writers have stopped at least 1.5 M
before the new holder starts any. The new holder resumes each flow through the normal
``FlowRunner.resume()``: the API's and the journal's status (the newer wins), the reply stream
for attempts in flight, ``_reask_unanswered`` only for idempotent services; so an attempt
recorded as sent is never sent again to a service that is not idempotent. If the guarantee's
assumptions fail, the status writes' resourceVersion CAS is what is left (journal puts are not
fenced): a duplicate attempt becomes possible.

A killed replica's buckets are taken over within D + M + D/3 (the next look at the Leases)
after its last renewal, and each flow then resumes (a GET, the journal, the reply stream).

The pure parts (``bucket_of``, ``fair_share``, ``Timing``, ``Seen``, ``plan``) take ``now``
explicitly (``time.monotonic()`` seconds) and are tested in ``tests/unit/test_buckets.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import math
import os
import secrets
import socket
import time
from collections.abc import Callable, Coroutine, Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

from prometheus_client import Gauge

from taskflow.kube import Conflict, Gone, Kube

log = logging.getLogger("taskflow.buckets")

BUCKETS_HELD = Gauge(
    "taskflow_buckets_held", "Buckets of flows this replica holds (active/active replicas)"
)
BUCKET_PREFIX = "taskflow-bucket-"
REPLICA_PREFIX = "taskflow-replica-"
COUNT_ANNOTATION = "taskflow.dev/buckets"

# -- the pure parts -----------------------------------------------------------------------------


def bucket_of(uid: str, buckets: int) -> int:
    """The bucket of a flow: the first 8 bytes of sha256(uid), big-endian, mod ``buckets``."""
    return int.from_bytes(hashlib.sha256(uid.encode()).digest()[:8], "big") % buckets


def fair_share(*, buckets: int, replicas: int) -> int:
    """How many buckets one of ``replicas`` live replicas holds at most."""
    return math.ceil(buckets / max(1, replicas))


@dataclasses.dataclass(frozen=True)
class Timing:
    """The clock of a bucket Lease of ``lease_s`` seconds (see the module's docstring)."""

    lease_s: float

    @property
    def margin_s(self) -> float:
        return self.lease_s / 5

    @property
    def renew_s(self) -> float:
        return self.lease_s / 3

    @property
    def duration_field(self) -> int:
        """leaseDurationSeconds (an integer): rounded up, so others wait at least as long."""
        return max(1, math.ceil(self.lease_s))

    def fence_at(self, *, renewed: float) -> float:
        """When a holder whose last successful renewal was sent at ``renewed`` stops the
        bucket's writers."""
        return renewed + self.lease_s - self.margin_s

    def cancel_at(self, *, renewed: float) -> float:
        """When writers that have not stopped by themselves are cancelled."""
        return renewed + self.lease_s - self.margin_s / 2

    def expires_at(self, *, observed: float, duration_s: float) -> float:
        """When another replica may take a Lease whose version it first saw at ``observed``
        (its own clock), unchanged since."""
        return observed + duration_s + self.margin_s


@dataclasses.dataclass(frozen=True)
class Seen:
    """A Lease as this replica saw it: its version, holder ('' = free), duration, the count of
    buckets its holder runs with, and when (this replica's clock) that version was first seen."""

    version: str
    holder: str
    duration_s: float
    observed: float
    buckets: int | None = None

    def again(self, later: Seen) -> Seen:
        """The same version seen again keeps the time it was first seen."""
        return self if later.version == self.version else later

    def live(self, *, now: float, timing: Timing) -> bool:
        """Held, and not expired by this replica's clock."""
        return bool(self.holder) and now < timing.expires_at(
            observed=self.observed, duration_s=self.duration_s
        )


@dataclasses.dataclass(frozen=True)
class Plan:
    take: tuple[int, ...] = ()
    give: tuple[int, ...] = ()


def plan(
    *,
    buckets: int,
    held: Iterable[int],
    busy: Iterable[int] = (),
    seen: Mapping[int, Seen],
    replicas: int,
    now: float,
    timing: Timing,
    start: int = 0,
) -> Plan:
    """Which buckets to take and which to give back. ``held``: those this replica holds and
    serves; ``busy``: those it is still giving back or renewing (never taken again meanwhile);
    ``seen``: the bucket Leases as last seen (a bucket without one is free); ``start``: where
    this replica starts looking, so replicas do not all race for the same free bucket."""
    held = sorted(held)
    share = fair_share(buckets=buckets, replicas=replicas)
    if len(held) > share:
        return Plan(give=tuple(held[share:]))
    mine = set(held) | set(busy)
    free = []
    for i in range(buckets):
        bucket = (start + i) % buckets
        lease = seen.get(bucket)
        if bucket not in mine and (lease is None or not lease.live(now=now, timing=timing)):
            free.append(bucket)
    return Plan(take=tuple(free[: share - len(held)]))


def live_replicas(peers: Mapping[str, Seen], *, now: float, timing: Timing) -> int:
    """This replica and every other whose replica Lease is alive by this replica's clock."""
    return 1 + sum(1 for s in peers.values() if s.live(now=now, timing=timing))


def other_counts(leases: Iterable[Seen], *, buckets: int, now: float, timing: Timing) -> set[int]:
    """Bucket counts other than ours that live Leases announce: replicas that map flows to
    buckets differently (a change of --buckets mid-rollout) must not run side by side."""
    return {
        s.buckets
        for s in leases
        if s.buckets is not None and s.buckets != buckets and s.live(now=now, timing=timing)
    }


# -- the Leases ---------------------------------------------------------------------------------


def replica_id() -> str:
    """The pod's name (kopf's POD_ID, else the host name) and a suffix new at every start."""
    base = os.environ.get("POD_ID") or socket.gethostname() or "taskflow"
    return f"{base}-{secrets.token_hex(3)}"


def _micro_time() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def seen_from(lease: dict[str, Any], *, now: float) -> Seen:
    meta, spec = lease.get("metadata") or {}, lease.get("spec") or {}
    count = (meta.get("annotations") or {}).get(COUNT_ANNOTATION)
    return Seen(
        version=str(meta.get("resourceVersion", "")),
        holder=str(spec.get("holderIdentity") or ""),
        duration_s=float(spec.get("leaseDurationSeconds") or 0),
        observed=now,
        buckets=int(count) if count and str(count).isdigit() else None,
    )


@dataclasses.dataclass(frozen=True)
class BucketSettings:
    """``--buckets``, ``--bucket-lease`` and ``--lease-namespace``, and this replica's id."""

    count: int = 1
    lease_s: float = 15.0
    namespace: str = "default"
    identity: str = dataclasses.field(default_factory=replica_id)


@dataclasses.dataclass
class Held:
    lease: dict[str, Any]  # as last written
    renewed: float  # (monotonic) when the last successful write was sent
    draining: bool = False  # being given back: its writers are stopping
    drained: bool = False  # its writers stopped: release the Lease next


TakeHook = Callable[[int], None]
LoseHook = Callable[[int, float], Coroutine[Any, Any, None]]


class Buckets:
    """This replica's buckets: renews what it holds, takes and gives back its fair share, and
    stops a bucket's writers before its Lease can expire (the fence)."""

    def __init__(
        self, *, kube: Kube, settings: BucketSettings, on_take: TakeHook, on_lose: LoseHook
    ) -> None:
        self.kube = kube
        self.settings = settings
        self.count = settings.count
        self.namespace = settings.namespace
        self.me = settings.identity
        self.timing = Timing(lease_s=settings.lease_s)
        self.on_take = on_take  # start the bucket's writers
        self.on_lose = on_lose  # stop them (within the bound given), awaited
        self.held: dict[int, Held] = {}
        self.seen: dict[int, Seen] = {}
        self.peers: dict[str, Seen] = {}
        self.own: dict[str, Any] | None = None  # this replica's Lease, as last written
        self.closing = False  # shutting down: renew, but take and give nothing
        self._start = int.from_bytes(hashlib.sha256(self.me.encode()).digest()[:4], "big")
        self._tasks: list[asyncio.Task[None]] = []
        self._losing: set[asyncio.Task[None]] = set()
        self._warned: set[str] = set()

    def owns(self, uid: str) -> bool:
        """Whether this replica runs the writer of the flow ``uid`` now."""
        return self.holds(bucket_of(uid, self.count))

    def holds(self, bucket: int) -> bool:
        held = self.held.get(bucket)
        return held is not None and not held.draining

    def start(self) -> None:
        log.info(
            "active/active replica %s: %d buckets, Leases of %gs in namespace %s",
            self.me,
            self.count,
            self.timing.lease_s,
            self.namespace,
        )
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._run()), loop.create_task(self._fence())]

    async def close(self) -> None:
        """After the writers stopped: give every bucket back and drop this replica's Lease."""
        for task in self._tasks:
            task.cancel()
        for task in [*self._tasks, *self._losing]:
            with contextlib.suppress(BaseException):
                await task
        for bucket, held in list(self.held.items()):
            with contextlib.suppress(Exception):
                async with asyncio.timeout(self.timing.renew_s):
                    await self.kube.replace_lease(self._released(held.lease))
                log.info("gave back bucket %d (shutting down)", bucket)
        self.held.clear()
        BUCKETS_HELD.set(0)
        if self.own is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(self.timing.renew_s):
                    meta = self.own["metadata"]
                    await self.kube.delete_lease(
                        self.namespace, meta["name"], resource_version=meta["resourceVersion"]
                    )

    # -- the loops ------------------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            began = time.monotonic()
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("bucket round failed")
            await asyncio.sleep(max(0.0, self.timing.renew_s - (time.monotonic() - began)))

    async def _fence(self) -> None:
        """Independent of the renewals (which may hang on the API server): a bucket whose last
        renewal is too old loses its writers before any other replica may take it."""
        step = max(0.05, self.timing.margin_s / 4)
        while True:
            now = time.monotonic()
            for bucket, held in list(self.held.items()):
                if now >= self.timing.fence_at(renewed=held.renewed):
                    self._lose(bucket, f"not renewed for {now - held.renewed:.1f}s")
            await asyncio.sleep(step)

    def _lose(self, bucket: int, why: str) -> None:
        held = self.held.pop(bucket, None)
        if held is None:
            return
        BUCKETS_HELD.set(len(self.held))
        log.warning("lost bucket %d (%s): stopping its writers", bucket, why)
        bound = max(0.0, self.timing.cancel_at(renewed=held.renewed) - time.monotonic())
        task = asyncio.get_running_loop().create_task(self.on_lose(bucket, bound))
        self._losing.add(task)
        task.add_done_callback(self._losing.discard)

    async def tick(self) -> None:
        """One round: renew (or release), look at every Lease, take or give back."""
        await asyncio.gather(
            *(self._renew(b, h) for b, h in list(self.held.items())), self._renew_own()
        )
        try:
            async with asyncio.timeout(self.timing.renew_s):
                leases = await self.kube.list_leases(self.namespace)
        except Exception as exc:
            self._warn("list", f"cannot read the Leases in {self.namespace}: {exc}")
            return
        self._warned.discard("list")
        now = time.monotonic()
        self._look(leases, now=now)
        if self.closing:
            return
        others = other_counts(
            [*self.seen.values(), *self.peers.values()],
            buckets=self.count,
            now=now,
            timing=self.timing,
        )
        if others:
            self._warn(
                "count",
                f"replicas with --buckets {sorted(others)} are alive (this one has "
                f"{self.count}): taking no bucket until they are gone",
            )
            return
        self._warned.discard("count")
        decided = plan(
            buckets=self.count,
            held=[b for b, h in self.held.items() if not h.draining],
            busy=list(self.held),
            seen=self.seen,
            replicas=live_replicas(self.peers, now=now, timing=self.timing),
            now=now,
            timing=self.timing,
            start=self._start % self.count,
        )
        for bucket in decided.give:
            self._give_back(bucket)
        for bucket in decided.take:
            await self._take(bucket)

    def _look(self, leases: list[dict[str, Any]], *, now: float) -> None:
        own_name = REPLICA_PREFIX + self.me
        seen: dict[int, Seen] = {}
        peers: dict[str, Seen] = {}
        for lease in leases:
            name = (lease.get("metadata") or {}).get("name", "")
            if name.startswith(BUCKET_PREFIX):
                index = name.removeprefix(BUCKET_PREFIX)
                if index.isdigit() and int(index) < self.count:
                    bucket = int(index)
                    latest = seen_from(lease, now=now)
                    before = self.seen.get(bucket)
                    seen[bucket] = before.again(latest) if before else latest
            elif name == own_name:
                if self.own is None:
                    self.own = lease
            elif name.startswith(REPLICA_PREFIX):
                latest = seen_from(lease, now=now)
                before = self.peers.get(name)
                peers[name] = before.again(latest) if before else latest
                self._collect(lease, peers[name], now=now)
        self.seen, self.peers = seen, peers

    def _collect(self, lease: dict[str, Any], seen: Seen, *, now: float) -> None:
        """A replica Lease unchanged for ten lease durations: its replica is long gone."""
        if now - seen.observed > 10 * max(seen.duration_s, self.timing.lease_s):
            meta = lease["metadata"]
            task = asyncio.get_running_loop().create_task(
                self.kube.delete_lease(
                    self.namespace, meta["name"], resource_version=meta["resourceVersion"]
                )
            )
            self._losing.add(task)
            task.add_done_callback(self._losing.discard)

    # -- the Lease writes -----------------------------------------------------------------------

    def _lease(self, name: str, *, holder: str | None, transitions: int = 0) -> dict[str, Any]:
        now = _micro_time()
        spec: dict[str, Any] = {
            "leaseDurationSeconds": self.timing.duration_field,
            "acquireTime": now,
            "renewTime": now,
            "leaseTransitions": transitions,
        }
        if holder:
            spec["holderIdentity"] = holder
        return {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {
                "name": name,
                "namespace": self.namespace,
                "labels": {"app.kubernetes.io/managed-by": "taskflow-operator"},
                "annotations": {COUNT_ANNOTATION: str(self.count)},
            },
            "spec": spec,
        }

    def _released(self, lease: dict[str, Any]) -> dict[str, Any]:
        body = {**lease, "spec": {**lease["spec"], "renewTime": _micro_time()}}
        body["spec"].pop("holderIdentity", None)
        return body

    async def _write(self, body: dict[str, Any], *, create: bool) -> dict[str, Any]:
        async with asyncio.timeout(self.timing.renew_s):
            if create:
                return await self.kube.create_lease(self.namespace, body)
            return await self.kube.replace_lease(body)

    async def _renew(self, bucket: int, held: Held) -> None:
        if held.drained:  # its writers stopped: give the Lease back
            try:
                await self._write(self._released(held.lease), create=False)
            except (Conflict, Gone):
                pass
            except Exception as exc:  # it expires anyway; the fence drops it meanwhile
                self._warn(f"release-{bucket}", f"could not give back bucket {bucket}: {exc}")
                return
            if self.held.get(bucket) is held:
                del self.held[bucket]
                BUCKETS_HELD.set(len(self.held))
                log.info("gave back bucket %d", bucket)
            return
        sent = time.monotonic()
        body = {**held.lease, "spec": {**held.lease["spec"], "renewTime": _micro_time()}}
        try:
            result = await self._write(body, create=False)
        except (Conflict, Gone):
            self._lose(bucket, "its Lease was changed by someone else")
            return
        except Exception as exc:
            self._warn(f"renew-{bucket}", f"could not renew bucket {bucket}: {exc}")
            return
        self._warned.discard(f"renew-{bucket}")
        if self.held.get(bucket) is held:
            held.lease, held.renewed = result, sent

    async def _renew_own(self) -> None:
        try:
            if self.own is None:
                self.own = await self._write(
                    self._lease(REPLICA_PREFIX + self.me, holder=self.me), create=True
                )
            else:
                body = {**self.own, "spec": {**self.own["spec"], "renewTime": _micro_time()}}
                self.own = await self._write(body, create=False)
        except (Conflict, Gone):
            self.own = None  # made again (or read back from the next list)
        except Exception as exc:
            self._warn("own", f"could not renew this replica's Lease: {exc}")

    async def _take(self, bucket: int) -> None:
        before = self.seen.get(bucket)
        sent = time.monotonic()
        name = f"{BUCKET_PREFIX}{bucket}"
        try:
            if before is None:
                result = await self._write(self._lease(name, holder=self.me), create=True)
            else:
                lease = self._lease(name, holder=self.me)
                lease["metadata"]["resourceVersion"] = before.version  # unchanged since seen
                lease["spec"]["leaseTransitions"] = 0  # (only a count kept for people)
                result = await self._write(lease, create=False)
        except Conflict:
            return  # another replica was first, or the holder renewed after all
        except Exception as exc:
            self._warn(f"take-{bucket}", f"could not take bucket {bucket}: {exc}")
            return
        self.held[bucket] = Held(lease=result, renewed=sent)
        BUCKETS_HELD.set(len(self.held))
        previous = f"from {before.holder} (expired)" if before and before.holder else "(free)"
        log.info("took bucket %d %s", bucket, previous)
        self.on_take(bucket)

    def _give_back(self, bucket: int) -> None:
        held = self.held[bucket]
        held.draining = True
        log.info("giving back bucket %d (beyond its share): stopping its writers", bucket)

        async def drain() -> None:
            await self.on_lose(bucket, 2 * self.timing.lease_s)
            held.drained = True

        task = asyncio.get_running_loop().create_task(drain())
        self._losing.add(task)
        task.add_done_callback(self._losing.discard)

    def _warn(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning("%s", message)
