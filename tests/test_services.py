"""``kubectl taskflow services`` and ``taskflow.client.list_services``: which services answer
on NATS (the Services API), with their instances, endpoints, stats and the flags the operator
reads; the SDK advertising its capacity.

The integration tests run SDK services and a bare ``nats.micro`` service on the real
nats-server and the real ``kubectl-taskflow`` binary as a subprocess; the rest is the pure
reading and formatting, with hostile answers.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nats.micro import add_service
from nats.micro.service import ServiceError

from taskflow.client import LiveService, list_services
from taskflow.client.services import (
    CAPACITY,
    IDEMPOTENT,
    MAX_TEXT,
    check_request,
    gather_services,
    read_instance,
)
from taskflow.devstack.servers import NatsServer, find_binaries
from taskflow.plugin import capacity_text, nothing_answers, processing_time, render_services
from taskflow.sdk import Service, TaskContext

PLUGIN = str(Path(sys.executable).parent / "kubectl-taskflow")


# -- on the real servers -----------------------------------------------------------------------


async def kubectl_taskflow(nats_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    """The plugin as users run it (on a thread: the services answer from this event loop)."""
    env = {**os.environ}
    env.pop("NATS_URL", None)
    return await asyncio.to_thread(
        subprocess.run,
        [PLUGIN, "services", *args, "--nats-url", nats_url],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


async def services_json(nats_url: str, *args: str) -> dict[str, dict[str, Any]]:
    result = await kubectl_taskflow(nats_url, *args, "-o", "json")
    assert result.returncode == 0, result.stderr
    return {s["name"]: s for s in json.loads(result.stdout)}


@pytest.fixture
async def fleet(stack, nc, svc: str) -> AsyncIterator[dict[str, Any]]:  # type: ignore[no-untyped-def]
    """Two SDK instances of ``svc`` (max_concurrency=4, actions ``build`` and ``inspect``) and
    a bare nats.micro service ``<svc>-plain`` (endpoint ``charge`` declares itself idempotent,
    fails when asked ``{"bad": true}``)."""
    instances = []
    for _ in range(2):
        service = Service(svc, nats_url=stack.nats.url, max_concurrency=4)

        @service.action("build")
        async def build(params: dict[str, Any], ctx: TaskContext) -> dict[str, Any]:
            return params

        @service.action("inspect")
        async def inspect(params: dict[str, Any], ctx: TaskContext) -> dict[str, Any]:
            return params

        instances.append(await service.start())

    async def charge(request: Any) -> None:
        if json.loads(request.data or b"{}").get("bad"):
            raise ServiceError("400", "bad amount")
        await request.respond(b'{"success": true, "data": "charged"}')

    plain = await add_service(nc, name=f"{svc}-plain", version="2.1.0", queue_group="billing")
    await plain.add_endpoint(
        name="charge", subject=f"{svc}-plain.charge", handler=charge, metadata={IDEMPOTENT: "true"}
    )
    await nc.flush()
    yield {"sdk": instances, "plain": f"{svc}-plain"}
    await plain.stop()
    for service in instances:
        await service.stop(grace=0.5)


@pytest.mark.integration
async def test_lists_instances_endpoints_capacity_and_flags(
    stack,  # type: ignore[no-untyped-def]
    fleet: dict[str, Any],
    svc: str,
) -> None:
    listing = await services_json(stack.nats.url)

    sdk = listing[svc]
    assert sdk["instanceCount"] == 2
    assert sdk["versions"] == ["1.0.0"]
    assert sdk["idempotent"] is True
    assert sdk["capacity"] == 8
    assert [i["capacity"] for i in sdk["instances"]] == [4, 4]
    assert all(i["metadata"][CAPACITY] == "4" for i in sdk["instances"])
    assert [
        (e["name"], e["subject"], e["queueGroup"], e["instances"]) for e in sdk["endpoints"]
    ] == [
        ("build", f"{svc}.build", svc, 2),
        ("inspect", f"{svc}.inspect", svc, 2),
    ]
    plain = listing[f"{svc}-plain"]
    assert plain["instanceCount"] == 1
    assert plain["versions"] == ["2.1.0"]
    assert plain["idempotent"] is False  # the service does not say; its endpoint does
    assert plain["capacity"] is None
    assert [(e["subject"], e["queueGroup"], e["idempotent"]) for e in plain["endpoints"]] == [
        (f"{svc}-plain.charge", "billing", True)
    ]

    text = await kubectl_taskflow(stack.nats.url)
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    head = next(line for line in lines if line.startswith(f"{svc}  "))
    assert head == f"{svc}  1.0.0  2 instances  idempotent  capacity 8 (4 per instance)"
    plain_head = next(line for line in lines if line.startswith(f"{svc}-plain  "))
    assert plain_head == f"{svc}-plain  2.1.0  1 instance"
    charge = next(line for line in lines if f"{svc}-plain.charge" in line)
    assert charge.split() == [
        "charge",
        f"{svc}-plain.charge",
        "billing",
        "0",
        "0",
        "-",
        "idempotent",
    ]


@pytest.mark.integration
async def test_stats_count_requests_errors_and_processing_time(
    stack,  # type: ignore[no-untyped-def]
    nc,  # type: ignore[no-untyped-def]
    fleet: dict[str, Any],
    svc: str,
) -> None:
    for i in range(5):
        await nc.request(f"{svc}.build", json.dumps({"i": i}).encode(), timeout=5)
    for bad in (False, True, False):
        await nc.request(f"{svc}-plain.charge", json.dumps({"bad": bad}).encode(), timeout=5)

    listing = await services_json(stack.nats.url)

    build, inspect = listing[svc]["endpoints"]
    assert (build["requests"], build["errors"]) == (5, 0)  # summed over both instances
    assert build["averageProcessingTimeNs"] > 0
    assert (inspect["requests"], inspect["averageProcessingTimeNs"]) == (0, None)
    (charge,) = listing[f"{svc}-plain"]["endpoints"]
    assert (charge["requests"], charge["errors"]) == (3, 1)
    assert charge["processingTimeNs"] >= charge["averageProcessingTimeNs"] > 0

    text = await kubectl_taskflow(stack.nats.url, fleet["plain"])
    row = next(line for line in text.stdout.splitlines() if f"{svc}-plain.charge" in line)
    assert row.split()[3:5] == ["3", "1"]


@pytest.mark.integration
async def test_a_service_name_shows_only_that_service(
    stack,  # type: ignore[no-untyped-def]
    fleet: dict[str, Any],
    svc: str,
) -> None:
    assert list(await services_json(stack.nats.url, svc)) == [svc]  # not <svc>-plain
    assert list(await services_json(stack.nats.url, fleet["plain"])) == [fleet["plain"]]

    text = await kubectl_taskflow(stack.nats.url, svc)
    assert text.returncode == 0, text.stderr
    assert text.stdout.splitlines()[0].startswith(f"{svc}  1.0.0  2 instances")
    assert f"{svc}-plain" not in text.stdout


@pytest.mark.integration
async def test_the_client_returns_typed_services_and_the_sdk_says_capacity_only_when_bounded(
    stack,  # type: ignore[no-untyped-def]
    nc,  # type: ignore[no-untyped-def]
    fleet: dict[str, Any],
    svc: str,
) -> None:
    unbounded = await Service(f"{svc}-open", nats_url=stack.nats.url).start()
    try:
        (bounded,) = await list_services(nc, name=svc)
        (open_,) = await list_services(nc, name=f"{svc}-open", timeout=0.3)
    finally:
        await unbounded.stop(grace=0.5)

    assert isinstance(bounded, LiveService)
    assert (len(bounded.instances), bounded.capacity, bounded.idempotent) == (2, 8, True)
    assert [i.metadata[CAPACITY] for i in bounded.instances] == ["4", "4"]
    assert CAPACITY not in open_.instances[0].metadata
    assert (open_.capacity, open_.idempotent) == (None, True)


@pytest.mark.integration
async def test_nothing_listening_prints_a_clear_line(
    stack,  # type: ignore[no-untyped-def]
    tmp_path: Path,
    svc: str,
) -> None:
    empty = NatsServer(tmp_path / "nats", find_binaries(("nats-server",))["nats-server"])
    empty.start()
    try:
        result = await kubectl_taskflow(empty.url)
        as_json = await kubectl_taskflow(empty.url, "-o", "json")
    finally:
        empty.stop()
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout == (
        f"no service answers on NATS at {empty.url} (NATS Services API, $SRV.INFO)\n"
    )
    assert (as_json.returncode, json.loads(as_json.stdout)) == (0, [])

    # On a busy server too, a name nobody serves is the same clear line.
    named = await kubectl_taskflow(stack.nats.url, f"{svc}-nobody")
    assert (named.returncode, named.stderr) == (0, "")
    assert named.stdout.startswith(f"no instance of service {svc}-nobody answers on NATS at ")


@pytest.mark.integration
async def test_a_bad_service_name_or_timeout_is_one_error_line(stack) -> None:  # type: ignore[no-untyped-def]
    for args, message in [
        (["a.b"], "error: 'a.b' is not a service name"),
        (["--timeout", "0"], "error: the timeout must be more than 0"),
    ]:
        result = await kubectl_taskflow(stack.nats.url, *args)
        assert result.returncode == 1
        assert result.stderr.startswith(message), result.stderr
        assert len(result.stderr.splitlines()) == 1


# -- reading answers (pure) --------------------------------------------------------------------


def info(
    id_: str,
    *,
    name: str = "appliance-core",
    version: str = "1.0.0",
    metadata: dict[str, Any] | None = None,
    endpoints: list[dict[str, Any]] | None = None,
) -> bytes:
    return json.dumps(
        {
            "type": "io.nats.micro.v1.info_response",
            "id": id_,
            "name": name,
            "version": version,
            "description": f"taskflow service {name}",
            "metadata": metadata or {},
            "endpoints": endpoints
            if endpoints is not None
            else [{"name": "add", "subject": f"{name}.add", "queue_group": name, "metadata": None}],
        }
    ).encode()


def stats(
    id_: str,
    *,
    name: str = "appliance-core",
    endpoint: str = "add",
    requests: int,
    errors: int,
    ns: int,
) -> bytes:
    return json.dumps(
        {
            "type": "io.nats.micro.v1.stats_response",
            "id": id_,
            "name": name,
            "version": "1.0.0",
            "metadata": {},
            "started": "2026-01-01T00:00:00.000Z",
            "endpoints": [
                {
                    "name": endpoint,
                    "subject": f"{name}.{endpoint}",
                    "queue_group": name,
                    "num_requests": requests,
                    "num_errors": errors,
                    "last_error": "",
                    "processing_time": ns,
                    "average_processing_time": ns // requests if requests else 0,
                    "data": None,
                }
            ],
        }
    ).encode()


SDK = {"taskflow.dev/sdk": "python", IDEMPOTENT: "true", CAPACITY: "4"}


def test_instances_are_grouped_by_name_and_their_stats_summed() -> None:
    (service,) = gather_services(
        infos=[info("b", metadata=SDK), info("a", metadata=SDK), info("a", metadata={})],
        stats=[
            stats("a", requests=3, errors=1, ns=3_000),
            stats("b", requests=1, errors=0, ns=5_000),
        ],
    )
    assert [i.id for i in service.instances] == ["a", "b"]  # the first answer of an id counts
    assert (service.versions, service.capacity, service.idempotent) == (("1.0.0",), 8, True)
    (add,) = service.endpoints
    assert (add.subject, add.queue_group, add.instances) == (
        "appliance-core.add",
        "appliance-core",
        2,
    )
    assert (add.requests, add.errors, add.processing_ns, add.average_processing_ns) == (
        4,
        1,
        8_000,
        2_000,
    )


def test_an_instance_that_answered_only_one_verb_is_still_live() -> None:
    services = gather_services(
        infos=[info("a", name="billing")],
        stats=[stats("z", name="audit", requests=2, errors=0, ns=10)],
    )
    assert [(s.name, len(s.instances), s.endpoints[0].requests) for s in services] == [
        ("audit", 1, 2),
        ("billing", 1, 0),
    ]


def test_instances_that_disagree_are_shown_apart() -> None:
    other_group = [{"name": "add", "subject": "appliance-core.add", "queue_group": "other"}]
    (service,) = gather_services(
        infos=[
            info("a", metadata=SDK),
            info("b", version="1.1.0", metadata={CAPACITY: "2"}),
            info("c", endpoints=other_group),
        ],
        stats=[],
    )
    assert service.versions == ("1.0.0", "1.1.0")
    assert (service.capacity, service.idempotent, service.idempotent_instances) == (None, False, 1)
    assert [(e.queue_group, e.instances) for e in service.endpoints] == [
        ("appliance-core", 2),
        ("other", 1),
    ]


def test_the_name_filter_and_unreadable_answers() -> None:
    services = gather_services(
        infos=[
            info("a"),
            info("b", name="billing"),
            b"",
            b"not json",
            b"[1, 2]",
            b'{"id": 3, "name": "x"}',
            b'{"id": "c"}',
            b"[" * 100_000,
        ],
        stats=[b'{"id": "a", "name": "appliance-core", "endpoints": "many"}'],
        name="billing",
    )
    assert [(s.name, [i.id for i in s.instances]) for s in services] == [("billing", ["b"])]


@pytest.mark.parametrize(
    ("value", "capacity"),
    [
        ("4", 4),
        (" 12 ", 12),
        ("0", None),
        ("-1", None),
        ("4.5", None),
        ("²", None),
        ("", None),
        ("99999999999", None),
    ],
)
def test_capacity_is_a_positive_whole_number_or_nothing(value: str, capacity: int | None) -> None:
    instance = read_instance(info("a", metadata={CAPACITY: value}))
    assert instance is not None and instance.capacity == capacity


def test_hostile_fields_are_cut_cleaned_and_typed() -> None:
    instance = read_instance(
        json.dumps(
            {
                "id": "a",
                "name": "evil\x1b[31mred",
                "version": ["1"],
                "metadata": {IDEMPOTENT: True, "n": 3, "deep": {"x": 1}, "long": "x" * 10_000},
                "endpoints": [
                    {
                        "subject": "s.a",
                        "num_requests": True,
                        "num_errors": -1,
                        "processing_time": 1e400,
                    },
                    {"subject": 7},
                    "nope",
                    {
                        "name": "b",
                        "subject": "s.b",
                        "num_requests": 2,
                        "average_processing_time": 50,
                    },
                ],
            }
        ).encode()
    )
    assert instance is not None
    assert (instance.name, instance.version) == ("evil?[31mred", "")
    assert instance.metadata == {IDEMPOTENT: "True", "n": "3", "long": "x" * MAX_TEXT}
    assert instance.idempotent  # as the operator reads it: "true" in any case
    first, second = instance.endpoints
    assert (first.name, first.requests, first.errors, first.processing_ns) == ("s.a", 0, 0, 0)
    assert (second.requests, second.processing_ns) == (2, 100)  # only the average given


@settings(max_examples=300, deadline=None)
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
        lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(), inner, max_size=5),
        max_leaves=30,
    ).map(lambda doc: json.dumps(doc).encode())
    | st.binary(max_size=200)
    | st.fixed_dictionaries(
        {"id": st.text(max_size=5), "name": st.text(max_size=5)},
        optional={
            "version": st.integers() | st.text(),
            "metadata": st.dictionaries(
                st.text(max_size=30), st.integers() | st.text() | st.none()
            ),
            "endpoints": st.lists(
                st.dictionaries(
                    st.sampled_from(
                        [
                            "name",
                            "subject",
                            "queue_group",
                            "num_requests",
                            "num_errors",
                            "processing_time",
                            "average_processing_time",
                            "metadata",
                        ]
                    ),
                    st.integers() | st.floats() | st.text() | st.none() | st.booleans(),
                ),
                max_size=4,
            ),
        },
    ).map(lambda doc: json.dumps(doc).encode())
)
def test_any_answer_is_read_or_left_out_never_raised(data: bytes) -> None:
    for service in gather_services(infos=[data], stats=[data]):
        json.dumps(service.as_json())
        render_services([service])
        for endpoint in service.endpoints:
            assert 0 <= endpoint.requests < 2**63 and 0 <= endpoint.processing_ns < 2**63
        assert all(len(i.name) <= MAX_TEXT and i.name.isprintable() for i in service.instances)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "a.b", "timeout": 0.5}, "is not a service name"),
        ({"name": "$SRV", "timeout": 0.5}, "is not a service name"),
        ({"name": ">", "timeout": 0.5}, "is not a service name"),
        ({"name": None, "timeout": 0.0}, "the timeout must be"),
        ({"name": None, "timeout": float("nan")}, "the timeout must be"),
        ({"name": None, "timeout": 3600.0}, "the timeout must be"),
    ],
)
def test_requests_that_would_ask_the_wrong_subjects_or_wait_for_ever(
    kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        check_request(**kwargs)
    check_request(name="appliance-core_2", timeout=0.5)


# -- formatting (pure) -------------------------------------------------------------------------


def test_the_listing_as_text() -> None:
    services = gather_services(
        infos=[
            info("a", metadata=SDK),
            info("b", metadata=SDK, endpoints=[]),
            info(
                "p",
                name="billing",
                version="2.1.0",
                endpoints=[
                    {
                        "name": "charge",
                        "subject": "billing.charge",
                        "queue_group": "q",
                        "metadata": {IDEMPOTENT: "true"},
                    },
                ],
            ),
        ],
        stats=[
            stats("a", requests=12, errors=0, ns=12 * 310_000),
            stats("p", name="billing", endpoint="charge", requests=3, errors=1, ns=3 * 1_400_000),
        ],
    )
    text = ["".join(t for t, _ in line) for line in render_services(services)]
    assert text == [
        "appliance-core  1.0.0  2 instances  idempotent  capacity 8 (4 per instance)",
        "  ENDPOINT  SUBJECT             QUEUE GROUP     REQUESTS  ERRORS  AVG TIME",
        "  add       appliance-core.add  appliance-core        12       0     310µs"
        "  on 1 of 2 instances",
        "",
        "billing  2.1.0  1 instance",
        "  ENDPOINT  SUBJECT         QUEUE GROUP  REQUESTS  ERRORS  AVG TIME",
        "  charge    billing.charge  q                   3       1     1.4ms  idempotent",
    ]
    errors = next(s for t, s in render_services(services)[-1] if t.strip() == "1")
    assert errors == "red"


def test_a_service_without_endpoints_says_so() -> None:
    (service,) = gather_services(infos=[info("a", endpoints=[])], stats=[])
    assert ["".join(t for t, _ in line) for line in render_services([service])][1:] == [
        "  (no endpoints)"
    ]


@pytest.mark.parametrize(
    ("capacities", "text"),
    [
        (["4", "4"], "capacity 8 (4 per instance)"),
        (["4", "2"], "capacity 6 (4 + 2)"),
        (["4", None], "capacity unbounded (1 of 2 instances declare one)"),
        ([None, None], ""),
    ],
)
def test_capacity_text(capacities: list[str | None], text: str) -> None:
    infos = [info(str(i), metadata={CAPACITY: c} if c else {}) for i, c in enumerate(capacities)]
    (service,) = gather_services(infos=infos, stats=[])
    assert capacity_text(service) == text


@pytest.mark.parametrize(
    ("ns", "text"),
    [
        (None, "-"),
        (0, "0ns"),
        (999, "999ns"),
        (31_000, "31µs"),
        (1_400_000, "1.4ms"),
        (2_500_000_000, "2.50s"),
    ],
)
def test_processing_time(ns: int | None, text: str) -> None:
    assert processing_time(ns) == text


def test_nothing_answers_names_what_was_asked_and_where() -> None:
    url = "nats://127.0.0.1:4222"
    assert nothing_answers(service=None, nats_url=url) == (
        "no service answers on NATS at nats://127.0.0.1:4222 (NATS Services API, $SRV.INFO)"
    )
    assert nothing_answers(service="billing", nats_url=url).startswith(
        "no instance of service billing answers on NATS at nats://127.0.0.1:4222"
    )
    assert nothing_answers(service=None, nats_url="nats://svc:s3cret@nats:4222").startswith(
        "no service answers on NATS at nats://nats:4222 "
    )
