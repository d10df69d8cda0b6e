"""The pages of the web view, rendered on the server (pure: dicts in, escaped HTML out).

Everything a page says is in its HTML, so the list works without JavaScript and a screen
reader reads what a sighted user sees (status as text, never only as a colour). ``ui.js`` only
swaps in fragments the server renders with these same functions: a row of the list, the live
part of a flow's page, an entry of its event log.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urlencode

from taskflow.api.durations import human_ms as duration
from taskflow.client import FINAL_PHASES
from taskflow.client.links import parent_of
from taskflow.ui.context import Sent
from taskflow.ui.graph import graph as graph
from taskflow.ui.graph import task_panel
from taskflow.ui.html import (
    Markup,
    age,
    attrs,
    clock,
    h,
    iso,
    join,
    now_ms,
)
from taskflow.ui.parts import PHASES, fact_list
from taskflow.ui.parts import Filters as Filters
from taskflow.ui.parts import Viewer as Viewer
from taskflow.ui.parts import badge as badge
from taskflow.ui.parts import flow_path as flow_path

# -- the frame ---------------------------------------------------------------------------------


def layout(
    *,
    title: str,
    content: Markup,
    viewer: Viewer,
    here: str,
    page: str,
    data: Mapping[str, str] | None = None,
) -> Markup:
    """A whole page: header with the sign-in state, ``content`` in ``<main>``."""
    if viewer.username:
        who = Markup(
            f"<span>Signed in as <strong>{h(viewer.username)}</strong></span>"
            f'<form method="post" action="/sign-out" class="inline">'
            f'<input type="hidden" name="csrf" value="{h(viewer.csrf)}">'
            f'<button type="submit" class="link">Sign out</button></form>'
        )
    else:
        who = Markup(
            f'<span class="muted">Read-only</span> '
            f'<a href="/sign-in?{h(urlencode({"next": here}))}">Sign in</a>'
        )
    body_attrs = attrs(data_page=page, **{f"data_{k}": v for k, v in (data or {}).items()})
    return Markup(
        "<!doctype html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{h(title)} · Taskflow</title>"
        '<link rel="stylesheet" href="/static/ui.css">'
        '<script src="/static/ui.js" defer></script>'
        f"</head><body {body_attrs}>"
        '<a class="skip" href="#main">Skip to content</a>'
        '<header class="top"><a class="brand" href="/">Taskflow</a>'
        '<nav aria-label="Main"><a href="/"'
        f"{' aria-current=page' if page == 'flows' else ''}>Flows</a></nav>"
        f'<div class="who">{who}</div></header>'
        f'<main id="main" tabindex="-1">{content}</main>'
        "</body></html>\n"
    )


def notices(messages: Sequence[tuple[str, str]]) -> Markup:
    """One-time messages after an action: ``(kind, text)``, kind ``ok`` or ``error``."""
    return join(
        Markup(
            f'<p class="notice notice-{"error" if kind == "error" else "ok"}" '
            f'role="{"alert" if kind == "error" else "status"}">{h(text)}</p>'
        )
        for kind, text in messages
    )


# -- the list ----------------------------------------------------------------------------------


def _progress(text: Any) -> Markup:
    done, _, total = str(text or "").partition("/")
    if done.isdigit() and total.isdigit() and int(total) > 0:
        return Markup(
            f'<progress max="{int(total)}" value="{min(int(done), int(total))}" '
            f'aria-hidden="true"></progress> {h(text)}'
        )
    return h(text or "")


def flow_row(body: Mapping[str, Any], *, now: int | None = None) -> Markup:
    """One row of the list (also sent alone by the list's live stream)."""
    meta = body.get("metadata") or {}
    status = body.get("status") or {}
    namespace, name = str(meta.get("namespace") or ""), str(meta.get("name") or "")
    created = meta.get("creationTimestamp")
    parent = parent_of(meta)
    nested = (
        Markup(f'<span class="sub">child of {h(parent.get("name") or parent["taskflowId"])}</span>')
        if parent
        else Markup("")
    )
    return Markup(
        f"<tr {attrs(data_uid=meta.get('uid'), data_created=created)}>"
        f'<th scope="row"><a href="{h(flow_path(namespace, name))}">{h(name)}</a>{nested}</th>'
        f"<td>{h(namespace)}</td>"
        f"<td>{badge(status.get('phase') or 'PENDING')}</td>"
        f"<td>{h(status.get('currentStage') or '')}</td>"
        f"<td>{_progress(status.get('progress'))}</td>"
        f'<td><time datetime="{h(created or "")}">{h(age(created, now=now))}</time></td>'
        "</tr>"
    )


def flow_rows(items: Sequence[Mapping[str, Any]], *, now: int | None = None) -> Markup:
    if not items:
        return Markup('<tr class="empty"><td colspan="6">No flows match.</td></tr>')
    return join(flow_row(item, now=now) for item in items)


def newest_first(items: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return sorted(
        items,
        key=lambda b: (
            str((b.get("metadata") or {}).get("creationTimestamp") or ""),
            str((b.get("metadata") or {}).get("name") or ""),
        ),
        reverse=True,
    )


def count_text(n: int) -> str:
    return f"{n} flow" if n == 1 else f"{n} flows"


def flows_page(
    *,
    items: Sequence[Mapping[str, Any]],
    filters: Filters,
    namespaces: Sequence[str],
    viewer: Viewer,
    here: str,
) -> Markup:
    """The flows list, filtered on the server (a plain GET form), live with JavaScript."""
    now = now_ms()
    ns_options = join(
        Markup(f"<option{' selected' if n == filters.namespace else ''}>{h(n)}</option>")
        for n in sorted({*namespaces, *([filters.namespace] if filters.namespace else [])})
    )
    phase_options = join(
        Markup(
            f'<option value="{h(p)}"{" selected" if p == filters.phase else ""}>'
            f"{h(p.replace('_', ' '))}</option>"
        )
        for p in PHASES
    )
    stream = "/events/flows" + (f"?{filters.query()}" if filters.query() else "")
    content = Markup(
        "<h1>Flows</h1>"
        '<form class="filters" method="get" action="/" role="search" aria-label="Filter flows">'
        '<label>Namespace <select name="namespace"><option value="">all</option>'
        f"{ns_options}</select></label>"
        '<label>Phase <select name="phase"><option value="">any</option>'
        f"{phase_options}</select></label>"
        f'<label>Name <input type="search" name="q" value="{h(filters.q)}" '
        'maxlength="253" autocomplete="off"></label>'
        '<button type="submit">Filter</button> <a href="/">Clear</a></form>'
        '<p id="live" class="live" role="status">'
        "<noscript>Reload the page to see changes (live updates need JavaScript).</noscript>"
        "</p>"
        '<table class="flows"><caption id="flow-count">'
        f"{h(count_text(len(items)))}</caption>"
        '<thead><tr><th scope="col">Name</th><th scope="col">Namespace</th>'
        '<th scope="col">Phase</th><th scope="col">Stage</th><th scope="col">Progress</th>'
        '<th scope="col">Age</th></tr></thead>'
        f'<tbody id="flow-rows">{flow_rows(items, now=now)}</tbody></table>'
    )
    return layout(
        title="Flows",
        content=content,
        viewer=viewer,
        here=here,
        page="flows",
        data={"stream": stream},
    )


def _actions(node: Mapping[str, Any], viewer: Viewer) -> Markup:
    namespace, name = str(node.get("namespace")), str(node.get("name"))
    final = node.get("phase") in FINAL_PHASES

    def form(action: str, label: str, *, scope: str | None = None, danger: bool = False) -> Markup:
        disabled = not viewer.may_act or (action == "cancel" and final)
        hidden = (
            Markup(f'<input type="hidden" name="csrf" value="{h(viewer.csrf)}">')
            if viewer.may_act
            else Markup("")
        )
        if scope:
            hidden = Markup(hidden + f'<input type="hidden" name="scope" value="{h(scope)}">')
        button = attrs(
            type="submit",
            class_="danger" if danger else None,
            disabled=disabled,
            aria_describedby=None if viewer.may_act else "readonly",
        )
        return Markup(
            f'<form method="post" action="{h(flow_path(namespace, name, "/" + action))}" '
            f'class="inline">{hidden}<button {button}>{h(label)}</button></form>'
        )

    if viewer.may_act:
        note = Markup(
            f'<p class="muted">Retry and cancel act as <strong>{h(viewer.username)}</strong>.</p>'
        )
    else:
        note = Markup(
            f'<p class="readonly" id="readonly"><strong>Read-only.</strong> {h(viewer.why_not)}</p>'
        )
    return Markup(
        '<section class="actions" aria-labelledby="actions-h">'
        '<h2 id="actions-h" class="visually-hidden">Actions</h2>'
        f"{note}"
        f"{form('retry', 'Retry failed tasks', scope='failed')}"
        f"{form('retry', 'Retry the whole flow', scope='all')}"
        f"{form('cancel', 'Cancel', danger=True)}"
        "</section>"
    )


def flow_live(
    node: Mapping[str, Any],
    *,
    selected: tuple[str, str] | None,
    sent: Sent | None,
    viewer: Viewer,
    now: int | None = None,
) -> Markup:
    """The part of a flow's page that changes: summary, actions, graph, task panel."""
    parent = node.get("parent") or None
    parent_html = Markup("")
    if parent:
        where = (
            f", task <code>{h(parent.get('stage'))}.{h(parent.get('task'))}</code>"
            if parent.get("task")
            else ""
        )
        attempt = f", attempt {h(parent['attempt'])}" if parent.get("attempt") else ""
        target = parent.get("name")
        link = (
            Markup(
                f'<a href="{h(flow_path(str(parent.get("namespace")), str(target)))}">'
                f"{h(target)}</a>"
            )
            if target
            else h(parent.get("taskflowId"))
        )
        parent_html = Markup(f'<p class="parent">Child flow of {link}{where}{attempt}.</p>')
    created = node.get("creationTimestamp")
    retry = node.get("retry") or {}
    facts = fact_list(
        [
            ("Namespace", node.get("namespace")),
            ("Stage", node.get("currentStage")),
            ("Progress", node.get("progress")),
            ("Age", age(created, now=now)),
            ("Duration", duration(node.get("durationMs")) if node.get("startTime") else ""),
            ("Cancel requested", "yes" if node.get("cancel") else ""),
            (
                "Last retry",
                f"{'accepted' if retry.get('accepted') else 'refused'}"
                + (f": {retry.get('message')}" if retry.get("message") else "")
                if retry
                else "",
            ),
            ("Uid", node.get("taskflowId")),
        ]
    )
    return Markup(
        f'<div class="flow-head"><h1>{h(node.get("name"))}</h1> {badge(node.get("phase"))}</div>'
        f"{parent_html}{facts}{_actions(node, viewer)}{graph(node, selected=selected)}"
        f"{task_panel(node, selected=selected, sent=sent, viewer=viewer)}"
    )


def flow_page(
    node: Mapping[str, Any],
    *,
    selected: tuple[str, str] | None,
    sent: Sent | None,
    viewer: Viewer,
    here: str,
    messages: Sequence[tuple[str, str]] = (),
) -> Markup:
    namespace, name = str(node.get("namespace")), str(node.get("name"))
    selection = f"{selected[0]}/{selected[1]}" if selected else ""
    content = Markup(
        '<nav class="crumbs" aria-label="Breadcrumb"><ol>'
        '<li><a href="/">Flows</a></li>'
        f'<li><a href="/?{h(urlencode({"namespace": namespace}))}">{h(namespace)}</a></li>'
        f'<li aria-current="page">{h(name)}</li></ol></nav>'
        f"{notices(messages)}"
        f'<div id="flow-live">'
        f"{flow_live(node, selected=selected, sent=sent, viewer=viewer)}</div>"
        '<section class="events" aria-labelledby="log-h"><h2 id="log-h">Event log</h2>'
        '<p id="live" class="live" role="status">'
        "<noscript>The event log is live: it needs JavaScript. Reload the page to see "
        "the flow's latest status.</noscript></p>"
        '<div role="log" aria-labelledby="log-h"><ol id="log" class="log"></ol></div></section>'
    )
    return layout(
        title=name,
        content=content,
        viewer=viewer,
        here=here,
        page="flow",
        data={
            "stream": flow_path(namespace, name, "/events"),
            "fragment": flow_path(namespace, name, "/live"),
            "task": selection,
        },
    )


# -- the event log ------------------------------------------------------------------------------


def event_entry(event: Mapping[str, Any]) -> Markup:
    """One entry of a flow's event log (sent by its live stream)."""
    data = event.get("data") or {}
    kind = str(event.get("eventType") or "")
    error = ""
    if kind == "TASK":
        status = data.get("taskStatus")
        what = f"{data.get('stageName')}/{data.get('taskName')}"
        if data.get("attempt") is not None:
            what += f" attempt {data['attempt']}"
        error = str((data.get("taskError") or {}).get("message") or "")
        if data.get("taskProgress") is not None:
            what += " (progress)"
    elif kind == "STAGE":
        status, what = data.get("stageStatus"), f"stage {data.get('stageName')}"
    else:
        status, what = data.get("taskflowStatus"), "flow"
    when = event.get("time") if isinstance(event.get("time"), int) else None
    return Markup(
        f"<li {attrs(data_seq=event.get('seq'))}>"
        f'<time datetime="{h(iso(when))}">{h(clock(when))}</time> '
        f'<span class="kind">{h(kind)}</span> {badge(status)} '
        f'<span class="what">{h(what)}</span>'
        + (f' <span class="err">{h(error)}</span>' if error else "")
        + "</li>"
    )


# -- signing in, errors --------------------------------------------------------------------------


def sign_in_page(*, viewer: Viewer, csrf: str, next_path: str, error: str = "") -> Markup:
    """The sign-in form; ``csrf`` is the visitor's CSRF cookie (not a session's: whoever is
    signed in may sign in as someone else)."""
    problem = Markup(f'<p class="notice notice-error" role="alert">{h(error)}</p>') if error else ""
    content = Markup(
        "<h1>Sign in</h1>"
        f"{problem}"
        "<p>Paste a Kubernetes bearer token (e.g. <code>kubectl create token NAME</code>). "
        "The view checks it with a TokenReview and keeps it on the server for this session "
        "only: your browser holds a random session id in an HttpOnly cookie. Retry and cancel "
        "are then offered where a SubjectAccessReview says you may <code>patch</code> "
        "taskflows, and they are sent to Kubernetes with your token, as you.</p>"
        '<form method="post" action="/sign-in" class="sign-in">'
        f'<input type="hidden" name="csrf" value="{h(csrf)}">'
        f'<input type="hidden" name="next" value="{h(next_path)}">'
        '<label for="token">Token</label>'
        '<input id="token" name="token" type="password" autocomplete="off" '
        'spellcheck="false" required>'
        '<button type="submit">Sign in</button></form>'
    )
    return layout(title="Sign in", content=content, viewer=viewer, here="/", page="sign-in")


def error_page(*, status: int, message: str, viewer: Viewer, here: str) -> Markup:
    content = Markup(
        f"<h1>{h(status)}</h1><p>{h(message)}</p><p><a href='/'>Back to the flows</a></p>"
    )
    return layout(title=str(status), content=content, viewer=viewer, here=here, page="error")
