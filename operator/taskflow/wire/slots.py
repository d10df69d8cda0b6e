"""One entry of the flow-control bucket (NATS KV ``taskflow-slots``): who holds a key's slots,
who waits for one and since when, and for a rate its token bucket.

Every operator replica reads and compare-and-sets these entries (``shell/slots.py``), so the
rules are here, pure, and the same for all of them:

- ``holders``: attempts running under the key, each with a lease expiry; at most ``limit``.
- ``waiters``: attempts ready to start but held back, each with the time it became ready and a
  lease. A free slot (or token) goes to the earliest-ready waiter first, whichever replica or
  flow it belongs to, so a busy key serves its waiters in order and none starves.
- ``tokens`` and ``at``: for a rate (``ratePerSecond``, ``burst``), the tokens left at ``at``;
  they refill continuously up to ``burst``, and each start takes one.

A lease not renewed lapses (its operator died): the holder's slot, or the waiter's place, is
free again. Times are epoch seconds. Decoding never raises: an entry that is not one is empty.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from typing import Any

from taskflow.api.limits import Gate

# An entry holds at most this many waiters (the earliest-ready); later ones wait unranked.
MAX_WAITERS = 1000
MAX_ENTRY_BYTES = 512 * 1024


@dataclass(frozen=True, slots=True)
class Entry:
    holders: dict[str, float] = field(default_factory=dict)  # holder -> lease expiry
    waiters: dict[str, tuple[float, float]] = field(default_factory=dict)  # -> (ready, expiry)
    tokens: float | None = None
    at: float | None = None

    # -- encoding ----------------------------------------------------------------------------

    def encode(self, key: str) -> bytes:
        body: dict[str, Any] = {"key": key[:256], "holders": self.holders}
        if self.waiters:
            body["waiters"] = {h: list(w) for h, w in self.waiters.items()}
        if self.tokens is not None:
            body["tokens"], body["at"] = self.tokens, self.at
        return json.dumps(body, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, data: bytes | None) -> Entry:
        if not data or len(data) > MAX_ENTRY_BYTES:
            return cls()
        try:
            value = json.loads(data)
            holders = {str(h): float(e) for h, e in (value.get("holders") or {}).items()}
            waiters = {
                str(h): (float(w[0]), float(w[1])) for h, w in (value.get("waiters") or {}).items()
            }
            tokens = value.get("tokens")
            at = value.get("at")
            return cls(
                holders=holders,
                waiters=waiters,
                tokens=float(tokens) if tokens is not None else None,
                at=float(at) if at is not None else None,
            )
        except (ValueError, TypeError, AttributeError, IndexError, KeyError, RecursionError):
            return cls()

    # -- reading -----------------------------------------------------------------------------

    def live(self, now: float) -> Entry:
        """Without the lapsed leases."""
        return replace(
            self,
            holders={h: e for h, e in self.holders.items() if e > now},
            waiters={h: w for h, w in self.waiters.items() if w[1] > now},
        )

    def tokens_at(self, gate: Gate, now: float) -> float:
        if gate.rate is None:
            return math.inf
        if self.tokens is None or self.at is None:
            return float(gate.burst)
        return min(float(gate.burst), self.tokens + max(0.0, now - self.at) * gate.rate)

    def rank(self, holder: str) -> int:
        """How many waiters became ready before ``holder`` (all of them, if it is not one)."""
        if holder not in self.waiters:
            return len(self.waiters)
        mine = (self.waiters[holder][0], holder)
        return sum(1 for h, w in self.waiters.items() if (w[0], h) < mine)

    def admits(self, gate: Gate, holder: str, now: float) -> bool:
        """Whether ``holder`` may start now: it holds a slot already, or there is a free slot
        (and token) for it once every waiter ready before it has had one."""
        entry = self.live(now)
        if holder in entry.holders:
            return True
        ahead = entry.rank(holder)
        if gate.limit is not None and len(entry.holders) + ahead >= gate.limit:
            return False
        return entry.tokens_at(gate, now) >= ahead + 1

    def next_token(self, gate: Gate, holder: str, now: float) -> float | None:
        """When, at the earliest, a token is there for ``holder`` (None: no rate)."""
        if gate.rate is None:
            return None
        need = self.live(now).rank(holder) + 1 - self.tokens_at(gate, now)
        return now if need <= 0 else now + need / gate.rate

    # -- changing ----------------------------------------------------------------------------

    def take(
        self, gate: Gate, holder: str, *, now: float, lease: float, force: bool = False
    ) -> Entry | None:
        """The entry with ``holder`` started (its lease renewed if it holds one already), or
        None when it may not start. ``force``: it runs already (an operator resuming it): it
        holds a slot whatever the limit, and takes no token."""
        entry = self.live(now)
        renewing = holder in entry.holders
        if not (force or renewing or entry.admits(gate, holder, now)):
            return None
        tokens, at = entry.tokens, entry.at
        if gate.rate is not None and not (force or renewing):
            tokens, at = entry.tokens_at(gate, now) - 1, now
        holders = dict(entry.holders)
        if gate.limit is not None:
            holders[holder] = now + lease
        waiters = {h: w for h, w in entry.waiters.items() if h != holder}
        return Entry(holders=holders, waiters=waiters, tokens=tokens, at=at)

    def wait(self, holder: str, *, ready: float, now: float, lease: float) -> Entry:
        """The entry with ``holder`` waiting since ``ready`` (its place kept, lease renewed)."""
        entry = self.live(now)
        if holder in entry.holders:
            return entry
        since = entry.waiters.get(holder, (ready, 0.0))[0]
        waiters = {**entry.waiters, holder: (since, now + lease)}
        if len(waiters) > MAX_WAITERS:  # keep the earliest-ready; the rest wait unranked
            kept = sorted(waiters.items(), key=lambda item: (item[1][0], item[0]))[:MAX_WAITERS]
            waiters = dict(kept)
        return replace(entry, waiters=waiters)

    def renew(self, holder: str, *, now: float, lease: float) -> Entry:
        entry = self.live(now)
        holders = dict(entry.holders)
        waiters = dict(entry.waiters)
        if holder in holders:
            holders[holder] = now + lease
        if holder in waiters:
            waiters[holder] = (waiters[holder][0], now + lease)
        return replace(entry, holders=holders, waiters=waiters)

    def leave(self, holder: str, *, now: float) -> Entry:
        """The entry with ``holder`` no longer waiting (a slot it holds stays held)."""
        entry = self.live(now)
        return replace(entry, waiters={h: w for h, w in entry.waiters.items() if h != holder})

    def release(self, holder: str, *, now: float) -> Entry:
        entry = self.live(now)
        return replace(
            entry,
            holders={h: e for h, e in entry.holders.items() if h != holder},
            waiters={h: w for h, w in entry.waiters.items() if h != holder},
        )


__all__ = ["MAX_WAITERS", "Entry", "Gate"]
