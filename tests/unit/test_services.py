"""What ``kubectl taskflow services`` and ``list_services`` make of Services API answers, by
table: instances grouped, stats summed, hostile fields cut, and the listing as text."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from taskflow.client.services import (
    CAPACITY,
    IDEMPOTENT,
    MAX_TEXT,
    check_request,
    gather_services,
    read_instance,
)
from taskflow.plugin import capacity_text, nothing_answers, processing_time, render_services

# -- on the real servers -----------------------------------------------------------------------


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
