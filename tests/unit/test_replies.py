"""Reading untrusted replies, table-driven: every message becomes an engine input, never an
exception, and what is accepted can be kept by status, the journal, the API and events."""

from __future__ import annotations

import json
from typing import Any

import pytest

from taskflow.api.spec import TaskflowSpec
from taskflow.api.status import FlowPhase, Status, TaskflowStatus
from taskflow.engine import BAD_REPLY, NoResponders, Reply, decide, quarantine
from taskflow.wire import journal
from taskflow.wire.replies import ReplyLimits, read_reply

LIMITS = ReplyLimits()
UID = "00000000-0000-0000-0000-000000000001"


def read(
    data: bytes | str, headers: dict[str, str] | None = None, limits: ReplyLimits = LIMITS
) -> Any:
    raw = data.encode() if isinstance(data, str) else data
    return read_reply(stage="s", task="t", attempt=0, data=raw, headers=headers, limits=limits)


def nested(levels: int) -> str:
    return "[" * levels + "]" * levels


@pytest.mark.parametrize(
    ("body", "says"),
    [
        ("not json", "not valid JSON"),
        (b"\xff\xfe\x00garbage", "not valid JSON"),
        ("[1, 2]", 'is not {"success"'),
        ('{"success": "yes"}', 'is not {"success"'),
        ('{"success": true, "data": ' + nested(300) + "}", "more than 64 levels"),
        ('{"success": true, "data": ' + nested(5000) + "}", "more than 64 levels"),
        ('{"success": true, "data": NaN}', "NaN is not a JSON number"),
        ('{"success": true, "data": -Infinity}', "-Infinity is not a JSON number"),
        ('{"success": true, "data": 1e400}', "out of range"),
        ('{"success": true, "data": 99999999999999999999}', "does not fit in 64 bits"),
        ('{"success": true, "data": ' + "9" * 5000 + "}", "not valid JSON"),
        ('{"success": true, "data": "\\ud800"}', "not valid Unicode"),
        ('{"success": true, "data": {"\\udfff": 1}}', "not valid Unicode"),
    ],
)
def test_an_unusable_body_fails_the_attempt_with_bad_reply(body: str | bytes, says: str) -> None:
    item = read(body)
    assert isinstance(item, Reply) and not item.ok
    assert item.error is not None and item.error.reason == BAD_REPLY
    assert says in item.error.message


def test_the_deepest_accepted_body_is_kept_by_every_serialiser() -> None:
    item = read('{"success": true, "data": ' + nested(63) + "}")
    assert isinstance(item, Reply) and item.ok
    decision = run_with(item)
    journal.decode(journal.encode(decision.status))
    json.dumps(decision.status.model_dump(by_alias=True, exclude_none=True, mode="json"))


def test_a_reply_over_the_size_limit_is_refused() -> None:
    item = read('{"success": true, "data": "' + "x" * 200 + '"}', limits=ReplyLimits(max_bytes=100))
    assert isinstance(item, Reply) and item.error is not None
    assert item.error.message.startswith("reply of 229 bytes exceeds the limit of 100 bytes")


def test_long_service_error_headers_are_cut_and_say_so() -> None:
    item = read(b"", {"Nats-Service-Error": "e" * 5000, "Nats-Service-Error-Code": "4" * 400})
    assert isinstance(item, Reply) and not item.ok and item.error is not None
    assert item.error.reason == "Service"
    assert item.error.code is not None and item.error.code.startswith("4" * 128)
    assert item.error.code.endswith("[code cut from 400 characters]")
    assert item.error.message.endswith("[message cut from 5000 characters]")


def test_a_large_error_is_bounded_and_says_what_was_dropped() -> None:
    body = {
        "success": False,
        "error": {"message": "m" * 200_000, "code": 7, "data": {"blob": "d" * 300_000}},
    }
    item = read(json.dumps(body))
    assert isinstance(item, Reply) and item.error is not None
    assert item.error.data is None and item.error.code == "7"
    assert "[message cut from 200000 characters]" in item.error.message
    assert "[error.data of 300011 bytes dropped: over the limit of 32768]" in item.error.message
    size = len(journal.encode(run_with(item).status))
    assert size < 8 * 1024, size  # was ~885 KB of object from one reply


def test_small_error_data_is_kept() -> None:
    item = read('{"success": false, "error": {"message": "no", "data": {"why": [1, 2]}}}')
    assert isinstance(item, Reply) and item.error is not None
    assert item.error.data == {"why": [1, 2]} and item.error.message == "no"


def test_control_messages() -> None:
    assert isinstance(read(b"", {"Status": "503"}), NoResponders)
    assert read(b"", {"Status": "408"}) is None


def test_children_are_named_once_and_capped() -> None:
    refs = [f"ns/c{i}" for i in range(3)] + ["ns/c0", "bad", 7]
    item = read(json.dumps({"success": True, "data": 1, "nestedTaskflows": refs}))
    assert isinstance(item, Reply) and item.children == ("ns/c0", "ns/c1", "ns/c2")
    many = read(json.dumps({"success": True, "nestedTaskflows": [f"n/c{i}" for i in range(101)]}))
    assert isinstance(many, Reply) and not many.ok and many.error is not None
    assert many.error.reason == "Child"


SPEC = TaskflowSpec.model_validate(
    {
        "stages": [
            {
                "name": "s",
                "tasks": [{"name": "t", "taskDetails": {"serviceId": "svc", "actionName": "t"}}],
            }
        ]
    }
)
T0 = 1_700_000_000_000


def run_with(item: Any) -> Any:
    first = decide(
        spec=SPEC, status=TaskflowStatus(), now=T0, uid=UID, generation=1, event_subject="e"
    )
    return decide(
        spec=SPEC,
        status=first.status,
        now=T0 + 1,
        inputs=[item],
        uid=UID,
        generation=1,
        event_subject="e",
    )


def test_quarantine_turns_an_unrecordable_reply_into_a_bad_reply() -> None:
    first = decide(
        spec=SPEC, status=TaskflowStatus(), now=T0, uid=UID, generation=1, event_subject="e"
    )
    deep: Any = []
    for _ in range(300):  # what read_reply would refuse, as if it came another way
        deep = [deep]
    poison = Reply(stage="s", task="t", attempt=0, ok=True, data=deep)
    fine = Reply(stage="x", task="y", attempt=0, ok=True, data=1)
    cleaned = quarantine(
        spec=SPEC,
        status=first.status,
        inputs=[poison, fine],
        now=T0 + 1,
        uid=UID,
        generation=1,
        event_subject="e",
    )
    assert cleaned[1] is fine
    bad = cleaned[0]
    assert isinstance(bad, Reply) and not bad.ok and bad.error is not None
    assert bad.error.reason == BAD_REPLY
    assert "Maximum serialization depth exceeded" in bad.error.message
    after = decide(
        spec=SPEC,
        status=first.status,
        now=T0 + 1,
        inputs=cleaned,
        uid=UID,
        generation=1,
        event_subject="e",
    )
    assert after.status.phase == FlowPhase.FAILED
    assert after.status.stages[0].tasks[0].status == Status.FAILED
    journal.encode(after.status)


def test_journal_round_trip_and_the_newer_copy() -> None:
    first = decide(
        spec=SPEC, status=TaskflowStatus(), now=T0, uid=UID, generation=1, event_subject="e"
    ).status
    first.write_seq = 3
    copy = journal.decode(journal.encode(first))
    assert copy == first
    older = first.model_copy(update={"write_seq": 2})
    assert journal.resume_from(older, copy) is copy
    assert journal.resume_from(first, copy) is first
    assert journal.resume_from(first, None) is first
    with pytest.raises(ValueError, match="journal entry unreadable"):
        journal.decode(b'{"stages": 7}')
