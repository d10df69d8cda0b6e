"""NATS subjects the operator uses. Every token that comes from users is NATS-token-safe
(the CRD's patterns), so no user input can add a wildcard or a level."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_TEMPLATE = "{serviceId}.{actionName}"


@dataclass(frozen=True, slots=True)
class Subjects:
    # Where a task's request goes; {serviceId} and {actionName} are filled in.
    template: str = DEFAULT_TEMPLATE
    # Replies come back here; a JetStream stream captures them so they survive a restart.
    reply_prefix: str = "taskflow.reply"
    events_prefix: str = "taskflow.events"
    cancel_prefix: str = "taskflow.cancel"
    api_prefix: str = "taskflow.api"

    def request(self, service_id: str, action_name: str) -> str:
        return self.template.format(serviceId=service_id, actionName=action_name)

    def reply(self, uid: str, stage: str, task: str, attempt: int) -> str:
        return f"{self.reply_prefix}.{uid}.{stage}.{task}.{attempt}"

    def replies_of(self, uid: str) -> str:
        return f"{self.reply_prefix}.{uid}.>"

    def parse_reply(self, subject: str) -> tuple[str, str, str, int] | None:
        """(uid, stage, task, attempt) of a reply subject, or None if it is not one."""
        head = self.reply_prefix + "."
        if not subject.startswith(head):
            return None
        parts = subject[len(head) :].split(".")
        if len(parts) != 4 or not parts[3].isdigit():
            return None
        return parts[0], parts[1], parts[2], int(parts[3])

    def events(self, uid: str) -> str:
        return f"{self.events_prefix}.{uid}"

    def cancel(self, service_id: str) -> str:
        return f"{self.cancel_prefix}.{service_id}"
