"""The web view's pure parts, without servers: what the pages render (escaped, read-only or not,
the graph in order), the execution context rebuilt for the task panel, kubectl-like times, the
list's filters and the sessions. The view in a browser: tests/integration/test_ui.py."""

from __future__ import annotations

import re
from typing import Any

UID = "0f8fad5b-d9cb-469f-a165-70867728950e"


def a_flow(*, error: str = "boom") -> dict[str, Any]:
    """A flow's object as the API server returns it: stage 1 done, stage 2's task failed."""
    return {
        "metadata": {
            "name": "demo",
            "namespace": "team-a",
            "uid": UID,
            "creationTimestamp": "2026-01-01T00:00:00Z",
        },
        "spec": {
            "stages": [
                {
                    "name": "first",
                    "tasks": [
                        {
                            "name": "make",
                            "params": {"x": 1},
                            "taskDetails": {"serviceId": "s", "actionName": "a"},
                        }
                    ],
                },
                {
                    "name": "second",
                    "tasks": [
                        {
                            "name": "use",
                            "params": {"y": "</pre><script>"},
                            "taskDetails": {"serviceId": "s", "actionName": "b"},
                        }
                    ],
                },
            ]
        },
        "status": {
            "phase": "FAILED",
            "taskflowId": UID,
            "createdAt": 1767225600000,
            "progress": "1/2",
            "currentStage": "2/2 second",
            "stages": [
                {
                    "name": "first",
                    "id": "st-1",
                    "status": "SUCCEEDED",
                    "startTime": "2026-01-01T00:00:00.000Z",
                    "endTime": "2026-01-01T00:00:01.500Z",
                    "tasks": [
                        {
                            "name": "make",
                            "id": "t-1",
                            "status": "SUCCEEDED",
                            "startTime": "2026-01-01T00:00:00.000Z",
                            "endTime": "2026-01-01T00:00:01.500Z",
                            "response": {"made": True},
                        }
                    ],
                },
                {
                    "name": "second",
                    "id": "st-2",
                    "status": "FAILED",
                    "startTime": "2026-01-01T00:00:01.500Z",
                    "tasks": [
                        {
                            "name": "use",
                            "id": "t-2",
                            "status": "FAILED",
                            "startTime": "2026-01-01T00:00:01.500Z",
                            "endTime": "2026-01-01T00:00:02.000Z",
                            "dispatchTime": "2026-01-01T00:00:01.500Z",
                            "deadline": "2026-01-01T00:01:01.500Z",
                            "error": {"message": error, "code": "E"},
                        }
                    ],
                },
            ],
        },
    }


def test_what_flows_and_services_say_is_escaped_everywhere() -> None:
    from taskflow.client import flow_node
    from taskflow.ui import pages

    body = a_flow(error='<img src=x onerror="alert(1)">')
    node = flow_node(body, {})
    html = pages.flow_live(
        node,
        selected=("second", "use"),
        sent=None,
        viewer=pages.Viewer(csrf="c" * 43),
    )
    assert "<img" not in html and "<script>" not in html and "</pre><script>" not in html
    assert "&lt;img src=x onerror=&quot;alert(1)&quot;&gt;" in html
    entry = pages.event_entry(
        {
            "eventType": "TASK",
            "seq": 7,
            "time": 0,
            "data": {
                "stageName": "second",
                "taskName": "use",
                "attempt": 0,
                "taskStatus": "FAILED",
                "taskError": {"message": "<b>x</b>"},
            },
        }
    )
    assert "&lt;b&gt;x&lt;/b&gt;" in entry and 'data-seq="7"' in entry
    assert "second/use attempt 0" in entry
    assert pages.badge("<x>") == '<span class="badge st-UNKNOWN">&lt;x&gt;</span>'


def test_the_graph_has_stages_in_order_and_tasks_with_status_attempt_and_duration() -> None:
    from taskflow.client import flow_node
    from taskflow.ui import pages

    html = pages.graph(flow_node(a_flow(), {}), selected=("second", "use"))
    assert html.index("</span> first</h3>") < html.index("</span> second</h3>")
    make = re.search(r'<a [^>]*data-task="first/make"[^>]*>(.*?)</a>', html)
    assert make is not None and "st-SUCCEEDED" in make.group(0)
    assert "attempt 0 · 1.5s" in make.group(1)
    use = re.search(r'<a [^>]*data-task="second/use"[^>]*>', html)
    assert use is not None and 'aria-current="true"' in use.group(0) and "st-FAILED" in use.group(0)
    assert 'href="/flows/team-a/demo?task=second%2Fuse#task"' in html


def test_retry_and_cancel_are_read_only_unless_the_viewer_may_act() -> None:
    from taskflow.client import flow_node
    from taskflow.ui import pages

    node = flow_node(a_flow(), {})
    read_only = pages.flow_live(node, selected=None, sent=None, viewer=pages.Viewer(csrf="x" * 43))
    assert "Read-only." in read_only
    assert read_only.count("disabled") == 3 and 'name="csrf"' not in read_only
    signed = pages.Viewer(csrf="s" * 43, username="jane", may_act=True, why_not="")
    acting = pages.flow_live(node, selected=("second", "use"), sent=None, viewer=signed)
    assert "Read-only" not in acting and "act as <strong>jane</strong>" in acting
    assert acting.count(f'name="csrf" value="{"s" * 43}"') == 4  # 3 actions + retry this task
    assert '<button type="submit" class="danger" disabled' in acting  # FAILED: no cancel


def test_the_sent_request_is_the_operators_execution_context() -> None:
    from taskflow.ui.context import sent_request

    sent = sent_request(a_flow(), stage="second", task="use")
    assert sent is not None
    assert sent.body == {"y": "</pre><script>"}
    context = sent.headers["taskflowExecutionContext"]
    assert context["taskflow"]["id"] == UID and context["taskflow"]["stageId"] == "st-2"
    assert context["taskflow"]["taskInfo"]["name"] == "use"
    assert context["previousStageRes"] == [
        {"taskName": "make", "response": {"success": True, "data": {"made": True}}}
    ]
    assert sent.headers["Taskflow-Idempotency-Key"] == f"{UID}/second/use/0"
    assert sent.headers["Taskflow-Deadline"] == str(1767225600000 + 61_500)
    waiting = a_flow()
    waiting["status"]["stages"][1]["tasks"][0] = {"name": "use", "id": "t-2"}
    assert sent_request(waiting, stage="second", task="use") is None
    assert sent_request(a_flow(), stage="second", task="nope") is None


def test_times_read_like_kubectl() -> None:
    from taskflow.api.durations import human_ms as duration
    from taskflow.ui.html import age

    now = 1767225600000  # 2026-01-01T00:00:00Z
    assert [
        age("2026-01-01T00:00:00Z", now=now + ms) for ms in (45_000, 720_000, 3 * 3600_000)
    ] == [
        "45s",
        "12m",
        "3h",
    ]
    assert age("2025-12-30T00:00:00Z", now=now) == "2d"
    assert age(None) == "" and age("not a time") == ""
    assert [duration(ms) for ms in (850, 1234, 184_000, 7_500_000)] == [
        "850ms",
        "1.2s",
        "3m4s",
        "2h5m",
    ]


def test_filters_come_from_the_query_and_match_flows() -> None:
    from taskflow.ui.pages import Filters

    filters = Filters.from_query({"namespace": " team-a ", "phase": "failed", "q": "DEM"})
    assert filters == Filters(namespace="team-a", phase="FAILED", q="DEM")
    assert filters.matches(a_flow())
    assert not Filters(phase="RUNNING").matches(a_flow())
    assert not Filters(namespace="team-b").matches(a_flow())
    assert Filters.from_query({"phase": "<x>"}).phase == ""
    assert filters.query() == "namespace=team-a&phase=FAILED&q=DEM"


def test_sessions_are_random_bounded_in_time_and_dropped_on_sign_out() -> None:
    from taskflow.ui.sessions import Sessions, same

    sessions = Sessions(ttl_s=60)
    one = sessions.create(token="secret-token", username="jane")
    two = sessions.create(token="secret-token", username="jane")
    assert one.id != two.id and one.csrf != two.csrf and len(one.id) >= 43
    assert "secret-token" not in repr(one) and one.id not in repr(one)
    assert sessions.get(one.id) is one and sessions.get("guess") is None
    sessions.drop(one.id)
    assert sessions.get(one.id) is None
    expired = Sessions(ttl_s=0).create(token="t", username="u")
    assert Sessions(ttl_s=0).get(expired.id) is None
    assert (
        same("a" * 43, "a" * 43) and not same("a", "b") and not same("", "") and not same(None, "x")
    )
