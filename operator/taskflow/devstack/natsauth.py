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
VIEWER_USER = "taskflow-viewer"


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


def service_permissions(*service_ids: str) -> dict[str, object]:
    own = [subject for s in service_ids for subject in (f"{s}.>", f"taskflow.cancel.{s}")]
    return {
        # Nothing but answers: no allow list would mean "everything".
        "publish": {"deny": [">"]},
        "subscribe": {"allow": [*own, "$SRV.>", "_INBOX.>"]},
        "allow_responses": {"max": 1, "expires": "10m"},
    }


def viewer_permissions() -> dict[str, object]:
    """Replays a flow's events (an ordered consumer on TASKFLOW_EVENTS), nothing more."""
    return {
        "publish": {"allow": ["$JS.API.INFO", "$JS.API.STREAM.NAMES",
                              "$JS.API.STREAM.INFO.TASKFLOW_EVENTS",
                              "$JS.API.CONSUMER.CREATE.TASKFLOW_EVENTS",
                              "$JS.API.CONSUMER.CREATE.TASKFLOW_EVENTS.>",
                              "$JS.API.CONSUMER.DELETE.TASKFLOW_EVENTS.>", "$JS.FC.>"]},
        "subscribe": {"allow": ["taskflow.events.>", "_INBOX.>"]},
    }


@dataclass(frozen=True)
class NatsAuth:
    """Users of the ``TASKFLOW`` account, each with a generated password: the operator, a
    viewer, and service users, each serving the service ids it is given."""

    services: dict[str, tuple[str, ...]] = field(default_factory=dict)
    passwords: dict[str, str] = field(default_factory=dict)

    @classmethod
    def make(cls, *, services: tuple[str, ...] = (),
             users: dict[str, tuple[str, ...]] | None = None) -> NatsAuth:
        """``services``: one user ``svc-<id>`` each; ``users``: more, by name."""
        by_user = {f"svc-{s}": (s,) for s in services} | (users or {})
        names = (OPERATOR_USER, VIEWER_USER, *by_user)
        return cls(services=by_user, passwords={u: secrets.token_hex(16) for u in names})

    def url(self, base: str, user: str) -> str:
        """``base`` (nats://127.0.0.1:port) with ``user``'s credentials in it."""
        scheme, _, rest = base.partition("://")
        return f"{scheme}://{user}:{self.passwords[user]}@{rest}"

    def config(self) -> str:
        """The ``accounts`` block of nats-server.conf (JSON is valid NATS configuration)."""
        users: list[dict[str, object]] = [
            {"user": OPERATOR_USER, "password": self.passwords[OPERATOR_USER],
             "permissions": operator_permissions()},
            {"user": VIEWER_USER, "password": self.passwords[VIEWER_USER],
             "permissions": viewer_permissions()},
        ]
        users += [{"user": user, "password": self.passwords[user],
                   "permissions": service_permissions(*ids)}
                  for user, ids in self.services.items()]
        accounts = {"TASKFLOW": {"jetstream": "enabled", "users": users}}
        return f"accounts: {json.dumps(accounts, indent=2)}\n"
