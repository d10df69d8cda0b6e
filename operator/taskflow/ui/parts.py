"""The small pieces every page uses: who is looking (``Viewer``), the list's filters, status
badges and the links to a flow and a task."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode

from taskflow.api.status import FlowPhase, Status
from taskflow.ui.html import (
    Markup,
    h,
    join,
)

PHASES = tuple(str(p) for p in FlowPhase)
STATUSES = frozenset(str(s) for s in Status) | frozenset(PHASES)
MAX_QUERY = 253


@dataclass(frozen=True, slots=True)
class Viewer:
    """Who looks at a page: signed in or not, and whether retry and cancel are theirs to use
    on the page's flow (``why_not`` says why not, for the read-only notice)."""

    csrf: str
    username: str | None = None
    may_act: bool = False
    why_not: str = "Sign in with a Kubernetes token to retry or cancel."


@dataclass(frozen=True, slots=True)
class Filters:
    """The list's filters, from the query string (also the SSE stream's)."""

    namespace: str = ""
    phase: str = ""
    q: str = ""

    @classmethod
    def from_query(cls, query: Mapping[str, str]) -> Filters:
        phase = str(query.get("phase", "")).strip().upper()
        return cls(
            namespace=str(query.get("namespace", "")).strip()[:MAX_QUERY],
            phase=phase if phase in PHASES else "",
            q=str(query.get("q", "")).strip()[:MAX_QUERY],
        )

    def matches(self, body: Mapping[str, Any]) -> bool:
        meta = body.get("metadata") or {}
        if self.namespace and meta.get("namespace") != self.namespace:
            return False
        if self.phase and ((body.get("status") or {}).get("phase") or "PENDING") != self.phase:
            return False
        return not self.q or self.q.lower() in str(meta.get("name") or "").lower()

    def query(self) -> str:
        pairs = {"namespace": self.namespace, "phase": self.phase, "q": self.q}
        return urlencode({k: v for k, v in pairs.items() if v})


def status_class(value: Any) -> str:
    return f"st-{value}" if value in STATUSES else "st-UNKNOWN"


def badge(value: Any) -> Markup:
    text = str(value or "UNKNOWN")
    return Markup(f'<span class="badge {status_class(text)}">{h(text.replace("_", " "))}</span>')


def flow_path(namespace: str, name: str, suffix: str = "") -> str:
    return f"/flows/{quote(namespace, safe='')}/{quote(name, safe='')}{suffix}"


def task_href(namespace: str, name: str, stage: str, task: str) -> str:
    return flow_path(namespace, name) + "?" + urlencode({"task": f"{stage}/{task}"}) + "#task"


# -- a flow ------------------------------------------------------------------------------------


def fact_list(pairs: Sequence[tuple[str, Any]]) -> Markup:
    rows = join(
        Markup(f"<div><dt>{h(k)}</dt><dd>{h(v)}</dd></div>")
        for k, v in pairs
        if v not in (None, "")
    )
    return Markup(f'<dl class="facts">{rows}</dl>')


def children_links(children: Sequence[Mapping[str, Any]], *, label: str) -> Markup:
    if not children:
        return Markup("")
    items = join(
        Markup(
            f'<li><a href="{h(flow_path(str(c.get("namespace")), str(c.get("name"))))}">'
            f"{h(c.get('name'))}</a> {badge(c.get('phase'))}"
            + (
                f' <span class="muted">attempt {h(c["parentAttempt"])}</span>'
                if c.get("parentAttempt")
                else ""
            )
            + "</li>"
        )
        for c in children
    )
    return Markup(f'<ul class="children" aria-label="{h(label)}">{items}</ul>')
