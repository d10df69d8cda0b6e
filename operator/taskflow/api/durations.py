"""Durations as users write them: integer milliseconds (as the seed does) or Go-style strings.

Headers and events always carry milliseconds; only the spec accepts strings.
"""

from __future__ import annotations

import re

_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000}
# Anchored so that "10" (no unit) and "1.5s" are refused: the CRD uses the same pattern.
DURATION_PATTERN = r"^([0-9]+(ms|s|m|h))+$"
_PART = re.compile(r"([0-9]+)(ms|s|m|h)")
_WHOLE = re.compile(DURATION_PATTERN)


def parse_duration_ms(value: int | str) -> int:
    """Return a duration in milliseconds; raise ValueError naming the bad value."""
    if isinstance(value, bool):
        raise ValueError(f"duration must be milliseconds or a string like '90s', got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"duration must not be negative, got {value}")
        return value
    if not _WHOLE.match(value):
        raise ValueError(f"duration {value!r} is not like '500ms', '90s', '1m30s' or '2h'")
    return sum(int(n) * _UNIT_MS[unit] for n, unit in _PART.findall(value))


def format_ms(ms: int) -> str:
    """Format milliseconds the way ``kubectl`` users read them (``1m30s``, ``250ms``)."""
    if ms < 1000:
        return f"{ms}ms"
    parts = []
    for unit, size in (("h", 3_600_000), ("m", 60_000), ("s", 1000), ("ms", 1)):
        n, ms = divmod(ms, size)
        if n:
            parts.append(f"{n}{unit}")
    return "".join(parts)


def human_ms(ms: int | None) -> str:
    """A duration as people glance at it: ``850ms``, ``1.2s``, ``3m4s``, ``2h5m`` (``""`` when
    unknown). The plugin's tree and the web view both print it so."""
    if ms is None:
        return ""
    if ms < 1000:
        return f"{ms}ms"
    if ms < 60_000:
        return f"{ms / 1000:.1f}s"
    seconds = ms // 1000
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60}s"
    return f"{seconds // 3600}h{(seconds % 3600) // 60}m"
