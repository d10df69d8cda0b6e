"""kopf wiring: one low-level watch handler feeds every Taskflow to the registry.

``on.event`` is used on purpose: kopf's change-detection handlers persist their progress in
annotations, which would cost an extra API write per change; the flow writer keeps its own
state in status instead.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
from collections.abc import Iterable
from typing import Any, cast

import kopf

from taskflow.api.limits import PLURAL as LIMIT_PLURAL
from taskflow.api.names import GROUP, PLURAL, VERSION
from taskflow.api.policy import PLURAL as POLICY_PLURAL
from taskflow.api.schedules import PLURAL as CRON_PLURAL
from taskflow.kube import Kube, connection_config, load_api_client
from taskflow.shell.buckets import Buckets, BucketSettings
from taskflow.shell.bus import Bus, NatsSettings
from taskflow.shell.keys import key_from_file, key_from_nats
from taskflow.shell.limits import ServiceLimits
from taskflow.shell.reaper import Reaper, TtlDefaults
from taskflow.shell.registry import Registry
from taskflow.shell.scheduler import Scheduler
from taskflow.shell.settings import RunnerSettings
from taskflow.shell.slots import Slots
from taskflow.shell.tenants import Tenants

log = logging.getLogger("taskflow.handlers")


class NoDiffBase(kopf.AnnotationsDiffBaseStorage):
    """kopf builds a deep copy of every watched object on every event, as the base against
    which change handlers (``on.create``/``on.update``) see a diff. This operator has none
    (``on.event`` only), so the copy was never read: it was ~13 % of the operator's CPU at
    saturation. Nothing is ever stored, so ``fetch`` finds nothing either."""

    def build(
        self, *, body: kopf.Body, extra_fields: Iterable[Any] | None = None
    ) -> kopf.BodyEssence:
        return cast(kopf.BodyEssence, {})


class Operator:
    """What the handlers need, set up at kopf's startup and torn down at its cleanup."""

    def __init__(
        self,
        *,
        kubeconfig: str | None,
        nats: NatsSettings,
        runner: RunnerSettings,
        standalone: bool = True,
        peering: str | None = None,
        api_namespaces: list[str] | None = None,
        serve_nats_api: bool = True,
        nats_api_users: bool = False,
        key_file: str | None = None,
        namespaces: list[str] | None = None,
        credentials_namespace: str | None = None,
        require_policy: bool = False,
        ttl: TtlDefaults | None = None,
        webhook: tuple[str, str, str] | None = None,
        slot_lease_s: float = 30.0,
        service_poll_s: float = 10.0,
        buckets: BucketSettings | None = None,
        service_limits: bool = True,
    ) -> None:
        self.kubeconfig = kubeconfig
        self.nats = nats
        self.runner_settings = runner
        self.standalone = standalone
        self.peering = peering
        # The NATS API (taskflow.api.*): where it may act; None = every namespace.
        self.api_namespaces = api_namespaces
        self.serve_nats_api = serve_nats_api
        # The NATS API also takes the NATS user of a call through an account import.
        self.nats_api_users = nats_api_users
        self.key_file = key_file
        # The watched namespaces (None: all), where tenants' credentials Secrets live, and
        # whether a namespace without a TaskflowPolicy may run flows at all.
        self.namespaces = namespaces
        self.credentials_namespace = credentials_namespace
        self.require_policy = require_policy
        self.tenants: Tenants | None = None
        self.ttl = ttl or TtlDefaults()
        # (host:port, cert file, key file) of the admission webhook, if it is served.
        self.webhook = webhook
        self._webhook_runner: Any = None
        self.reaper: Reaper | None = None
        self.scheduler: Scheduler | None = None
        self.slot_lease_s = slot_lease_s
        self.service_poll_s = service_poll_s
        self.service_limits = service_limits
        self.slots: Slots | None = None
        self.limits: ServiceLimits | None = None
        self.registry: Registry | None = None
        self.bus: Bus | None = None
        self.kube: Kube | None = None
        # Active/active replicas (None: this replica serves every flow, or stands by).
        self.bucket_settings = buckets
        self.buckets: Buckets | None = None

    def register(self, registry: kopf.OperatorRegistry) -> None:
        kopf.on.login(registry=registry)(self.login)
        kopf.on.startup(registry=registry)(self.startup)
        kopf.on.cleanup(registry=registry)(self.cleanup)
        kopf.on.event(GROUP, VERSION, PLURAL, registry=registry)(
            self.on_event  # type: ignore[arg-type]
        )
        kopf.on.event(GROUP, VERSION, POLICY_PLURAL, registry=registry)(
            self.on_policy  # type: ignore[arg-type]
        )
        kopf.on.event(GROUP, VERSION, CRON_PLURAL, registry=registry)(
            self.on_cron  # type: ignore[arg-type]
        )
        if self.service_limits:
            kopf.on.event(GROUP, VERSION, LIMIT_PLURAL, registry=registry)(
                self.on_limit  # type: ignore[arg-type]
            )
        kopf.on.probe(id="nats", registry=registry)(self.probe)

    def login(self, **_: Any) -> kopf.ConnectionInfo:
        """Log kopf in with exactly the credentials our own client uses."""
        cfg = connection_config(self.kubeconfig)
        keys = cfg.api_key or {}
        # Newer kubernetes clients keep the token under "BearerToken", older ones under
        # "authorization"; both hold "Bearer <token>".
        token = keys.get("BearerToken") or keys.get("authorization") or ""
        return kopf.ConnectionInfo(
            server=cfg.host,
            ca_path=cfg.ssl_ca_cert,
            insecure=not cfg.verify_ssl,
            certificate_path=cfg.cert_file,
            private_key_path=cfg.key_file,
            scheme="Bearer" if token else None,
            token=token.split(" ", 1)[-1].strip() or None,  # "Bearer x" or in-pod "bearer x"
        )

    async def startup(self, settings: kopf.OperatorSettings, **_: Any) -> None:
        settings.persistence.diffbase_storage = NoDiffBase()
        settings.posting.enabled = False  # we post our own, flow-level Events
        # No CRD or namespace scanning: least-privilege RBAC grants neither, and the resource
        # and the namespaces to watch are known from the command line.
        settings.scanning.disabled = True
        settings.watching.server_timeout = 300
        settings.watching.client_timeout = 330
        settings.networking.error_backoffs = [1, 2, 5, 10]
        settings.queueing.worker_limit = None
        # A per-object kopf worker holds its last watch event (the whole decoded object) until
        # it has been idle this long. Our only handler is on.event, which hands the object to
        # the flow's writer at once, so a worker has no reason to linger: during a burst of new
        # flows, lingering workers are most of the transient peak that stays in RSS.
        settings.queueing.idle_timeout = 0.5
        if self.standalone:
            settings.peering.standalone = True
        else:
            settings.peering.name = self.peering or "taskflow-operator"
            settings.peering.mandatory = True
            settings.peering.clusterwide = True
        self.kube = Kube(load_api_client(self.kubeconfig))
        key = key_from_file(self.key_file) if self.key_file else None
        self.bus = await Bus.connect(self.nats, self.runner_settings.subjects)
        if key is None:
            key = await key_from_nats(self.bus.js)
        # Reply subjects, journal entries and event ids are signed with the key from here on.
        subjects = dataclasses.replace(self.runner_settings.subjects, key=key)
        self.runner_settings = dataclasses.replace(self.runner_settings, subjects=subjects)
        self.bus.subjects = subjects
        self.tenants = Tenants(
            kube=self.kube,
            main=self.bus,
            nats=self.nats,
            subjects=subjects,
            credentials_namespace=self.credentials_namespace,
            require_policy=self.require_policy,
        )
        self.registry = Registry(
            kube=self.kube, bus=self.bus, settings=self.runner_settings, tenants=self.tenants
        )
        self.slots = Slots(self.bus.js, lease_s=self.slot_lease_s)
        await self.slots.start()
        self.slots.on_change = self.registry.wake_throttled
        self.registry.slots = self.slots
        if self.service_limits:
            self.limits = ServiceLimits(kube=self.kube, nc=self.bus.nc, poll_s=self.service_poll_s)
            self.limits.on_change = self.registry.wake_throttled
            self.limits.start()
            self.registry.limits = self.limits
        self.reaper = Reaper(kube=self.kube, bus=self.bus, defaults=self.ttl)
        self.registry.reaper = self.reaper
        self.reaper.start()
        self.scheduler = Scheduler(kube=self.kube)
        self.scheduler.start()
        if self.webhook is not None:
            from taskflow.shell.webhook import serve_webhook

            address, cert_file, key_file = self.webhook
            self._webhook_runner = await serve_webhook(
                address=address, cert_file=cert_file, key_file=key_file
            )
        self.tenants.on_reply = self.registry.on_reply
        self.tenants.on_heartbeat = self.registry.on_heartbeat
        self.tenants.on_reconnected = self.registry.on_reconnected
        self.tenants.on_dropped = self.registry.on_dropped
        # Before any flow runs: no dispatch may go out before its namespace's policy is known.
        await self.tenants.load(self.namespaces)
        self.registry.unfinished = await self.bus.journal_keys()
        self.bus.on_dropped = self.registry.on_dropped
        self.bus.on_reconnected = self.registry.on_reconnected
        await self.bus.subscribe_replies(self.registry.on_reply)
        await self.bus.subscribe_heartbeats(self.registry.on_heartbeat)
        if self.bucket_settings is not None:
            self.buckets = Buckets(
                kube=self.kube,
                settings=self.bucket_settings,
                on_take=self.registry.take_bucket,
                on_lose=self.registry.drop_bucket,
            )
            self.registry.buckets = self.buckets
            self.registry.namespaces = self.namespaces
            self.buckets.start()
        # Everything allocated so far lives as long as the process: keep it out of the
        # collector's scans, which otherwise grow with every active flow.
        gc.freeze()
        if self.serve_nats_api:
            from taskflow.shell.natsapi import serve_api

            own = await self.bus.account() if self.nats_api_users else None
            await serve_api(
                self.bus.nc,
                self.kube.api_client,
                namespaces=self.api_namespaces,
                prefix=self.runner_settings.subjects.api_prefix,
                nats_users=self.nats_api_users,
                own_account=own,
            )
        log.info("connected to NATS; watching taskflows")

    async def cleanup(self, **_: Any) -> None:
        if self.buckets:
            self.buckets.closing = True  # renewed while the writers stop, then given back
        if self.registry:
            await self.registry.close()
        if self.buckets:
            await self.buckets.close()
        if self.tenants:
            await self.tenants.close()
        if self.reaper:
            await self.reaper.close()
        if self.scheduler:
            await self.scheduler.close()
        if self.slots:
            await self.slots.close()
        if self.limits:
            await self.limits.close()
        if self._webhook_runner is not None:
            await self._webhook_runner.cleanup()
        if self.bus:
            await self.bus.close()
        if self.kube:
            self.kube.close()

    async def on_event(self, event: dict[str, Any], **_: Any) -> None:
        if self.registry is None or not isinstance(event.get("object"), dict):
            return
        self.registry.observe(event.get("type"), event["object"])

    async def on_cron(self, event: dict[str, Any], **_: Any) -> None:
        if self.scheduler is not None and isinstance(event.get("object"), dict):
            self.scheduler.observe(event.get("type"), event["object"])

    async def on_limit(self, event: dict[str, Any], **_: Any) -> None:
        if self.limits is not None and isinstance(event.get("object"), dict):
            self.limits.observe(event.get("type"), event["object"])

    async def on_policy(self, event: dict[str, Any], **_: Any) -> None:
        if self.tenants is not None and isinstance(event.get("object"), dict):
            self.tenants.observe(event.get("type"), event["object"])

    async def probe(self, **_: Any) -> str:
        if self.bus is None or not self.bus.nc.is_connected:
            raise RuntimeError("not connected to NATS")
        return "connected"
