"""A flow's stage and task graph (stages in order, tasks as nodes coloured by status, with
their attempts and durations) and the panel of one task (params, response, error, attempts,
the execution context as sent)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from taskflow.api.durations import human_ms as duration
from taskflow.ui.context import Sent
from taskflow.ui.html import (
    Markup,
    attrs,
    between,
    h,
    join,
    json_block,
)
from taskflow.ui.parts import (
    Viewer,
    badge,
    children_links,
    fact_list,
    flow_path,
    status_class,
    task_href,
)


def _node_meta(task: Mapping[str, Any]) -> str:
    parts = []
    if task.get("startTime") or task.get("attempts"):  # sent at least once (attempts count from 0)
        parts.append(f"attempt {task.get('attempt', 0)}")
    if task.get("durationMs") is not None and task.get("startTime"):
        parts.append(duration(task["durationMs"]))
    if task.get("waitingReason"):
        parts.append(str(task["waitingReason"]))
    return " · ".join(parts)


def graph(node: Mapping[str, Any], *, selected: tuple[str, str] | None) -> Markup:
    """Stages as columns in their order, tasks as nodes coloured (and labelled) by status."""
    namespace, name = str(node.get("namespace")), str(node.get("name"))
    columns = []
    for i, stage in enumerate(node.get("stages") or []):
        nodes = []
        for j, task in enumerate(stage.get("tasks") or []):
            key = (str(stage.get("name")), str(task.get("name")))
            current = key == selected
            nested_label = f"Nested flows of {key[1]}"
            link = attrs(
                class_=f"node {status_class(task.get('status'))}"
                + (" selected" if current else ""),
                id=f"node-{i}-{j}",
                href=task_href(namespace, name, *key),
                data_task=f"{key[0]}/{key[1]}",
                aria_current="true" if current else None,
            )
            nodes.append(
                Markup(
                    f"<li><a {link}>"
                    f'<span class="node-name">{h(task.get("name"))}</span>'
                    f"{badge(task.get('status'))}"
                    f'<span class="node-meta">{h(_node_meta(task))}</span></a>'
                    f"{children_links(task.get('children') or [], label=nested_label)}"
                    "</li>"
                )
            )
        span = duration(stage.get("durationMs")) if stage.get("startTime") else ""
        columns.append(
            Markup(
                f'<li class="stage {status_class(stage.get("status"))}">'
                f'<div class="stage-head"><h3><span class="num">{i + 1}</span> '
                f"{h(stage.get('name'))}</h3>{badge(stage.get('status'))}"
                f'<span class="muted">{h(span)}</span></div>'
                f'<ul class="tasks">{join(nodes)}</ul></li>'
            )
        )
    orphans = children_links(node.get("children") or [], label="Other nested flows")
    return Markup(
        '<section class="graph" aria-labelledby="graph-h">'
        '<h2 id="graph-h">Stages and tasks</h2>'
        f'<ol class="stages">{join(columns)}</ol>{orphans}</section>'
    )


def _attempt_rows(task: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    rows: list[Mapping[str, Any]] = list(task.get("attempts") or [])
    seen = {r.get("attempt") for r in rows}
    if task.get("startTime") and task.get("attempt", 0) not in seen:
        rows.append(
            {
                "attempt": task.get("attempt", 0),
                "status": task.get("status"),
                "startTime": task.get("startTime"),
                "endTime": task.get("endTime"),
                "error": task.get("error"),
            }
        )
    return rows


def _attempts(task: Mapping[str, Any]) -> Markup:
    rows = _attempt_rows(task)
    if not rows:
        return Markup('<p class="muted">Not sent yet.</p>')
    body = join(
        Markup(
            f"<tr><td>{h(r.get('attempt'))}</td><td>{badge(r.get('status'))}</td>"
            f"<td>{h(r.get('startTime') or '')}</td><td>{h(r.get('endTime') or '')}</td>"
            f"<td>{h(duration(between(r.get('startTime'), r.get('endTime'))))}</td>"
            f"<td>{h((r.get('error') or {}).get('message') or '')}</td></tr>"
        )
        for r in rows
    )
    return Markup(
        '<table class="attempts"><caption class="visually-hidden">Attempts</caption>'
        '<thead><tr><th scope="col">Attempt</th><th scope="col">Status</th>'
        '<th scope="col">Started</th><th scope="col">Ended</th><th scope="col">Duration</th>'
        f'<th scope="col">Error</th></tr></thead><tbody>{body}</tbody></table>'
    )


def _find(node: Mapping[str, Any], selected: tuple[str, str]) -> Mapping[str, Any] | None:
    for stage in node.get("stages") or []:
        if stage.get("name") == selected[0]:
            for task in stage.get("tasks") or []:
                if task.get("name") == selected[1]:
                    return dict(task)
    return None


def task_panel(
    node: Mapping[str, Any],
    *,
    selected: tuple[str, str] | None,
    sent: Sent | None,
    viewer: Viewer,
) -> Markup:
    """The selected task: params, response (or its reference), error, attempts, nested flows
    and the execution context it was sent with."""
    task = _find(node, selected) if selected else None
    if selected is None or task is None:
        text = (
            "Select a task in the graph to see its params, response, error, attempts and "
            "the execution context it was sent with."
            if selected is None
            else f"This flow has no task {selected[0]}/{selected[1]}."
        )
        return Markup(
            '<section id="task" class="panel" aria-labelledby="task-h">'
            f'<h2 id="task-h">Task</h2><p class="muted">{h(text)}</p></section>'
        )
    stage_name, task_name = selected
    details = task.get("taskDetails") or {}
    service = (
        f"{details.get('serviceId')} · {details.get('actionName')}"
        if details.get("serviceId")
        else ""
    )
    facts = fact_list(
        [
            ("Type", task.get("type")),
            ("Service · action", service),
            ("Status", str(task.get("status") or "").replace("_", " ")),
            ("Waiting for", task.get("waitingReason")),
            ("Attempt", task.get("attempt") if task.get("startTime") else None),
            ("Started", task.get("startTime")),
            ("Ended", task.get("endTime")),
            ("Duration", duration(task.get("durationMs")) if task.get("startTime") else ""),
            ("Skipped because", task.get("skipReason")),
        ]
    )
    if task.get("item") is not None:
        facts = Markup(facts + json_block(task["item"], label="Item of this fan-out entry"))
    if task.get("response") is not None:
        response = json_block(task["response"], label="Response")
    elif task.get("responseRef"):
        response = Markup(
            "<p>Too large for the flow's status: kept in the NATS object store as "
            f"<code>{h(task['responseRef'])}</code>.</p>"
        )
    else:
        response = Markup('<p class="muted">None.</p>')
    error = task.get("error") or None
    if error:
        error_html = Markup(
            fact_list(
                [
                    ("Message", error.get("message")),
                    ("Code", error.get("code")),
                    ("Reason", error.get("reason")),
                    ("Retryable", {True: "yes", False: "no"}.get(error.get("retryable"))),
                ]
            )
            + (json_block(error["data"], label="Error data") if error.get("data") else "")
        )
    else:
        error_html = Markup('<p class="muted">None.</p>')
    params = sent.body if sent is not None else task.get("params")
    context = (
        json_block(sent.headers, label="Headers as sent")
        if sent is not None
        else Markup('<p class="muted">Not sent yet.</p>')
    )
    nested = children_links(task.get("children") or [], label=f"Nested flows of {task_name}")
    retry = Markup("")
    if viewer.may_act:
        path = flow_path(str(node.get("namespace")), str(node.get("name")), "/retry")
        retry = Markup(
            f'<form method="post" action="{h(path)}" class="inline">'
            f'<input type="hidden" name="csrf" value="{h(viewer.csrf)}">'
            '<input type="hidden" name="scope" value="task">'
            f'<input type="hidden" name="task" value="{h(stage_name)}/{h(task_name)}">'
            "<button type=submit>Retry this task</button></form>"
        )
    return Markup(
        '<section id="task" class="panel" aria-labelledby="task-h">'
        f'<h2 id="task-h">Task <code>{h(stage_name)}/{h(task_name)}</code> '
        f"{badge(task.get('status'))}</h2>{retry}{facts}"
        f"<h3>Params (the request body as sent)</h3>{json_block(params, label='Params')}"
        f"<h3>Response</h3>{response}"
        f"<h3>Error</h3>{error_html}"
        f"<h3>Attempts</h3>{_attempts(task)}"
        + (f"<h3>Nested flows</h3>{nested}" if nested else "")
        + "<h3>Execution context (headers of the current attempt)</h3>"
        f"{context}</section>"
    )
