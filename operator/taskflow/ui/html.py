"""HTML without a template engine: every value escaped unless it is ``Markup`` already.

The pages are small f-strings; ``h`` escapes whatever comes from a flow (names, params,
responses, errors are the users' and the services' text), ``Markup`` marks what was built here,
and ``join`` concatenates fragments. The formatting of times, ages and durations lives here
too, so every page says them the same way (and the tests can check them without a server).
"""

from __future__ import annotations

import html
import json
import time
from collections.abc import Iterable
from typing import Any

from taskflow.engine.clock import parse_iso

# A response or params beyond this is cut in the page (the whole is in kubectl's output).
MAX_JSON_CHARS = 64 * 1024


class Markup(str):
    """Text that is HTML already (built here from escaped parts): never escaped again."""

    __slots__ = ()


def h(value: Any) -> Markup:
    """``value`` as HTML text: escaped (quotes too, so it is safe in attributes)."""
    if isinstance(value, Markup):
        return value
    return Markup(html.escape("" if value is None else str(value), quote=True))


def join(parts: Iterable[Any], sep: str = "") -> Markup:
    return Markup(sep.join(h(p) for p in parts))


def attrs(**values: Any) -> Markup:
    """``name="value"`` pairs (``class_`` for class; None and False are left out)."""
    out = []
    for name, value in values.items():
        if value is None or value is False:
            continue
        key = name.rstrip("_").replace("_", "-")
        out.append(key if value is True else f'{key}="{h(value)}"')
    return Markup(" ".join(out))


def pretty_json(value: Any, *, limit: int = MAX_JSON_CHARS) -> str:
    """Indented JSON of ``value``, cut at ``limit`` characters (and saying so)."""
    try:
        text = json.dumps(value, indent=2, ensure_ascii=False, default=str)
    except (TypeError, ValueError):
        text = repr(value)
    if len(text) > limit:
        text = text[:limit] + f"\n… cut at {limit} characters ({len(text)} in all)"
    return text


def json_block(value: Any, *, label: str) -> Markup:
    """A labelled, scrollable, keyboard-reachable ``<pre>`` of ``value`` as JSON."""
    return Markup(
        f'<pre class="json" tabindex="0" aria-label="{h(label)}"><code>'
        f"{h(pretty_json(value))}</code></pre>"
    )


def now_ms() -> int:
    return int(time.time() * 1000)


def _ms(timestamp: str | None) -> int | None:
    if not timestamp:
        return None
    try:
        return parse_iso(timestamp)
    except ValueError:
        return None


def age(timestamp: str | None, *, now: int | None = None) -> str:
    """kubectl's AGE: ``45s``, ``12m``, ``3h``, ``2d`` (``""`` when unknown)."""
    start = _ms(timestamp)
    if start is None:
        return ""
    seconds = max(0, ((now if now is not None else now_ms()) - start) // 1000)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m"
    if seconds < 86400:
        return f"{seconds // 3600}h"
    return f"{seconds // 86400}d"


def between(start: str | None, end: str | None) -> int | None:
    """Milliseconds from ``start`` to ``end`` (None when either is missing)."""
    a, b = _ms(start), _ms(end)
    return None if a is None or b is None else max(0, b - a)


def clock(ms: int | None) -> str:
    """An event's time as ``HH:MM:SS.mmm`` UTC."""
    if ms is None:
        return ""
    return time.strftime("%H:%M:%S", time.gmtime(ms / 1000)) + f".{ms % 1000:03d}"


def iso(ms: int | None) -> str:
    if ms is None:
        return ""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms / 1000)) + f".{ms % 1000:03d}Z"
