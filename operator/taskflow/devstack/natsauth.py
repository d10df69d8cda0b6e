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
        "publish": {
            "allow": [
                request_subjects,  # the service subjects ({serviceId}.{actionName})
                "taskflow.events.>",
                "taskflow.cancel.>",
                "taskflow.history.>",  # a finished flow's final status, before its TTL deletes it
                "$SRV.INFO",  # which services answer a repeated attempt from a cache
                "$JS.API.>",  # its streams, buckets and object store: created, read, purged
                "$KV.taskflow-journal.>",
                "$KV.taskflow-keys.>",
                "$KV.taskflow-slots.>",  # concurrency slots (leases), shared by replicas
                "$O.taskflow-responses.>",
                "_INBOX.>",
            ]
        },
        "subscribe": {
            "allow": ["taskflow.reply.>", "taskflow.heartbeat.>", "taskflow.api.>", "_INBOX.>"]
        },
        # Answers to NATS API calls that came through an account import (_R_.* subjects).
        "allow_responses": True,
    }


def service_permissions(*service_ids: str) -> dict[str, object]:
    own = [subject for s in service_ids for subject in (f"{s}.>", f"taskflow.cancel.{s}")]
    return {
        # Nothing but answers, and heartbeats of long attempts (each attempt's subject is
        # signed, like its reply subject).
        "publish": {"allow": ["taskflow.heartbeat.>"]},
        "subscribe": {"allow": [*own, "$SRV.>", "_INBOX.>"]},
        "allow_responses": {"max": 1, "expires": "10m"},
    }


def viewer_permissions() -> dict[str, object]:
    """Replays a flow's events (an ordered consumer on TASKFLOW_EVENTS), nothing more."""
    return {
        "publish": {
            "allow": [
                "$JS.API.INFO",
                "$JS.API.STREAM.NAMES",
                "$JS.API.STREAM.INFO.TASKFLOW_EVENTS",
                "$JS.API.CONSUMER.CREATE.TASKFLOW_EVENTS",
                "$JS.API.CONSUMER.CREATE.TASKFLOW_EVENTS.>",
                "$JS.API.CONSUMER.DELETE.TASKFLOW_EVENTS.>",
                "$JS.FC.>",
            ]
        },
        "subscribe": {"allow": ["taskflow.events.>", "_INBOX.>"]},
    }


@dataclass(frozen=True)
class NatsAuth:
    """Users of the ``TASKFLOW`` account, each with a generated password: the operator, a
    viewer, and service users, each serving the service ids it is given."""

    services: dict[str, tuple[str, ...]] = field(default_factory=dict)
    passwords: dict[str, str] = field(default_factory=dict)

    @classmethod
    def make(
        cls, *, services: tuple[str, ...] = (), users: dict[str, tuple[str, ...]] | None = None
    ) -> NatsAuth:
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
            {
                "user": OPERATOR_USER,
                "password": self.passwords[OPERATOR_USER],
                "permissions": operator_permissions(),
            },
            {
                "user": VIEWER_USER,
                "password": self.passwords[VIEWER_USER],
                "permissions": viewer_permissions(),
            },
        ]
        users += [
            {
                "user": user,
                "password": self.passwords[user],
                "permissions": service_permissions(*ids),
            }
            for user, ids in self.services.items()
        ]
        accounts = {"TASKFLOW": {"jetstream": "enabled", "users": users}}
        return f"accounts: {json.dumps(accounts, indent=2)}\n"


def tenant_operator_permissions(*, request_subjects: str = ">") -> dict[str, object]:
    """The operator's user in a team's account: requests, events, cancel notices and its two
    streams there (the journal, keys and object store stay in the operator's own account)."""
    return {
        "publish": {
            "allow": [
                request_subjects,
                "taskflow.events.>",
                "taskflow.cancel.>",
                "$SRV.INFO",
                "$JS.API.>",
                "_INBOX.>",
            ],
            "deny": ["taskflow.reply.>"],
        },
        "subscribe": {"allow": ["taskflow.reply.>", "taskflow.heartbeat.>", "_INBOX.>"]},
    }


@dataclass(frozen=True)
class Team:
    """One team's NATS account: the operator's user for it, a service user serving
    ``services``, and the services it ``exports`` (every other team imports them)."""

    services: tuple[str, ...] = ()
    exports: tuple[str, ...] = ()


@dataclass(frozen=True)
class TenantAuth:
    """Accounts for tenant isolation: ``TASKFLOW`` (the operator, its state) and one account
    per team, each with JetStream. Users: ``taskflow-operator``; per team ``<team>-operator``
    (the operator, in that account), ``<team>-svc`` and ``<team>-app``, which may call the
    NATS API only: ``TASKFLOW`` exports ``taskflow.api.>`` and every team imports it with
    ``share``, so the server stamps each call with the caller's account and user."""

    teams: dict[str, Team]
    passwords: dict[str, str]
    # Request subjects as the operator's --subject-template makes them, with "{serviceId}"
    # and "{actionName}" in it ({namespace} is matched by a wildcard).
    template: str = "{serviceId}.{actionName}"

    @classmethod
    def make(
        cls, teams: dict[str, Team], *, template: str = "{serviceId}.{actionName}"
    ) -> TenantAuth:
        names = [
            OPERATOR_USER,
            *(f"{t}-{role}" for t in teams for role in ("operator", "svc", "app")),
        ]
        return cls(
            teams=teams, passwords={u: secrets.token_hex(16) for u in names}, template=template
        )

    def url(self, base: str, user: str) -> str:
        scheme, _, rest = base.partition("://")
        return f"{scheme}://{user}:{self.passwords[user]}@{rest}"

    def subject(self, service_id: str, action: str = ">") -> str:
        return self.template.format(serviceId=service_id, actionName=action, namespace="*")

    def config(self) -> str:
        accounts: dict[str, object] = {
            "TASKFLOW": {
                "jetstream": "enabled",
                "users": [
                    {
                        "user": OPERATOR_USER,
                        "password": self.passwords[OPERATOR_USER],
                        "permissions": operator_permissions(request_subjects="*.*.*"),
                    }
                ],
                "exports": [{"service": "taskflow.api.>"}],
            }
        }
        for team, spec in self.teams.items():
            own = [self.subject(s) for s in spec.services]
            service = {
                "publish": {"allow": ["taskflow.heartbeat.>"]},
                "subscribe": {
                    "allow": [*own, *(f"taskflow.cancel.{s}" for s in spec.services), "_INBOX.>"]
                },
                "allow_responses": {"max": 1, "expires": "10m"},
            }
            account: dict[str, object] = {
                "jetstream": "enabled",
                "users": [
                    {
                        "user": f"{team}-operator",
                        "password": self.passwords[f"{team}-operator"],
                        "permissions": tenant_operator_permissions(),
                    },
                    {
                        "user": f"{team}-svc",
                        "password": self.passwords[f"{team}-svc"],
                        "permissions": service,
                    },
                    {
                        "user": f"{team}-app",
                        "password": self.passwords[f"{team}-app"],
                        "permissions": {
                            "publish": {"allow": ["taskflow.api.>"]},
                            "subscribe": {"allow": ["_INBOX.>"]},
                        },
                    },
                ],
            }
            if spec.exports:
                account["exports"] = [{"service": self.subject(s)} for s in spec.exports]
            imports: list[dict[str, object]] = [
                {"service": {"account": other, "subject": self.subject(s)}}
                for other, theirs in self.teams.items()
                if other != team
                for s in theirs.exports
            ]
            imports.append(
                {"service": {"account": "TASKFLOW", "subject": "taskflow.api.>"}, "share": True}
            )
            account["imports"] = imports
            accounts[team] = account
        return f"accounts: {json.dumps(accounts, indent=2)}\n"
