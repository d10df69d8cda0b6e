"""The operator's NATS side: dispatching attempts, receiving replies, publishing events.

Replies are sent by services to ``taskflow.reply.<uid>.<stage>.<task>.<attempt>``. Two things
listen there: the operator's own subscription (fast path, and the only place NATS reports
"no responders" for a request) and a JetStream stream that keeps every reply, so that a reply
arriving while the operator is down is found again when its flow resumes. Events go to
``taskflow.events.<uid>``, also kept by a stream so a late subscriber can replay them.

Before a flow's writer dispatches, it records the status that says so in the key-value bucket
``taskflow-journal`` (a write-ahead copy, ~1 ms, against ~9 ms for the API write that follows):
after a restart, an attempt that was sent is known to have been sent, even if the operator died
before the API write.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import nats
from nats.aio.client import Client, RawCredentials
from nats.aio.msg import Msg
from nats.errors import SlowConsumerError
from nats.js import JetStreamContext
from nats.js.api import (
    DiscardPolicy,
    KeyValueConfig,
    ObjectStoreConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import NotFoundError

from taskflow.client.services import IDEMPOTENT
from taskflow.wire.subjects import Subjects

log = logging.getLogger("taskflow.bus")

REPLY_STREAM = "TASKFLOW_REPLIES"
EVENT_STREAM = "TASKFLOW_EVENTS"
HISTORY_STREAM = "TASKFLOW_HISTORY"
HISTORY_PREFIX = "taskflow.history"
RESPONSE_BUCKET = "taskflow-responses"
JOURNAL_BUCKET = "taskflow-journal"


@dataclass(frozen=True)
class NatsSettings:
    url: str = "nats://127.0.0.1:4222"
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)
    creds_file: str | None = None
    nkey_seed_file: str | None = None
    # The same, as contents (a tenant's credentials, read from its Secret).
    creds: str | None = field(default=None, repr=False)
    nkey_seed: str | None = field(default=None, repr=False)
    name: str = "taskflow-operator"
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    # How long replies and events are kept (seconds).
    retention_s: int = 24 * 3600
    # Bytes of replies received and not yet read by the operator; past it the client drops
    # them (a slow consumer) and the flows they belong to read them from the reply stream.
    # Far below the chart's memory limit (512 MiB), whatever services send.
    reply_pending_bytes: int = 64 * 1024 * 1024
    reply_pending_msgs: int = 100_000
    # Upper bounds of what the operator keeps in JetStream (a flood cannot fill the disk).
    stream_max_bytes: int = 512 * 1024**2
    objects_max_bytes: int = 1024**3
    journal_max_bytes: int = 256 * 1024**2
    # Finished flows deleted after their TTL: their final status, kept this long.
    history_retention_s: int = 30 * 24 * 3600
    history_max_bytes: int = 1024**3
    max_reply_bytes: int = 1024 * 1024

    def connect_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {
            "servers": [u.strip() for u in self.url.split(",")],
            "name": self.name,
            "max_reconnect_attempts": -1,
            "reconnect_time_wait": 0.5,
            "pending_size": 64 * 1024 * 1024,
        }
        if self.user:
            options["user"], options["password"] = self.user, self.password
        if self.token:
            options["token"] = self.token
        if self.creds_file:
            options["user_credentials"] = self.creds_file
        if self.nkey_seed_file:
            options["nkeys_seed"] = self.nkey_seed_file
        if self.creds:
            options["user_credentials"] = RawCredentials(self.creds)
        if self.nkey_seed:
            options["nkeys_seed_str"] = self.nkey_seed
        if self.tls_ca or self.tls_cert:
            context = ssl.create_default_context(cafile=self.tls_ca)
            if self.tls_cert:
                context.load_cert_chain(self.tls_cert, self.tls_key)
            options["tls"] = context
        return options


ReplyHandler = Callable[[Msg], Awaitable[None]]
# Told the subject of a message the client dropped (a slow consumer).
DropHandler = Callable[[str], None]
# (IDEMPOTENT: a service says in its Services API metadata that it answers a repeated attempt
# with its first answer, so the operator may re-ask an attempt whose reply may have been lost.)
# Headers and the reply's own envelope, over the largest reply the operator reads.
_HEADROOM = 64 * 1024


class Bus:
    def __init__(
        self,
        nc: Client,
        js: JetStreamContext,
        subjects: Subjects,
        settings: NatsSettings | None = None,
    ) -> None:
        self.nc = nc
        self.js = js
        self.subjects = subjects
        self.settings = settings or NatsSettings()
        self._objects: Any = None
        self._journal: Any = None
        self.on_dropped: DropHandler | None = None
        self.on_reconnected: Callable[[], None] | None = None
        self.dropped = 0
        self._idempotent: tuple[float, frozenset[str]] | None = None
        self._discovery: asyncio.Lock | None = None

    @classmethod
    async def connect(
        cls,
        settings: NatsSettings,
        subjects: Subjects,
        *,
        own_state: bool = True,
        retry: bool = True,
    ) -> Bus:
        """Connected, with its streams made. ``own_state``: also the operator's journal and
        object store (a tenant's connection has the reply and event streams only: the state
        stays in the operator's own account). ``retry``: reconnect for ever, also when the
        first attempt fails (a tenant's connection reports it instead)."""
        bus: Bus | None = None
        said: list[str] = []  # what went wrong while connecting ('Authorization Violation')

        async def on_error(exc: Exception) -> None:
            if isinstance(exc, SlowConsumerError):
                if bus is not None:
                    bus.was_dropped(exc.subject)
                return
            said.append(str(exc))
            log.warning("nats: %s", exc)

        async def on_reconnect() -> None:
            log.info("nats: reconnected")
            if bus is not None and bus.on_reconnected is not None:
                bus.on_reconnected()

        options = settings.connect_options()
        if not retry:
            options.update(max_reconnect_attempts=1, connect_timeout=5)
        try:
            nc = await nats.connect(**options, error_cb=on_error, reconnected_cb=on_reconnect)
        except Exception as exc:
            if said:  # rather than "no servers available": the server's reason, if it gave one
                why = next((w for w in said if "violation" in w.lower()), said[0])
                raise ConnectionRefusedError(why) from exc
            raise
        nc.options["max_reconnect_attempts"] = -1  # once connected, never give up
        js = nc.jetstream()
        bus = cls(nc, js, subjects, settings)
        try:
            await bus._ensure_streams(settings.retention_s, own_state=own_state)
        except BaseException:
            await bus.close()
            raise
        return bus

    def was_dropped(self, subject: str) -> None:
        self.dropped += 1
        if self.dropped & (self.dropped - 1) == 0:  # 1, 2, 4, 8...: a storm logs a few lines
            log.warning(
                "nats client dropped %d messages as a slow consumer (last on %s); "
                "their flows read them from the reply stream",
                self.dropped,
                subject,
            )
        if self.on_dropped is not None:
            self.on_dropped(subject)

    async def _ensure_streams(self, retention_s: int, *, own_state: bool = True) -> None:
        limits = self.settings
        for name, subject, per_subject in (
            # An attempt's subject has one answer; a storm on one keeps the last few.
            (REPLY_STREAM, f"{self.subjects.reply_prefix}.>", 4),
            (EVENT_STREAM, f"{self.subjects.events_prefix}.>", -1),
        ):
            cfg = StreamConfig(
                name=name,
                subjects=[subject],
                retention=RetentionPolicy.LIMITS,
                storage=StorageType.FILE,
                discard=DiscardPolicy.OLD,
                max_age=float(retention_s),
                max_bytes=limits.stream_max_bytes,
                max_msg_size=limits.max_reply_bytes + _HEADROOM,
                max_msgs_per_subject=per_subject,
                duplicate_window=120.0,
                allow_direct=True,
            )
            await self._stream(cfg)
        if not own_state:
            return
        history = StreamConfig(
            name=HISTORY_STREAM,
            subjects=[f"{HISTORY_PREFIX}.>"],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            discard=DiscardPolicy.OLD,
            max_age=float(limits.history_retention_s),
            max_bytes=limits.history_max_bytes,
            max_msgs_per_subject=1,
            duplicate_window=120.0,
            allow_direct=True,
        )
        await self._stream(history)
        try:
            self._objects = await self.js.object_store(RESPONSE_BUCKET)
        except Exception:
            # No expiry: a large response lives as long as the flow that points to it (the
            # reaper, and a deleted flow's watch event, delete it with the flow).
            self._objects = await self.js.create_object_store(
                RESPONSE_BUCKET,
                config=ObjectStoreConfig(
                    bucket=RESPONSE_BUCKET,
                    storage=StorageType.FILE,
                    max_bytes=limits.objects_max_bytes,
                ),
            )
        else:
            await self._keep_objects()

        try:
            self._journal = await self.js.key_value(JOURNAL_BUCKET)
        except Exception:
            self._journal = await self.js.create_key_value(
                KeyValueConfig(
                    bucket=JOURNAL_BUCKET,
                    history=1,
                    storage=StorageType.FILE,
                    ttl=float(retention_s),
                    max_bytes=limits.journal_max_bytes,
                    max_value_size=limits.max_reply_bytes * 2,
                )
            )

    async def subscribe_replies(self, handler: ReplyHandler) -> None:
        await self.nc.subscribe(
            f"{self.subjects.reply_prefix}.>",
            cb=handler,
            pending_msgs_limit=self.settings.reply_pending_msgs,
            pending_bytes_limit=self.settings.reply_pending_bytes,
        )

    async def subscribe_heartbeats(self, handler: ReplyHandler) -> None:
        """Heartbeats of long attempts: small, and never kept (a lost one is sent again)."""
        await self.nc.subscribe(
            f"{self.subjects.heartbeat_prefix}.>",
            cb=handler,
            pending_msgs_limit=self.settings.reply_pending_msgs,
            pending_bytes_limit=16 * 1024 * 1024,
        )

    async def dispatch(
        self, *, subject: str, reply: str, body: bytes, headers: dict[str, str]
    ) -> None:
        await self.nc.publish(subject, body, reply=reply, headers=headers)

    async def publish(
        self, subject: str, body: bytes, headers: dict[str, str] | None = None
    ) -> None:
        await self.nc.publish(subject, body, headers=headers)

    async def idempotent_subjects(self, *, max_age: float = 30.0) -> frozenset[str]:
        """Request subjects of the services that declare idempotent replies (``$SRV.INFO``),
        found at most every ``max_age`` seconds; empty when none answer or NATS cannot say."""
        if self._discovery is None:
            self._discovery = asyncio.Lock()
        async with self._discovery:  # many flows resuming at once share one look-up
            now = asyncio.get_running_loop().time()
            if self._idempotent is not None and now - self._idempotent[0] < max_age:
                return self._idempotent[1]
            found: set[str] = set()
            try:
                inbox = self.nc.new_inbox()
                sub = await self.nc.subscribe(inbox, max_msgs=10_000)
                try:
                    await self.nc.publish("$SRV.INFO", b"", reply=inbox)
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(0.5):  # every instance answers at once
                            async for msg in sub.messages:
                                found |= idempotent_endpoints(msg.data)
                finally:
                    with contextlib.suppress(Exception):
                        await sub.unsubscribe()
            except Exception as exc:
                log.warning("could not ask services whether they are idempotent: %s", exc)
            self._idempotent = (now, frozenset(found))
            return self._idempotent[1]

    async def account(self) -> str | None:
        """The NATS account this connection is in (``$SYS.REQ.USER.INFO``), None if the
        server does not say (no accounts, or no permission to ask)."""
        try:
            answer = await self.nc.request("$SYS.REQ.USER.INFO", b"", timeout=2)
            account = json.loads(answer.data)["data"]["account"]
        except Exception as exc:
            log.debug("could not ask NATS for this connection's account: %s", exc)
            return None
        return account if isinstance(account, str) else None

    async def stored_reply(self, subject: str) -> Msg | None:
        """The reply kept by the stream for one attempt, if any (used when a flow resumes)."""
        try:
            raw = await self.js.get_last_msg(REPLY_STREAM, subject, direct=True)
        except NotFoundError:
            return None
        except Exception as exc:
            log.warning("could not look up a stored reply on %s: %s", subject, exc)
            return None
        return Msg(
            self.nc, subject=raw.subject or subject, data=raw.data or b"", headers=raw.headers
        )

    async def last_event_seq(self, subject: str) -> int | None:
        """The seq of the last event the stream keeps for a flow (0: none); None when NATS
        cannot say."""
        try:
            raw = await self.js.get_last_msg(EVENT_STREAM, subject, direct=True)
        except NotFoundError:
            return 0
        except Exception as exc:
            log.warning("could not read the last event on %s: %s", subject, exc)
            return None
        with contextlib.suppress(ValueError, TypeError, KeyError):
            return int(json.loads(raw.data or b"{}")["seq"])
        return None

    async def publish_events(
        self, subject: str, uid: str, events: list[tuple[int, bytes]]
    ) -> set[int]:
        """Publish a flow's events in order, each acknowledged by the event stream; the seqs
        it stored (a repeat is acknowledged as a duplicate, by its ``Nats-Msg-Id``)."""

        async def one(seq: int, payload: bytes) -> int | None:
            try:
                await self.js.publish(
                    subject,
                    payload,
                    timeout=5,
                    headers={"Nats-Msg-Id": self.subjects.event_id(uid, seq)},
                )
            except Exception as exc:
                log.debug("event %s:%d not acknowledged: %s", uid, seq, exc)
                return None
            return seq

        # Started in order on one connection, so the stream stores them in order.
        done = await asyncio.gather(*(one(seq, payload) for seq, payload in events))
        return {seq for seq in done if seq is not None}

    async def forget_replies(self, uid: str) -> None:
        """Drop a finished flow's replies: status now records them."""
        try:
            await self.js.purge_stream(REPLY_STREAM, subject=self.subjects.replies_of(uid))
        except Exception as exc:
            log.warning("could not purge replies of %s: %s", uid, exc)

    async def journal(self, uid: str, status: bytes) -> int:
        """Keep a flow's status before acting on it; its revision (raises when NATS did not
        store it)."""
        revision: int = await self._journal.put(uid, status)
        return revision

    async def journaled(self, uid: str) -> tuple[bytes, int] | None:
        """The last entry kept for a flow and its revision, if any. Raises when NATS cannot
        say: resuming from the API's copy alone could send an attempt a second time."""
        for attempt in range(3):
            try:
                entry = await self._journal.get(uid)
            except NotFoundError:  # no key, or a deleted one
                return None
            except Exception as exc:
                if attempt == 2:
                    raise
                log.warning("could not read the journal of %s (trying again): %s", uid, exc)
                await asyncio.sleep(0.5 * (attempt + 1))
            else:
                return (bytes(entry.value), int(entry.revision or 0)) if entry.value else None
        return None

    async def journal_keys(self) -> set[str]:
        """The uids the journal holds an entry for: flows whose writer did not finish (an
        entry goes when its flow has ended and its events are in the stream)."""
        try:
            return set(await self._journal.keys())
        except Exception as exc:  # (NoKeysError: an empty bucket)
            if type(exc).__name__ != "NoKeysError":
                log.warning("could not list the journal: %s", exc)
            return set()

    async def forget_journal(self, uid: str, revision: int) -> None:
        """A finished flow's status is in the API: its write-ahead copy is not needed. Only
        if it is still the copy at ``revision``: a retry's new writer may have kept a newer one
        meanwhile, which must stay."""
        try:
            await self._journal.delete(uid, last=revision)
        except Exception as exc:  # (a newer revision: "wrong last sequence")
            log.debug("journal of %s not dropped: %s", uid, exc)

    async def _stream(self, cfg: StreamConfig) -> None:
        """Make the stream, or bring an existing one to ``cfg``."""
        try:
            await self.js.add_stream(cfg)
        except Exception as refused:
            try:
                await self.js.update_stream(cfg)
            except NotFoundError:
                raise refused from None  # not an existing stream: why it was refused

    async def _keep_objects(self) -> None:
        """An object store made by an earlier release expires its objects after 24 h while
        status still points to them: keep them as long as their flow instead."""
        name = f"OBJ_{RESPONSE_BUCKET}"
        try:
            info = await self.js.stream_info(name)
            if info.config.max_age:
                info.config.max_age = 0
                await self.js.update_stream(info.config)
        except Exception as exc:
            log.warning("could not lift the expiry of %s: %s", name, exc)

    async def record_history(self, namespace: str, uid: str, summary: dict[str, Any]) -> None:
        """Keep a finished flow's final status before it is deleted (raises if not stored:
        the flow is then kept, and tried again)."""
        await self.js.publish(
            f"{HISTORY_PREFIX}.{namespace}.{uid}",
            json.dumps(summary, separators=(",", ":"), default=str).encode(),
            timeout=5,
            headers={"Nats-Msg-Id": f"history:{uid}"},
        )

    async def forget_response(self, key: str) -> None:
        try:
            await self._objects.delete(key)
        except Exception as exc:
            log.debug("response %s not deleted: %s", key, exc)

    async def store_response(self, key: str, data: bytes) -> str:
        await self._objects.put(key, data)
        return f"nats-object://{RESPONSE_BUCKET}/{key}"

    async def load_response(self, ref: str) -> bytes:
        """A response kept by ``store_response``, by its ``nats-object://`` reference."""
        key = ref.split("/", 3)[-1]
        result = await self._objects.get(key)
        return bytes(result.data or b"")

    async def flush(self) -> None:
        await self.nc.flush()

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.nc.drain(), 5)


def idempotent_endpoints(info: bytes) -> set[str]:
    """The endpoint subjects a ``$SRV.INFO`` answer declares idempotent (see IDEMPOTENT)."""
    try:
        doc = json.loads(info)
    except (ValueError, RecursionError):
        return set()
    if not isinstance(doc, dict) or not isinstance(doc.get("endpoints"), list):
        return set()
    service = _flag(doc.get("metadata"))
    return {
        e["subject"]
        for e in doc["endpoints"]
        if isinstance(e, dict)
        and isinstance(e.get("subject"), str)
        and (service or _flag(e.get("metadata")))
    }


def _flag(metadata: Any) -> bool:
    return isinstance(metadata, dict) and str(metadata.get(IDEMPOTENT, "")).lower() == "true"
