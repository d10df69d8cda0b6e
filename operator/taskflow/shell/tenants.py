"""Tenants: each namespace's TaskflowPolicy, and a NATS connection per credentials Secret.

The policies come from a watch (and one list at startup, before any flow runs, so no flow
dispatches before its namespace's policy is known). For a namespace whose policy names NATS
credentials, every dispatch, reply, cancel notice and event of its flows goes over that
Secret's connection, in that NATS user's account, never over the operator's own: until the
connection is up, such a flow's dispatches wait as if nobody answered (and time out if it
never comes). The operator's state (journal, keys, large responses) stays in its own account.

A Secret serves only the namespaces listed in its ``taskflow.dev/namespaces`` annotation, and
the Secret lives in the operator's namespace: a policy naming a Secret is not enough to use it.
Whether a policy's connection is up is its ``Connected`` condition (``kubectl get tfpolicy``).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from nats.aio.msg import Msg
from pydantic import ValidationError

from taskflow.api.policy import (
    NAME,
    PLURAL,
    SECRET_NAMESPACES,
    TaskflowPolicySpec,
    no_policy_refusal,
)
from taskflow.engine import Refusal
from taskflow.kube import Gone, Kube
from taskflow.shell.bus import Bus, NatsSettings
from taskflow.wire.subjects import Subjects

log = logging.getLogger("taskflow.tenants")

# How often a Secret in use is read again (a rotated credential is picked up this late).
RECHECK_S = 30.0


class Link(Protocol):
    """What a flow's writer sends and reads over NATS: ``Bus`` or ``Unreachable``."""

    async def dispatch(
        self, *, subject: str, reply: str, body: bytes, headers: dict[str, str]
    ) -> None: ...
    async def publish(
        self, subject: str, body: bytes, headers: dict[str, str] | None = None
    ) -> None: ...
    async def publish_events(
        self, subject: str, uid: str, events: list[tuple[int, bytes]]
    ) -> set[int]: ...
    async def stored_reply(self, subject: str) -> Msg | None: ...
    async def last_event_seq(self, subject: str) -> int | None: ...
    async def forget_replies(self, uid: str) -> None: ...
    async def idempotent_subjects(self, *, max_age: float = 30.0) -> frozenset[str]: ...


class LinkDown(Exception):
    """A namespace's NATS connection is not up: its dispatches wait (as for no responders)."""


@dataclass(frozen=True)
class Unreachable:
    """The link of a namespace whose credentials are not (yet) usable: sends nothing, reads
    nothing, keeps its events in the outbox. Never falls back to the operator's identity."""

    why: str

    async def dispatch(
        self, *, subject: str, reply: str, body: bytes, headers: dict[str, str]
    ) -> None:
        raise LinkDown(self.why)

    async def publish(
        self, subject: str, body: bytes, headers: dict[str, str] | None = None
    ) -> None:
        raise LinkDown(self.why)

    async def publish_events(
        self, subject: str, uid: str, events: list[tuple[int, bytes]]
    ) -> set[int]:
        return set()

    async def stored_reply(self, subject: str) -> Msg | None:
        return None

    async def last_event_seq(self, subject: str) -> int | None:
        return None

    async def forget_replies(self, uid: str) -> None:
        return None

    async def idempotent_subjects(self, *, max_age: float = 30.0) -> frozenset[str]:
        return frozenset()


@dataclass
class _Connection:
    """One credentials Secret's connection, shared by the namespaces it serves."""

    secret: str
    bus: Bus | None = None
    version: str | None = None  # the Secret's resourceVersion the connection was made with
    namespaces: frozenset[str] = frozenset()  # the Secret's annotation
    problem: tuple[str, str] | None = ("Connecting", "connecting to NATS")  # (reason, message)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None


# Told (message, link name or None for the operator's own connection).
ReplyHandler = Callable[[Msg, str | None], Awaitable[None]]
ReconnectHandler = Callable[[str | None], None]


class Tenants:
    def __init__(
        self,
        *,
        kube: Kube,
        main: Bus,
        nats: NatsSettings,
        subjects: Subjects,
        credentials_namespace: str | None,
        require_policy: bool,
    ) -> None:
        self.kube = kube
        self.main = main
        self.nats = nats
        self.subjects = subjects
        self.credentials_namespace = credentials_namespace
        self.require_policy = require_policy
        self.policies: dict[str, TaskflowPolicySpec | str] = {}  # str: why it is unusable
        self.bodies: dict[str, dict[str, Any]] = {}
        self.connections: dict[str, _Connection] = {}
        self.on_reply: ReplyHandler | None = None
        self.on_heartbeat: ReplyHandler | None = None
        self.on_reconnected: ReconnectHandler | None = None
        self.on_dropped: Callable[[str], None] | None = None
        self._closed = False

    # -- policies ----------------------------------------------------------------------------

    async def load(self, namespaces: list[str] | None) -> None:
        """Every policy, before the first flow runs (the watch keeps them up to date)."""
        for namespace in namespaces or [None]:  # type: ignore[list-item]
            for body in await self.kube.list_policies(namespace):
                self.observe("ADDED", body)

    def observe(self, event_type: str | None, body: dict[str, Any]) -> None:
        meta = body.get("metadata") or {}
        namespace, name = meta.get("namespace"), meta.get("name")
        if not namespace or name != NAME:
            return
        if event_type == "DELETED":
            self.policies.pop(namespace, None)
            self.bodies.pop(namespace, None)
        else:
            try:
                self.policies[namespace] = TaskflowPolicySpec.model_validate(body.get("spec") or {})
            except ValidationError as exc:  # (the CRD's schema should have refused it)
                self.policies[namespace] = f"TaskflowPolicy {NAME!r} is invalid: {exc}"
            self.bodies[namespace] = body
        self._reconcile()

    def refusal(self, namespace: str) -> Refusal | None:
        """What the engine asks before it dispatches a task of a flow in ``namespace``."""
        policy = self.policies.get(namespace)
        if policy is None:
            return no_policy_refusal if self.require_policy else None
        if isinstance(policy, str):
            why = policy
            return lambda service_id, action_name: why
        return policy.refusal if policy.services is not None else None

    def secret_of(self, namespace: str) -> str | None:
        """The credentials Secret the namespace's flows use, or None: the operator's own."""
        policy = self.policies.get(namespace)
        if isinstance(policy, TaskflowPolicySpec) and policy.nats_credentials is not None:
            return policy.nats_credentials.secret_name
        return None

    def link(self, namespace: str) -> Link:
        """The connection a flow of ``namespace`` dispatches, listens and publishes on."""
        secret = self.secret_of(namespace)
        if secret is None:
            return self.main
        if self.credentials_namespace is None:
            return Unreachable(
                f"the operator has no --credentials-namespace to read Secret {secret!r} from"
            )
        connection = self.connections.get(secret)
        if connection is None or connection.bus is None or connection.problem is not None:
            why = connection.problem[1] if connection and connection.problem else "connecting"
            return Unreachable(f"NATS credentials {secret!r}: {why}")
        if namespace not in connection.namespaces:
            return Unreachable(
                f"Secret {secret!r} does not list namespace {namespace!r} in "
                f"its {SECRET_NAMESPACES} annotation"
            )
        return connection.bus

    def serves(self, namespace: str, via: str | None) -> bool:
        """Whether a reply that came over link ``via`` may reach a flow of ``namespace``."""
        return self.secret_of(namespace) == via

    # -- connections -------------------------------------------------------------------------

    def _reconcile(self) -> None:
        wanted = {s for ns in self.policies if (s := self.secret_of(ns)) is not None}
        if self.credentials_namespace is None or self._closed:
            wanted = set()
        for secret in wanted - self.connections.keys():
            connection = self.connections[secret] = _Connection(secret=secret)
            connection.task = asyncio.get_running_loop().create_task(self._keep(connection))
        for secret in self.connections.keys() - wanted:
            connection = self.connections.pop(secret)
            if connection.task is not None:
                connection.task.cancel()
        for connection in self.connections.values():
            connection.wake.set()  # a policy changed: its condition, at least, is due

    async def _keep(self, connection: _Connection) -> None:
        """Connect, and connect again whenever the Secret changes; say how it went."""
        try:
            while True:
                connection.wake.clear()
                try:
                    await self._check(connection)
                    await self._report(connection)
                except Exception:  # never let the keeper die: try again at the next check
                    log.exception("keeping the NATS connection of Secret %r", connection.secret)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(RECHECK_S):
                        await connection.wake.wait()
        except asyncio.CancelledError:
            pass
        finally:
            if connection.bus is not None:
                await connection.bus.close()

    async def _check(self, connection: _Connection) -> None:
        assert self.credentials_namespace is not None
        try:
            secret = await self.kube.get_secret(self.credentials_namespace, connection.secret)
        except Gone:
            connection.problem = (
                "SecretNotFound",
                f"no Secret {connection.secret!r} in namespace {self.credentials_namespace!r}",
            )
            return
        except Exception as exc:
            connection.problem = (
                "SecretUnreadable",
                f"Secret {connection.secret!r} could not be read: {type(exc).__name__}",
            )
            return
        meta = secret.get("metadata") or {}
        listed = (meta.get("annotations") or {}).get(SECRET_NAMESPACES, "")
        connection.namespaces = frozenset(n.strip() for n in listed.split(",") if n.strip())
        version = meta.get("resourceVersion")
        if connection.bus is not None and version == connection.version:
            return
        try:
            settings = self._settings(connection.secret, secret.get("data") or {})
        except ValueError as exc:
            connection.problem = ("CredentialsInvalid", str(exc))
            return
        try:
            bus = await Bus.connect(settings, self.subjects, own_state=False, retry=False)
        except Exception as exc:
            # The server's words ("Authorization Violation", "timeout"), never the secret's.
            connection.problem = (
                "ConnectFailed",
                f"could not connect to NATS with Secret "
                f"{connection.secret!r}: {type(exc).__name__}: "
                f"{str(exc)[:200]}",
            )
            log.warning("%s", connection.problem[1])
            return
        via = connection.secret
        bus.on_dropped = self.on_dropped
        reconnected = self.on_reconnected
        bus.on_reconnected = (lambda: reconnected(via)) if reconnected is not None else None
        handler, beat = self.on_reply, self.on_heartbeat
        try:
            if handler is not None:

                async def on_reply(msg: Msg) -> None:
                    await handler(msg, via)

                await bus.subscribe_replies(on_reply)
            if beat is not None:

                async def on_heartbeat(msg: Msg) -> None:
                    await beat(msg, via)

                await bus.subscribe_heartbeats(on_heartbeat)
        except BaseException:
            await bus.close()
            raise
        old, connection.bus, connection.version = connection.bus, bus, version
        connection.problem = None
        log.info(
            "connected to NATS with Secret %r (for %s)",
            connection.secret,
            ", ".join(sorted(connection.namespaces)) or "no namespace",
        )
        if old is not None:
            await old.close()

    def _settings(self, secret: str, data: dict[str, str]) -> NatsSettings:
        def value(key: str) -> str | None:
            raw = data.get(key)
            return base64.b64decode(raw).decode() if raw else None

        creds, nkey, token = value("creds"), value("nkey"), value("token")
        user, password = value("user"), value("password")
        if not (creds or nkey or token or (user and password)):
            raise ValueError(
                f"Secret {secret!r} holds none of 'creds', 'nkey', 'token', or "
                "'user' and 'password'"
            )
        return dataclasses.replace(
            self.nats,
            user=user,
            password=password,
            token=token,
            creds=creds,
            nkey_seed=nkey,
            creds_file=None,
            nkey_seed_file=None,
            name=f"taskflow-operator/{secret}",
        )

    async def _report(self, connection: _Connection) -> None:
        """The Connected condition of every policy naming this Secret."""
        for namespace, body in list(self.bodies.items()):
            if self.secret_of(namespace) != connection.secret:
                continue
            if connection.problem is not None:
                reason, message = connection.problem
                status = "False"
            elif namespace not in connection.namespaces:
                reason, status = "NotAllowed", "False"
                message = (
                    f"Secret {connection.secret!r} does not list namespace "
                    f"{namespace!r} in its {SECRET_NAMESPACES} annotation"
                )
            else:
                reason, status, message = "Connected", "True", "connected to NATS"
            await self._set_condition(body, status=status, reason=reason, message=message)

    async def _set_condition(
        self, body: dict[str, Any], *, status: str, reason: str, message: str
    ) -> None:
        conditions = (body.get("status") or {}).get("conditions") or []
        old = next((c for c in conditions if c.get("type") == "Connected"), None)
        if old and (old.get("status"), old.get("reason"), old.get("message")) == (
            status,
            reason,
            message,
        ):
            return
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        since = now if old is None or old.get("status") != status else old["lastTransitionTime"]
        condition = {
            "type": "Connected",
            "status": status,
            "reason": reason,
            "message": message[:1024],
            "lastTransitionTime": since,
            "observedGeneration": (body.get("metadata") or {}).get("generation"),
        }
        meta = body["metadata"]
        others = [c for c in conditions if c.get("type") != "Connected"]
        try:
            updated = await self.kube.put_status(PLURAL, body, {"conditions": [*others, condition]})
        except Exception as exc:  # a newer object is on its way; its watch event retries
            log.debug(
                "could not set the Connected condition of %s/%s: %s",
                meta["namespace"],
                meta["name"],
                exc,
            )
            return
        if self.bodies.get(meta["namespace"]) is body:
            self.bodies[meta["namespace"]] = {
                **body,
                "metadata": updated["metadata"],
                "status": updated.get("status"),
            }

    async def close(self) -> None:
        self._closed = True
        tasks = [c.task for c in self.connections.values() if c.task is not None]
        self.connections.clear()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task
