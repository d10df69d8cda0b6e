"""The wire shapes encode and decode themselves: what the operator sends, a service reads back
unchanged; whatever anyone else sends decodes to "not one" (None, empty, or BadRequest),
never to an exception of another kind."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from taskflow.wire.api import (
    BadRequest,
    FlowRequest,
    HistoryRequest,
    ParentRef,
    ProduceRequest,
    RetryRequest,
    decode_object,
)
from taskflow.wire.cancel import Notice
from taskflow.wire.context import CONTEXT_HEADER, DEADLINE_HEADER, IDEMPOTENCY_HEADER
from taskflow.wire.request import AttemptKey, ExecutionContext, RequestHeaders

names = st.from_regex(r"[a-zA-Z0-9_-]{1,20}", fullmatch=True)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=10,
)


@given(uid=names, stage=names, task=names, attempt=st.integers(0, 10**12))
def test_an_attempt_key_reads_back_as_sent(uid: str, stage: str, task: str, attempt: int) -> None:
    key = AttemptKey(uid, stage, task, attempt)
    assert AttemptKey.decode(key.encode()) == key


@pytest.mark.parametrize(
    "text",
    [None, "", "a/b/c", "a/b/c/d/1", "a/b/c/x", "a/b/c/²", "a/b/c/" + "9" * 19, "/b/c/1", "a//c/1"],
)
def test_what_is_not_an_attempt_key_decodes_to_none(text: str | None) -> None:
    assert AttemptKey.decode(text) is None


def test_request_headers_read_back_as_sent() -> None:
    context = {"taskflow": {"id": "u1", "stageId": "s1", "taskInfo": {"name": "t", "attempt": 2}}}
    sent = RequestHeaders(
        context=ExecutionContext(context),
        key=AttemptKey("u1", "st", "t", 2).encode(),
        deadline=1_700_000_000_000,
        expires_at=1_700_000_100_000,
        heartbeat="taskflow.heartbeat.x",
    )
    headers = sent.encode()
    assert json.loads(headers[CONTEXT_HEADER]) == context  # the seed's JSON, as built
    got = RequestHeaders.decode(headers)
    assert got == sent
    assert got.attempt_key == AttemptKey("u1", "st", "t", 2)
    assert (got.context.taskflow_id, got.context.task_name, got.context.attempt) == ("u1", "t", 2)
    # No timers, no heartbeat: those headers are not sent at all.
    lean = RequestHeaders(context=ExecutionContext({}), key="k").encode()
    assert set(lean) == {CONTEXT_HEADER, IDEMPOTENCY_HEADER}


@given(headers=st.dictionaries(st.sampled_from([CONTEXT_HEADER, DEADLINE_HEADER, "x"]), st.text()))
def test_any_headers_decode_without_raising(headers: dict[str, str]) -> None:
    got = RequestHeaders.decode(headers)
    context = got.context
    # Every field is of its type or absent, whatever the JSON held.
    assert context.taskflow_id is None or isinstance(context.taskflow_id, str)
    assert context.attempt is None or isinstance(context.attempt, int)
    assert isinstance(context.options, dict) and isinstance(context.meta, dict)
    assert all(isinstance(item, dict) for item in context.previous_stage_responses)
    assert got.deadline is None or isinstance(got.deadline, int)


@given(value=json_values)
def test_any_context_json_decodes_to_typed_fields(value: object) -> None:
    context = ExecutionContext.decode(json.dumps({"taskflow": {"taskInfo": value, "id": value}}))
    assert context.taskflow_id is None or isinstance(context.taskflow_id, str)
    assert context.parent is None or isinstance(context.parent, dict)


def test_a_cancel_notice_reads_back_as_sent() -> None:
    notice = Notice(
        key="u/s/t/1",
        taskflow_id="u",
        stage="s",
        task="t",
        attempt=1,
        service_id="svc",
        action_name="act",
    )
    assert Notice.decode(notice.encode()) == notice
    assert json.loads(notice.encode())["idempotencyKey"] == "u/s/t/1"  # the documented field


@given(data=st.binary(max_size=200) | json_values.map(lambda v: json.dumps(v).encode()))
def test_what_is_not_a_cancel_notice_is_none_or_has_its_key(data: bytes) -> None:
    notice = Notice.decode(data)
    assert notice is None or (isinstance(notice.key, str) and notice.key)


def test_an_oversized_notice_is_not_read() -> None:
    big = json.dumps({"idempotencyKey": "k", "pad": "x" * 20_000}).encode()
    assert Notice.decode(big) is None


def test_api_requests_read_back_as_sent() -> None:
    produce = ProduceRequest(schema={"stages": []}, namespace="team-a", name="f")
    assert ProduceRequest.decode(decode_object(produce.encode())) == produce
    child = ProduceRequest(
        schema={"stages": []}, parent=ParentRef(context={"taskflow": {}}, key="u/s/t/1", index=2)
    )
    assert ProduceRequest.decode(decode_object(child.encode())) == child
    flow = FlowRequest(taskflow_id="team-a/f", wait=None)
    assert FlowRequest.decode(decode_object(flow.encode())) == flow
    retry = RetryRequest(flow=FlowRequest("u1", wait=5.0), stages=["s"], failed_only=True)
    assert RetryRequest.decode(decode_object(retry.encode())) == retry
    history = HistoryRequest(namespace="team-a", phase="FAILED", since_ms=5)
    assert HistoryRequest.decode(decode_object(history.encode())) == history


@pytest.mark.parametrize(
    ("shape", "body", "message"),
    [
        (ProduceRequest, {}, '"schema" (the TaskFlowSchema object) is required'),
        (ProduceRequest, {"schema": {}}, '"namespace" is required'),
        (ProduceRequest, {"schema": {}, "namespace": "n", "name": 3}, '"name" is a string'),
        (ProduceRequest, {"schema": {}, "parent": []}, '"parent" is an object'),
        (ProduceRequest, {"schema": {}, "parent": {}}, "taskflowExecutionContext"),
        (FlowRequest, {}, '"taskflowId"'),
        (FlowRequest, {"taskflowId": "u", "wait": "soon"}, '"wait" is a boolean or a number'),
        (RetryRequest, {"taskflowId": "u", "stages": "s"}, '"stages" is a list'),
        (HistoryRequest, {}, '"namespace" is required'),
    ],
)
def test_a_request_not_of_its_shape_is_refused_naming_the_field(
    shape: type, body: dict[str, object], message: str
) -> None:
    with pytest.raises(BadRequest, match=message.replace("(", r"\(").replace(")", r"\)")):
        shape.decode(body)


@pytest.mark.parametrize("data", [b"[1]", b"nope", b'"x"', b"\xff"])
def test_a_body_that_is_not_a_json_object_is_a_bad_request(data: bytes) -> None:
    with pytest.raises(BadRequest):
        decode_object(data)


def test_wait_is_bounded() -> None:
    assert FlowRequest.decode({"taskflowId": "u", "wait": 1e9}).wait == 30.0
    assert FlowRequest.decode({"taskflowId": "u", "wait": -5}).wait == 0.0
    assert FlowRequest.decode({"taskflowId": "u"}).wait == 10.0
