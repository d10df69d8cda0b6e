"""Which services answer on NATS: the NATS Services API (``$SRV.INFO``, ``$SRV.STATS``) read
the way the operator reads it.

A task is a request to a service, so "is anyone serving ``appliance-core``, how many
instances, on which subjects and queue groups, idempotent, with what capacity, and how are its
endpoints doing" is the first question when a flow waits or fails. Every instance of a
Services API service (``nats.micro`` in any language, the SDK included) answers ``$SRV.INFO``
and ``$SRV.STATS`` at once; ``list_services`` asks both, waits a short window, and groups the
answers by service name::

    for service in await list_services(nc):
        print(service.name, len(service.instances), service.capacity)

The answers come from whoever is on the bus, so they are read as hostile: the parsers here
are total (a malformed answer is skipped, never raised) and bounded (answers, endpoints,
metadata and texts are cut), and texts lose control characters before anyone prints them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

# Metadata keys the operator reads (of the service, or of one endpoint for IDEMPOTENT).
# IDEMPOTENT: a repeated attempt (same Taskflow-Idempotency-Key) gets the first answer again,
# so an attempt whose reply may have been lost can be asked again (shell/bus.py reads it).
IDEMPOTENT = "taskflow.dev/idempotent"
# CAPACITY: how many requests one instance serves at once (the SDK's max_concurrency).
CAPACITY = "taskflow.dev/capacity"

DEFAULT_TIMEOUT = 0.5  # every instance answers at once: half a second is plenty on one cluster
MAX_TIMEOUT = 60.0
MAX_ANSWERS = 10_000  # per verb: more instances than this is not a listing anyone reads
MAX_ENDPOINTS = 1_000  # per instance
MAX_METADATA = 64  # entries per service or endpoint
MAX_TEXT = 256  # characters of a name, subject, version, description or metadata entry
MAX_CAPACITY = 1_000_000_000
_MAX_COUNT = 2**63 - 1  # Go's int64: what a Services API counter can be
# The Services API's own rule for a service name (nats.micro, Go's micro): also a subject token.
_SERVICE_NAME = re.compile(r"^[A-Za-z0-9_-]{1,256}$")
_CAPACITY_VALUE = re.compile(r"^[0-9]{1,10}$")
_NO_RESPONDERS = "503"


# -- what a listing holds -----------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class InstanceEndpoint:
    """One endpoint of one instance: what ``$SRV.INFO`` says of it and ``$SRV.STATS`` counts."""

    name: str
    subject: str
    queue_group: str
    metadata: Mapping[str, str]
    requests: int = 0
    errors: int = 0
    processing_ns: int = 0  # total time the instance spent in the endpoint's handler

    @property
    def key(self) -> tuple[str, str]:
        return self.name, self.subject


@dataclass(frozen=True, kw_only=True)
class Instance:
    """One running copy of a service, as it describes itself."""

    id: str
    name: str
    version: str
    description: str
    metadata: Mapping[str, str]
    endpoints: tuple[InstanceEndpoint, ...]

    @property
    def idempotent(self) -> bool:
        return is_flag_set(self.metadata, IDEMPOTENT)

    @property
    def capacity(self) -> int | None:
        """Requests this instance serves at once, if it says (``taskflow.dev/capacity``)."""
        return read_capacity(self.metadata)


@dataclass(frozen=True, kw_only=True)
class Endpoint:
    """One endpoint of a service, over every instance that serves it on that queue group.

    Instances that disagree on the queue group are two rows, not one: each group gets every
    request, so such a service runs each task twice, and the listing should show it.
    """

    name: str
    subject: str
    queue_group: str
    instances: int
    idempotent: bool  # every instance serving it says so (of the service or of the endpoint)
    requests: int
    errors: int
    processing_ns: int

    @property
    def average_processing_ns(self) -> int | None:
        return self.processing_ns // self.requests if self.requests else None


@dataclass(frozen=True, kw_only=True)
class LiveService:
    """A service as it answers now: every instance that answered, grouped by service name."""

    name: str
    instances: tuple[Instance, ...]
    endpoints: tuple[Endpoint, ...]

    @property
    def versions(self) -> tuple[str, ...]:
        """More than one during a rolling upgrade."""
        return tuple(sorted({i.version for i in self.instances}))

    @property
    def description(self) -> str:
        return next((i.description for i in self.instances if i.description), "")

    @property
    def idempotent_instances(self) -> int:
        return sum(1 for i in self.instances if i.idempotent)

    @property
    def idempotent(self) -> bool:
        return self.idempotent_instances == len(self.instances) > 0

    @property
    def capacity(self) -> int | None:
        """Requests the service serves at once: the sum of its instances' capacities, or None
        (unbounded) when an instance does not say."""
        capacities = [i.capacity for i in self.instances]
        if not capacities or None in capacities:
            return None
        return sum(c for c in capacities if c is not None)

    def as_json(self) -> dict[str, Any]:
        """The listing for ``-o json`` and other programs (camelCase, like the details)."""
        return {
            "name": self.name,
            "description": self.description,
            "versions": list(self.versions),
            "instanceCount": len(self.instances),
            "idempotent": self.idempotent,
            "capacity": self.capacity,
            "endpoints": [_endpoint_json(e) for e in self.endpoints],
            "instances": [_instance_json(i) for i in self.instances],
        }


def _endpoint_json(endpoint: Endpoint) -> dict[str, Any]:
    return {
        "name": endpoint.name,
        "subject": endpoint.subject,
        "queueGroup": endpoint.queue_group,
        "instances": endpoint.instances,
        "idempotent": endpoint.idempotent,
        "requests": endpoint.requests,
        "errors": endpoint.errors,
        "processingTimeNs": endpoint.processing_ns,
        "averageProcessingTimeNs": endpoint.average_processing_ns,
    }


def _instance_json(instance: Instance) -> dict[str, Any]:
    return {
        "id": instance.id,
        "version": instance.version,
        "idempotent": instance.idempotent,
        "capacity": instance.capacity,
        "metadata": dict(instance.metadata),
    }


# -- asking NATS ---------------------------------------------------------------------------------


async def list_services(
    nc: Any, *, name: str | None = None, timeout: float = DEFAULT_TIMEOUT
) -> list[LiveService]:
    """The services that answer on ``nc``'s NATS (only ``name`` if given), by name.

    ``$SRV.INFO`` and ``$SRV.STATS`` are asked together and answered for ``timeout`` seconds
    (nothing says how many instances there are, so the whole window is waited for, unless NATS
    says at once that nobody listens). Empty when nothing answers.
    """
    check_request(name=name, timeout=timeout)
    infos, stats = await asyncio.gather(
        _ask(nc, subject=control_subject(verb="INFO", name=name), timeout=timeout),
        _ask(nc, subject=control_subject(verb="STATS", name=name), timeout=timeout),
    )
    return gather_services(infos=infos, stats=stats, name=name)


def check_request(*, name: str | None, timeout: float) -> None:
    """Refuse what would ask the wrong subjects or wait for ever, in the caller's words."""
    if name is not None and not _SERVICE_NAME.match(name):
        raise ValueError(
            f"{name!r} is not a service name (letters, digits, '-' and '_', as the NATS "
            "Services API allows)"
        )
    if not (0 < timeout <= MAX_TIMEOUT):
        raise ValueError(f"the timeout must be more than 0 and at most {MAX_TIMEOUT:g} s")


def control_subject(*, verb: str, name: str | None) -> str:
    """``$SRV.<verb>`` asks every service, ``$SRV.<verb>.<name>`` the instances of one."""
    return f"$SRV.{verb}" if name is None else f"$SRV.{verb}.{name}"


async def _ask(nc: Any, *, subject: str, timeout: float) -> list[bytes]:
    """Every answer to one Services API request within ``timeout`` seconds."""
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox, max_msgs=MAX_ANSWERS)
    answers: list[bytes] = []
    try:
        await nc.publish(subject, b"", reply=inbox)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                async for msg in sub.messages:
                    if _no_responders(msg):
                        break  # NATS says at once that no instance listens
                    answers.append(msg.data)
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
    return answers


def _no_responders(msg: Any) -> bool:
    headers = getattr(msg, "headers", None) or {}
    return not msg.data and headers.get("Status") == _NO_RESPONDERS


# -- reading the answers (pure, total, bounded) -----------------------------------------------


def gather_services(
    *, infos: Iterable[bytes], stats: Iterable[bytes], name: str | None = None
) -> list[LiveService]:
    """Services from raw ``$SRV.INFO`` and ``$SRV.STATS`` answers, sorted by name.

    An instance is live if it answered either (INFO is preferred for what it describes, STATS
    adds the counters); answers that cannot be read, or name another service than ``name``,
    are left out.
    """
    described = _by_id(infos)
    counted = _by_id(stats)
    instances = [
        _merge(described.get(id_), counted.get(id_)) for id_ in sorted({*described, *counted})
    ]
    by_name: dict[str, list[Instance]] = {}
    for instance in instances:
        if name is None or instance.name == name:
            by_name.setdefault(instance.name, []).append(instance)
    return [_service(name=n, instances=by_name[n]) for n in sorted(by_name)]


def _by_id(answers: Iterable[bytes]) -> dict[str, Instance]:
    found: dict[str, Instance] = {}
    for i, data in enumerate(answers):
        if i >= MAX_ANSWERS:
            break
        instance = read_instance(data)
        if instance is not None:
            found.setdefault(instance.id, instance)
    return found


def _merge(info: Instance | None, stats: Instance | None) -> Instance:
    """INFO's description of an instance with STATS' counters, endpoint by endpoint."""
    if info is None or stats is None:
        found = info or stats
        assert found is not None
        return found
    counters = {e.key: e for e in stats.endpoints}
    endpoints = [_counted(e, counters.get(e.key)) for e in info.endpoints]
    known = {e.key for e in info.endpoints}
    endpoints += [e for e in stats.endpoints if e.key not in known]
    return replace(info, endpoints=tuple(endpoints))


def _counted(endpoint: InstanceEndpoint, stats: InstanceEndpoint | None) -> InstanceEndpoint:
    if stats is None:
        return endpoint
    return replace(
        endpoint,
        requests=stats.requests,
        errors=stats.errors,
        processing_ns=stats.processing_ns,
    )


def _service(*, name: str, instances: Sequence[Instance]) -> LiveService:
    """One service's endpoints, summed over its instances, in the order they declared them."""
    rows: dict[tuple[str, str, str], list[tuple[Instance, InstanceEndpoint]]] = {}
    for instance in instances:
        for endpoint in instance.endpoints:
            key = (endpoint.name, endpoint.subject, endpoint.queue_group)
            rows.setdefault(key, []).append((instance, endpoint))
    endpoints = tuple(
        Endpoint(
            name=key[0],
            subject=key[1],
            queue_group=key[2],
            instances=len(served),
            idempotent=all(i.idempotent or is_flag_set(e.metadata, IDEMPOTENT) for i, e in served),
            requests=min(_MAX_COUNT, sum(e.requests for _, e in served)),
            errors=min(_MAX_COUNT, sum(e.errors for _, e in served)),
            processing_ns=min(_MAX_COUNT, sum(e.processing_ns for _, e in served)),
        )
        for key, served in rows.items()
    )
    return LiveService(name=name, instances=tuple(instances), endpoints=endpoints)


def read_instance(data: bytes) -> Instance | None:
    """One ``$SRV.INFO`` or ``$SRV.STATS`` answer, or None if it is not one."""
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError):
        return None
    if not isinstance(doc, dict):
        return None
    id_, name = _text(doc.get("id")), _text(doc.get("name"))
    if not id_ or not name:
        return None
    raw_endpoints = doc.get("endpoints")
    endpoints = raw_endpoints[:MAX_ENDPOINTS] if isinstance(raw_endpoints, list) else []
    return Instance(
        id=id_,
        name=name,
        version=_text(doc.get("version")) or "",
        description=_text(doc.get("description")) or "",
        metadata=read_metadata(doc.get("metadata")),
        endpoints=tuple(e for e in map(_read_endpoint, endpoints) if e is not None),
    )


def _read_endpoint(doc: Any) -> InstanceEndpoint | None:
    if not isinstance(doc, dict):
        return None
    subject = _text(doc.get("subject"))
    if not subject:
        return None
    requests = _count(doc.get("num_requests"))
    processing = _count(doc.get("processing_time"))
    if not processing and requests:  # only the average given
        processing = min(_MAX_COUNT, _count(doc.get("average_processing_time")) * requests)
    return InstanceEndpoint(
        name=_text(doc.get("name")) or subject,
        subject=subject,
        queue_group=_text(doc.get("queue_group")) or "",
        metadata=read_metadata(doc.get("metadata")),
        requests=requests,
        errors=_count(doc.get("num_errors")),
        processing_ns=processing,
    )


def read_metadata(value: Any) -> dict[str, str]:
    """Services API metadata: strings to strings. Numbers and booleans are kept as text (the
    operator reads ``True`` as ``"true"``); other values and keys are left out."""
    if not isinstance(value, dict):
        return {}
    metadata: dict[str, str] = {}
    for key, raw in list(value.items())[:MAX_METADATA]:
        text = _text(key)
        entry = _text(raw if isinstance(raw, str) else _scalar(raw))
        if text and entry is not None:
            metadata[text] = entry
    return metadata


def _scalar(value: Any) -> str | None:
    if isinstance(value, bool | int) or (isinstance(value, float) and math.isfinite(value)):
        return str(value)
    return None


def is_flag_set(metadata: Mapping[str, str], key: str) -> bool:
    """A metadata flag the way the operator reads it: ``"true"`` in any case."""
    return metadata.get(key, "").strip().lower() == "true"


def read_capacity(metadata: Mapping[str, str]) -> int | None:
    """``taskflow.dev/capacity``: a positive whole number of requests, else None (unbounded)."""
    raw = metadata.get(CAPACITY, "").strip()
    if not _CAPACITY_VALUE.match(raw):
        return None
    capacity = int(raw)
    return capacity if 0 < capacity <= MAX_CAPACITY else None


def _text(value: Any) -> str | None:
    """A string from the bus, cut, with control characters (terminal escapes) replaced."""
    if not isinstance(value, str):
        return None
    return "".join(c if c.isprintable() else "?" for c in value[:MAX_TEXT])


def _count(value: Any) -> int:
    """A Services API counter: a whole number from 0 to int64's top, else 0."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return 0
    if isinstance(value, float) and not math.isfinite(value):
        return 0
    return int(value) if 0 <= value <= _MAX_COUNT else 0


__all__ = [
    "CAPACITY",
    "DEFAULT_TIMEOUT",
    "IDEMPOTENT",
    "MAX_TIMEOUT",
    "Endpoint",
    "Instance",
    "InstanceEndpoint",
    "LiveService",
    "check_request",
    "gather_services",
    "list_services",
    "read_capacity",
    "read_instance",
]
