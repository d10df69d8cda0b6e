"""Epoch milliseconds <-> the RFC 3339 strings kept in status."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)


def iso(ms: int) -> str:
    return (_EPOCH + ms * _MS).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_iso(value: str) -> int:
    # Integer arithmetic: ``timestamp() * 1000`` is a float, and int() of 256.229 * 1000
    # (256228.99999999997) is one millisecond early.
    moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    if moment.tzinfo is None:
        moment = moment.astimezone(UTC)  # (as timestamp() reads a naive time: local time)
    return (moment - _EPOCH) // _MS
