"""NATS users and permissions for the operator and its services: least privilege, as
docs/security.md ships them, for the dev stack's auth mode and the tests that check them.

One account holds the operator, its streams and the services. The operator may publish
requests, events, cancel notices and its own JetStream traffic, and read replies. A service
may read its own requests and cancel notices and may publish nothing but answers to requests
it received (``allow_responses``): not another attempt's reply, not the journal, not the NATS
API. JetStream captures answers on ``taskflow.reply.>`` like any other message.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field

OPERATOR_USER = "taskflow-operator"


def operator_permissions(*, request_subjects: str = "*.*") -> dict[str, object]:
    return {
        "publish": {"allow": [
            request_subjects,  # the service subjects ({serviceId}.{actionName})
            "taskflow.events.>", "taskflow.cancel.>",
            "$SRV.INFO",  # which services answer a repeated attempt from a cache
            "$JS.API.>",  # its streams, buckets and object store: created, read, purged
            "$KV.taskflow-journal.>", "$KV.taskflow-keys.>", "$O.taskflow-responses.>",
            "_INBOX.>",
        ]},
        "subscribe": {"allow": ["taskflow.reply.>", "taskflow.api.>", "_INBOX.>"]},
    }


def service_permissions(service_id: str) -> dict[str, object]:
    return {
        # Nothing but answers: no allow list would mean "everything".
        "publish": {"deny": [">"]},
        "subscribe": {"allow": [f"{service_id}.>", f"taskflow.cancel.{service_id}", "$SRV.>",
                                "_INBOX.>"]},
        "allow_responses": {"max": 1, "expires": "10m"},
    }


@dataclass(frozen=True)
class NatsAuth:
    """Users of the ``TASKFLOW`` account, each with a generated password."""

    services: tuple[str, ...] = ()
    passwords: dict[str, str] = field(default_factory=dict)

    @classmethod
    def make(cls, *, services: tuple[str, ...]) -> NatsAuth:
        users = (OPERATOR_USER, *(f"svc-{s}" for s in services))
        return cls(services=services, passwords={u: secrets.token_hex(16) for u in users})

    def url(self, base: str, user: str) -> str:
        """``base`` (nats://127.0.0.1:port) with ``user``'s credentials in it."""
        scheme, _, rest = base.partition("://")
        return f"{scheme}://{user}:{self.passwords[user]}@{rest}"

    def config(self) -> str:
        """The ``accounts`` block of nats-server.conf (JSON is valid NATS configuration)."""
        users: list[dict[str, object]] = [{
            "user": OPERATOR_USER, "password": self.passwords[OPERATOR_USER],
            "permissions": operator_permissions(),
        }]
        users += [{"user": f"svc-{s}", "password": self.passwords[f"svc-{s}"],
                   "permissions": service_permissions(s)} for s in self.services]
        accounts = {"TASKFLOW": {"jetstream": "enabled", "users": users}}
        return f"accounts: {json.dumps(accounts, indent=2)}\n"
