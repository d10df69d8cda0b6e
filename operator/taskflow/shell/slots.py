"""Flow control shared by every operator replica: concurrency slots and rates, held in NATS KV.

A task's concurrency key and a service's ``ServiceLimit`` each become a ``Gate`` (a key with a
limit of attempts at once, a rate, or both). Each key is one entry of the KV bucket
``taskflow-slots`` (``wire/slots.py``: its holders with a lease each, the attempts waiting for
it in order of readiness, its token bucket). Taking a slot is a compare-and-set of that entry,
so two replicas never both take the last one; a holder's lease is renewed while its attempt
runs and the slot is given back when the attempt ends.

Restarts: an operator that resumes a running attempt takes its slots again at once (``force``),
and for one lease after it starts it counts every slot held before it as still held, lapsed
or not, so no new attempt starts in the place of one it is about to resume. A slot nobody takes
back (its flow was deleted, its operator is gone for good) is free once that grace ends.

A watch of the bucket keeps a local view, which the engine asks (``admit``) before it decides
to send an attempt, so a throttled task waits without a decision per poll. An attempt held
back is written into the entry as a waiter (once; its place renewed like a lease), and a free
slot goes to the earliest-ready waiter, whichever flow or replica it is; an attempt admitted
counts as a holder here until it takes its slot for real, so two writers asked in the same
moment never both take one free place. Every change of an entry, and the moment a rate's next
token is due, wakes the writers that wait, the longest-waiting first.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from typing import Any

from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, StorageType
from nats.js.errors import KeyWrongLastSequenceError, NotFoundError

from taskflow.api.limits import Gate
from taskflow.wire.slots import Entry

log = logging.getLogger("taskflow.slots")
BUCKET = "taskflow-slots"
# How long an attempt the engine let start counts as holding its slots before it takes them.
PROMISE_S = 10.0


# A change of one entry: the new entry, or None to refuse (no slot, no token).
_Change = Callable[[Entry], Entry | None]


def _entry(key: str) -> str:
    return "k" + hashlib.sha256(key.encode()).hexdigest()[:40]


class Slots:
    def __init__(self, js: JetStreamContext, *, lease_s: float = 30.0) -> None:
        self.js = js
        self.lease_s = lease_s
        self._kv: Any = None
        self._view: dict[str, Entry] = {}  # entry name -> the entry as last seen
        self._held: dict[str, tuple[Gate, ...]] = {}  # holder -> the gates it holds (ours)
        self._waiting: dict[str, tuple[tuple[Gate, ...], float]] = {}  # holder -> gates, ready
        self._promised: dict[str, tuple[tuple[Gate, ...], float]] = {}  # admitted, not sent
        # Changes of each key waiting to be written together (see _update).
        self._pending: dict[
            str, list[tuple[Callable[[Entry], Entry | None], asyncio.Future[bool]]]
        ] = {}
        self._flushing: set[str] = set()
        self._timers: dict[str, asyncio.TimerHandle] = {}  # entry -> wake for its next token
        self._tasks: list[asyncio.Task[None]] = []
        self._background: set[asyncio.Task[Any]] = set()
        self.on_change: Callable[[], None] | None = None
        # For one lease after this operator starts, slots held before it stay held even if
        # their leases lapsed during the restart: the attempts it resumes take them again
        # (and those nobody takes back are free once the grace ends).
        self.grace_until = 0.0

    async def start(self) -> None:
        self.grace_until = time.time() + self.lease_s
        try:
            self._kv = await self.js.key_value(BUCKET)
        except Exception:
            self._kv = await self.js.create_key_value(
                KeyValueConfig(bucket=BUCKET, history=1, storage=StorageType.FILE)
            )
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._watch()), loop.create_task(self._renew())]

    # -- the local view ----------------------------------------------------------------------

    def admit(self, gates: Sequence[Gate], holder: str) -> bool:
        """Whether ``holder`` may start now by the local view of every gate. When it may not,
        it is written in as a waiter (its place in line is the time it was first held back),
        and a wake is set for a rate's next token."""
        now = time.time()
        blocked = [
            g for g in gates if not self._view.get(_entry(g.key), Entry()).admits(g, holder, now)
        ]
        if not blocked:
            # Until it is sent (and takes its slots for real), count it as a holder here, so
            # the next writer asked in this same moment does not take its place too.
            self._promised[holder] = (tuple(gates), now + PROMISE_S)
            return True
        if holder not in self._waiting:
            self._waiting[holder] = (tuple(gates), now)
            self._spawn(self._enqueue(holder))
        for gate in blocked:
            self._wake_for_token(gate, holder, now)
        return False

    def _seen(self, gate: Gate) -> Entry:
        return self._view.get(_entry(gate.key)) or Entry()

    def _local(self, gate: Gate, now: float) -> Entry:
        """The entry as this operator must see it: the bucket's, with the attempts it let
        start but that have not taken their slots yet."""
        entry = self._graced(self._seen(gate), now)
        promised = {
            h: until
            for h, (gates, until) in self._promised.items()
            if until > now and any(g.key == gate.key for g in gates)
        }
        if not promised:
            return entry
        return replace(
            entry,
            holders={**entry.holders, **promised},
            waiters={h: w for h, w in entry.waiters.items() if h not in promised},
        )

    def _graced(self, entry: Entry, now: float) -> Entry:
        if now >= self.grace_until or not entry.holders:
            return entry
        until = self.grace_until
        return replace(entry, holders={h: max(e, until) for h, e in entry.holders.items()})

    def _wake_for_token(self, gate: Gate, holder: str, now: float) -> None:
        name = _entry(gate.key)
        due = self._seen(gate).next_token(gate, holder, now)
        if due is None or name in self._timers or self.on_change is None:
            return
        loop = asyncio.get_running_loop()

        def wake() -> None:
            self._timers.pop(name, None)
            if self.on_change is not None:
                self.on_change()

        self._timers[name] = loop.call_later(max(0.01, due - now), wake)

    async def _watch(self) -> None:
        while True:
            try:
                watcher = await self._kv.watchall()
                async for item in watcher:
                    if item is None:
                        continue  # (the end of the initial values)
                    self._view[item.key] = Entry.decode(item.value)
                    if self.on_change is not None:
                        self.on_change()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # NATS away: watch again
                log.debug("slots watch ended: %s", exc)
                await asyncio.sleep(1.0)

    # -- taking, waiting, renewing, giving back ----------------------------------------------

    async def acquire(self, gates: Sequence[Gate], holder: str, *, force: bool = False) -> bool:
        """Take a slot (and a token) of every gate for ``holder``, or none of them. ``force``:
        the attempt runs already (resumed after a restart): it holds them whatever the limit."""
        self._promised.pop(holder, None)
        taken: list[Gate] = []
        for gate in gates:
            now = time.time()
            ok = await self._update(gate.key, self._take_of(gate, holder, force=force))
            if not ok:
                for done in taken:
                    await self._update(done.key, self._release_of(holder))
                self._wake_for_token(gate, holder, now)
                return False
            taken.append(gate)
        self._waiting.pop(holder, None)
        limited = tuple(g for g in gates if g.limit is not None)  # (a rate holds nothing)
        if limited:
            self._held[holder] = limited
        return True

    def holds(self, holder: str) -> bool:
        return holder in self._held

    async def release(self, holder: str) -> None:
        for gate in self._held.pop(holder, ()):
            await self._update(gate.key, self._release_of(holder))

    def waiting_of(self, prefix: str) -> set[str]:
        return {h for h in self._waiting if h.startswith(prefix)}

    def withdraw(self, holders: Iterable[str]) -> None:
        """These attempts no longer wait (cancelled, skipped, their flow gone): give up their
        places, so the waiters behind them are not held up until the places lapse."""
        now = time.time()
        for holder in list(holders):
            if self._promised.get(holder, ((), 0.0))[1] > now:
                continue  # being sent: it leaves the line as it takes its slot
            entry = self._waiting.pop(holder, None)
            for gate in entry[0] if entry is not None else ():
                # (its place only: it may be taking a slot right now, as it is sent)
                self._spawn(self._update(gate.key, self._leave_of(holder)))

    def _take_of(self, gate: Gate, holder: str, *, force: bool) -> Callable[[Entry], Entry | None]:
        lease = self.lease_s

        def take(entry: Entry) -> Entry | None:
            now = time.time()
            return self._graced(entry, now).take(gate, holder, now=now, lease=lease, force=force)

        return take

    def _renew_of(self, holder: str) -> Callable[[Entry], Entry]:
        lease = self.lease_s
        return lambda entry: entry.renew(holder, now=time.time(), lease=lease)

    @staticmethod
    def _leave_of(holder: str) -> Callable[[Entry], Entry]:
        return lambda entry: entry.leave(holder, now=time.time())

    @staticmethod
    def _release_of(holder: str) -> Callable[[Entry], Entry]:
        return lambda entry: entry.release(holder, now=time.time())

    async def _enqueue(self, holder: str) -> None:
        waiting = self._waiting.get(holder)
        if waiting is None:
            return
        gates, ready = waiting
        for gate in gates:
            await self._update(
                gate.key, lambda e: e.wait(holder, ready=ready, now=time.time(), lease=self.lease_s)
            )

    async def _update(self, key: str, change: _Change) -> bool:
        """Apply ``change`` to the key's entry; False when it refused (e.g. no free slot).

        The changes waiting for one key are applied together, in order, in one read and one
        compare-and-set: many attempts of this operator starting or ending under the same key
        at once cost one write, and only other replicas' writes make it read again."""
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._pending.setdefault(key, []).append((change, future))
        if key not in self._flushing:
            self._flushing.add(key)
            self._spawn(self._flush(key))
        return await future

    async def _flush(self, key: str) -> None:
        try:
            while self._pending.get(key):
                batch = self._pending.pop(key)
                try:
                    results = await self._apply(key, [change for change, _ in batch])
                except Exception as exc:
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                for (_, future), ok in zip(batch, results, strict=True):
                    if not future.done():
                        future.set_result(ok)
        finally:
            self._flushing.discard(key)

    async def _apply(self, key: str, changes: list[_Change]) -> list[bool]:
        name = _entry(key)
        for attempt in range(50):
            try:
                item = await self._kv.get(name)
                revision: int | None = item.revision
                entry = Entry.decode(item.value)
            except NotFoundError:
                revision, entry = None, Entry()
            results = []
            new = entry
            for change in changes:
                changed = change(new)
                results.append(changed is not None)
                new = changed if changed is not None else new
            if not any(results):
                return results
            try:
                if revision is None:
                    await self._kv.create(name, new.encode(key))
                else:
                    await self._kv.update(name, new.encode(key), last=revision)
                self._view[name] = new
                return results
            except (KeyWrongLastSequenceError, Exception) as exc:  # raced: read again
                if (
                    not isinstance(exc, KeyWrongLastSequenceError)
                    and "wrong last" not in str(exc).lower()
                    and "exists" not in str(exc).lower()
                ):
                    raise
                # Another replica wrote it meanwhile: again, after a pause that grows a little
                # and differs per replica, so two busy replicas do not keep colliding.
                await asyncio.sleep(min(0.2, 0.005 * (attempt + 1)) * (0.5 + random.random()))
        return [False] * len(changes)

    async def _renew(self) -> None:
        while True:
            await asyncio.sleep(self.lease_s / 3)
            now = time.time()
            for holder in [h for h, (_, until) in self._promised.items() if until <= now]:
                del self._promised[holder]  # (admitted, never sent: the decision was not kept)
            renewals = [*self._held.items(), *((h, w[0]) for h, w in self._waiting.items())]
            for holder, gates in renewals:
                for gate in gates:
                    with contextlib.suppress(Exception):
                        await self._update(gate.key, self._renew_of(holder))
            # A lease that lapsed (its operator died) changes nothing in the bucket: the
            # writers that wait look again this often.
            if self.on_change is not None:
                self.on_change()

    def _spawn(self, coro: Any) -> None:
        async def run() -> None:
            with contextlib.suppress(Exception):
                await coro

        task = asyncio.get_running_loop().create_task(run())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def close(self) -> None:
        for timer in self._timers.values():
            timer.cancel()
        for task in [*self._tasks, *self._background]:
            task.cancel()
        for task in [*self._tasks, *self._background]:
            with contextlib.suppress(BaseException):
                await task
