"""Signed-in sessions and CSRF tokens, kept in the view's memory.

A user signs in with a Kubernetes bearer token; the token stays here, on the server, and the
browser gets a random session id (an HttpOnly, SameSite=Strict cookie), so the token is never
in a page, a cookie jar or a log. Every form that changes something carries a CSRF token: the
session's own when signed in, else (the sign-in form) a random one that must equal the visitor's
CSRF cookie (double submit). Sessions end when signed out, after ``TTL_S``, or when the view
restarts; the biggest number kept is bounded.
"""

from __future__ import annotations

import hmac
import secrets
import time
from dataclasses import dataclass, field

SESSION_COOKIE = "taskflow_ui_session"
CSRF_COOKIE = "taskflow_ui_csrf"
TTL_S = 8 * 3600
MAX_SESSIONS = 10_000


def new_secret() -> str:
    return secrets.token_urlsafe(32)


def same(a: str | None, b: str | None) -> bool:
    """Constant-time equality of two secrets (False when either is missing)."""
    return bool(a) and bool(b) and hmac.compare_digest(str(a), str(b))


@dataclass(slots=True)
class Session:
    id: str = field(repr=False)
    token: str = field(repr=False)
    username: str
    csrf: str = field(repr=False)
    expires: float
    # One-time messages for the next page: (kind, text), kind "ok" or "error".
    flash: list[tuple[str, str]] = field(default_factory=list)

    def take_flash(self) -> list[tuple[str, str]]:
        messages, self.flash = self.flash, []
        return messages


class Sessions:
    """Session id -> ``Session``; ids and CSRF tokens are 256-bit random strings."""

    def __init__(self, *, ttl_s: float = TTL_S) -> None:
        self.ttl_s = ttl_s
        self._by_id: dict[str, Session] = {}

    def create(self, *, token: str, username: str) -> Session:
        self._expire()
        if len(self._by_id) >= MAX_SESSIONS:  # the oldest go first
            for old in list(self._by_id)[: MAX_SESSIONS // 10]:
                del self._by_id[old]
        session = Session(
            id=new_secret(),
            token=token,
            username=username,
            csrf=new_secret(),
            expires=time.monotonic() + self.ttl_s,
        )
        self._by_id[session.id] = session
        return session

    def get(self, session_id: str | None) -> Session | None:
        if not session_id:
            return None
        session = self._by_id.get(session_id)
        if session is None:
            return None
        if session.expires <= time.monotonic():
            del self._by_id[session_id]
            return None
        return session

    def drop(self, session_id: str | None) -> None:
        if session_id:
            self._by_id.pop(session_id, None)

    def __len__(self) -> int:
        return len(self._by_id)

    def _expire(self) -> None:
        now = time.monotonic()
        for sid in [s for s, v in self._by_id.items() if v.expires <= now]:
            del self._by_id[sid]
