"""NATS subjects the operator uses. Every token that comes from users is NATS-token-safe
(the CRD's patterns), so no user input can add a wildcard or a level.

A reply subject ends with a token only the operator can compute (an HMAC of the attempt under
its key), carried by the dispatched request alone: whoever sees a flow's events, status or
logs still cannot answer for a service, and a message on any other reply subject is ignored.
The token is derived, not stored, so a restarted operator finds an attempt's reply again.
"""

from __future__ import annotations

import hashlib
import hmac
import string
from dataclasses import dataclass, field

DEFAULT_TEMPLATE = "{serviceId}.{actionName}"


@dataclass(frozen=True, slots=True)
class Subjects:
    # Where a task's request goes; {serviceId}, {actionName} and {namespace} (the flow's: a
    # DNS label, so one NATS token) are filled in.
    template: str = DEFAULT_TEMPLATE
    # Replies come back here; a JetStream stream captures them so they survive a restart.
    reply_prefix: str = "taskflow.reply"
    events_prefix: str = "taskflow.events"
    # A service heartbeats a long attempt here (the subject comes with the request).
    heartbeat_prefix: str = "taskflow.heartbeat"
    cancel_prefix: str = "taskflow.cancel"
    api_prefix: str = "taskflow.api"
    # Signs reply subjects and event ids. None: unsigned (tools and tests of the protocol
    # itself; the operator always has a key).
    key: bytes | None = field(default=None, repr=False)

    def request(self, service_id: str, action_name: str, namespace: str = "*") -> str:
        """A task's request subject; a service that serves every namespace listens on the
        default, ``*``."""
        return self.template.format(
            serviceId=service_id, actionName=action_name, namespace=namespace
        )

    def template_problem(self) -> str | None:
        """What is wrong with the request template, or None."""
        try:
            fields = {f for _, f, _, _ in string.Formatter().parse(self.template) if f is not None}
        except ValueError as exc:
            return f"the subject template is malformed: {exc}"
        if "serviceId" not in fields:
            return "the subject template must contain {serviceId}"
        unknown = fields - {"serviceId", "actionName", "namespace"}
        if unknown:
            return (
                f"the subject template may use {{serviceId}}, {{actionName}} and "
                f"{{namespace}} only, not {', '.join(sorted(unknown))}"
            )
        if any(c in self.template for c in " *>\t"):
            return "the subject template may contain no space or wildcard"
        return None

    def token(self, text: str) -> str:
        """128 bits of HMAC-SHA256 of ``text`` under the key, in hex (a NATS-safe token)."""
        assert self.key is not None
        return hmac.new(self.key, text.encode(), hashlib.sha256).hexdigest()[:32]

    def reply(self, uid: str, stage: str, task: str, attempt: int) -> str:
        subject = f"{self.reply_prefix}.{uid}.{stage}.{task}.{attempt}"
        if self.key is None:
            return subject
        return f"{subject}.{self.token(f'{uid}/{stage}/{task}/{attempt}')}"

    def heartbeat(self, uid: str, stage: str, task: str, attempt: int) -> str:
        """An attempt's heartbeat subject: its own token (a reply subject cannot stand in)."""
        subject = f"{self.heartbeat_prefix}.{uid}.{stage}.{task}.{attempt}"
        if self.key is None:
            return subject
        return f"{subject}.{self.token(f'heartbeat/{uid}/{stage}/{task}/{attempt}')}"

    def parse_heartbeat(self, subject: str) -> tuple[str, str, str, int] | None:
        """(uid, stage, task, attempt) of a heartbeat subject this operator made, or None."""
        return self._parse(subject, self.heartbeat_prefix, "heartbeat/")

    def replies_of(self, uid: str) -> str:
        return f"{self.reply_prefix}.{uid}.>"

    def parse_reply(self, subject: str) -> tuple[str, str, str, int] | None:
        """(uid, stage, task, attempt) of a reply subject, or None if it is not one (with a
        key: not one this operator made)."""
        return self._parse(subject, self.reply_prefix, "")

    def _parse(self, subject: str, prefix: str, purpose: str) -> tuple[str, str, str, int] | None:
        head = prefix + "."
        if not subject.startswith(head):
            return None
        parts = subject[len(head) :].split(".")
        signed = self.key is not None
        if len(parts) != 4 + signed:
            return None
        # ASCII digits only ("²".isdigit() is true, but int() refuses it), and few enough of
        # them for int() (which refuses more than 4,300) and for status (64 bits).
        if not (parts[3].isascii() and parts[3].isdigit()) or len(parts[3]) > 18:
            return None
        uid, stage, task, attempt = parts[0], parts[1], parts[2], int(parts[3])
        if signed and not hmac.compare_digest(
            parts[4], self.token(f"{purpose}{uid}/{stage}/{task}/{attempt}")
        ):
            return None
        return uid, stage, task, attempt

    def event_id(self, uid: str, seq: int) -> str:
        """``Nats-Msg-Id`` of a flow's event: JetStream drops a repeat of it, so with a key it
        cannot be guessed (a forged message cannot take the place of a real event)."""
        if self.key is None:
            return f"{uid}:{seq}"
        return f"{uid}:{seq}:{self.token(f'event/{uid}/{seq}')}"

    def events(self, uid: str) -> str:
        return f"{self.events_prefix}.{uid}"

    def cancel(self, service_id: str) -> str:
        return f"{self.cancel_prefix}.{service_id}"
