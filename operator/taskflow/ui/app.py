"""The web view's routes (aiohttp): the list, a flow's page, their live streams, the actions.

Reading goes through the view's ``TaskflowClient`` (its own Kubernetes identity and NATS
connection; ``--namespace`` limits what it shows). Changing goes through a ``TaskflowClient``
made for the action with the signed-in user's token, after ``Gate`` said yes.

Routes::

    GET  /                               the flows (filters: namespace, phase, q)
    GET  /events/flows                   its live rows (SSE, same filters)
    GET  /flows/{namespace}/{name}       a flow: graph, task panel (?task=stage/task), log
    GET  /flows/{namespace}/{name}/live  the changing part of that page (HTML fragment)
    GET  /flows/{namespace}/{name}/events    its live stream (SSE: event log, "changed")
    POST /flows/{namespace}/{name}/retry     scope=failed|all|task (task=stage/task)
    POST /flows/{namespace}/{name}/cancel
    GET  /sign-in, POST /sign-in, POST /sign-out
    GET  /static/..., GET /healthz
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

from aiohttp import web
from kubernetes.client.exceptions import ApiException

from taskflow.client import TaskflowClient, TaskflowError
from taskflow.client.details import details_tree, fill_responses
from taskflow.ui import pages
from taskflow.ui.access import Gate
from taskflow.ui.context import sent_request
from taskflow.ui.live import HEARTBEAT_S, RESYNC, EventStream, FlowWatch
from taskflow.ui.pages import Filters, Viewer
from taskflow.ui.sessions import CSRF_COOKIE, SESSION_COOKIE, TTL_S, Session, Sessions, new_secret
from taskflow.ui.sessions import same as same_secret
from taskflow.wire.links import PARENT_UID

log = logging.getLogger("taskflow.ui")

STATIC = Path(__file__).parent / "static"
MAX_ROWS = 500
MAX_FORM = 64 * 1024
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    # (not no-referrer: with it browsers send "Origin: null", and the Origin check needs it)
    "Referrer-Policy": "same-origin",
}

NatsConnect = Callable[[], Awaitable[Any]]


class Ui:
    """The view's state: its client, the shared watch, the sessions, the sign-in gate."""

    def __init__(
        self,
        *,
        client: TaskflowClient,
        namespaces: Sequence[str] | None,
        gate: Gate,
        nats_connect: NatsConnect | None = None,
        secure_cookies: str = "auto",
    ) -> None:
        self.client = client
        self.namespaces = list(namespaces) if namespaces else None
        self.gate = gate
        self.nats_connect = nats_connect
        self.secure_cookies = secure_cookies
        self.sessions = Sessions()
        self.watch = FlowWatch(client, namespaces=self.namespaces)
        self.streams: set[asyncio.Task[Any]] = set()
        self._nats_lock = asyncio.Lock()

    # -- the application ------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_FORM, middlewares=[self._errors])
        app.on_response_prepare.append(self._prepare)
        app.on_shutdown.append(self._shutdown)
        r = app.router
        r.add_get("/", self.flows)
        r.add_get("/events/flows", self.flows_stream)
        r.add_get("/flows/{namespace}/{name}", self.flow)
        r.add_get("/flows/{namespace}/{name}/live", self.flow_fragment)
        r.add_get("/flows/{namespace}/{name}/events", self.flow_stream)
        r.add_post("/flows/{namespace}/{name}/retry", self.retry)
        r.add_post("/flows/{namespace}/{name}/cancel", self.cancel)
        r.add_get("/sign-in", self.sign_in_form)
        r.add_post("/sign-in", self.sign_in)
        r.add_post("/sign-out", self.sign_out)
        r.add_get("/healthz", self.healthz)
        r.add_static("/static/", STATIC, append_version=False)
        return app

    async def _prepare(self, request: web.Request, response: web.StreamResponse) -> None:
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        if response.content_type == "text/html":
            response.headers["Cache-Control"] = "no-store"

    async def _shutdown(self, _: web.Application) -> None:
        self.watch.stop()
        for task in list(self.streams):
            task.cancel()

    @web.middleware
    async def _errors(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        """Refusals as pages, and the visitor's CSRF cookie when this request made one."""
        response = await self._handle(request, handler)
        fresh = request.get("new_csrf")
        if fresh and not response.prepared:  # (cookies set while preparing are not sent)
            self._cookie(request, response, CSRF_COOKIE, fresh, max_age=None)
        return response

    async def _handle(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        try:
            return await handler(request)
        except ApiException as exc:
            return self._page(
                pages.error_page(
                    status=502,
                    message=f"Kubernetes answered {exc.status} {exc.reason}.",
                    viewer=self._viewer(request),
                    here="/",
                ),
                status=502,
            )
        except TaskflowError as exc:
            status = {"NotFound": 404, "Forbidden": 404, "BadRequest": 400}.get(str(exc.code), 502)
            message = "No such flow here." if exc.code == "Forbidden" else exc.message
            return self._page(
                pages.error_page(
                    status=status, message=message, viewer=self._viewer(request), here="/"
                ),
                status=status,
            )

    # -- helpers --------------------------------------------------------------------------------

    def _secure(self, request: web.Request) -> bool:
        if self.secure_cookies in ("always", "never"):
            return self.secure_cookies == "always"
        return request.secure or request.headers.get("X-Forwarded-Proto", "") == "https"

    def _cookie(
        self,
        request: web.Request,
        response: web.StreamResponse,
        name: str,
        value: str,
        *,
        max_age: int | None,
    ) -> None:
        response.set_cookie(
            name,
            value,
            path="/",
            httponly=True,
            samesite="Strict",
            secure=self._secure(request),
            max_age=max_age,
        )

    def _csrf(self, request: web.Request) -> str:
        """The visitor's CSRF cookie (a new one is set on this response if it had none)."""
        value = request.cookies.get(CSRF_COOKIE, "")
        if len(value) >= 32:
            return value
        fresh = request.get("new_csrf")
        if not fresh:
            fresh = request["new_csrf"] = new_secret()
        return str(fresh)

    def _session(self, request: web.Request) -> Session | None:
        return self.sessions.get(request.cookies.get(SESSION_COOKIE))

    def _viewer(self, request: web.Request) -> Viewer:
        session = self._session(request)
        if session is None:
            return Viewer(csrf=self._csrf(request))
        return Viewer(csrf=session.csrf, username=session.username)

    @staticmethod
    def _page(markup: str, *, status: int = 200) -> web.Response:
        return web.Response(text=str(markup), status=status, content_type="text/html")

    @staticmethod
    def _redirect(location: str) -> web.Response:
        return web.Response(status=303, headers={"Location": location})

    @staticmethod
    def _here(request: web.Request) -> str:
        return request.path_qs

    def _selected(self, request: web.Request) -> tuple[str, str] | None:
        stage, sep, task = request.query.get("task", "").partition("/")
        return (stage, task) if sep and stage and task else None

    async def _list(self) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = []
        scopes: list[str | None] = [*self.namespaces] if self.namespaces else [None]
        for scope in scopes:
            items.extend(await self.client.kube.list_flows(scope))
        return items

    async def _nats(self) -> Any:
        """The view's NATS connection (made with its credentials, when it has some)."""
        if self.nats_connect is not None and not self.client.has_nats:
            async with self._nats_lock:
                if not self.client.has_nats:
                    self.client.use_nats(await self.nats_connect())
        return await self.client.nats()

    def _check_post(
        self, request: web.Request, form: Mapping[str, Any], expected: str | None
    ) -> None:
        """A POST must come from this view's own page: same Origin (when the browser says),
        not a cross-site fetch, and the form's CSRF token."""
        origin = request.headers.get("Origin")
        if origin is not None and urlsplit(origin).netloc != request.host:
            raise web.HTTPForbidden(text="cross-origin request refused")
        if request.headers.get("Sec-Fetch-Site", "same-origin") == "cross-site":
            raise web.HTTPForbidden(text="cross-site request refused")
        if not same_secret(str(form.get("csrf", "")), expected):
            raise web.HTTPForbidden(text="the form is stale or forged (CSRF token): reload it")

    # -- the list -------------------------------------------------------------------------------

    async def flows(self, request: web.Request) -> web.Response:
        filters = Filters.from_query(request.query)
        items = await self._list()
        namespaces = self.namespaces or sorted({str(i["metadata"].get("namespace")) for i in items})
        shown = pages.newest_first([i for i in items if filters.matches(i)])[:MAX_ROWS]
        return self._page(
            pages.flows_page(
                items=shown,
                filters=filters,
                namespaces=namespaces,
                viewer=self._viewer(request),
                here=self._here(request),
            )
        )

    async def flows_stream(self, request: web.Request) -> web.StreamResponse:
        filters = Filters.from_query(request.query)
        shown: set[str] = set()

        async def snapshot(stream: EventStream) -> None:
            items = pages.newest_first([i for i in await self._list() if filters.matches(i)])
            items = items[:MAX_ROWS]
            shown.clear()
            shown.update(str(i["metadata"].get("uid")) for i in items)
            await stream.send(
                "snapshot",
                {"html": pages.flow_rows(items), "count": pages.count_text(len(items))},
            )

        async with self.watch.subscribe() as changes:
            stream = await EventStream.open(request)
            with self._tracked():
                await snapshot(stream)
                while True:
                    try:
                        change = await asyncio.wait_for(changes.get(), HEARTBEAT_S)
                    except TimeoutError:
                        await stream.heartbeat()
                        continue
                    if change is RESYNC:
                        await snapshot(stream)
                        continue
                    uid = str((change.body.get("metadata") or {}).get("uid"))
                    if change.type != "DELETED" and filters.matches(change.body):
                        shown.add(uid)
                        await stream.send("row", {"uid": uid, "html": pages.flow_row(change.body)})
                    elif uid in shown:
                        shown.discard(uid)
                        await stream.send("row", {"uid": uid, "html": None})
        return stream.response

    @contextlib.contextmanager
    def _tracked(self) -> Any:
        """A live stream, ended by the view's shutdown; a closed page ends it with an error
        on the next write, which is no error of ours."""
        task = asyncio.current_task()
        assert task is not None
        self.streams.add(task)
        try:
            yield
        except (ConnectionResetError, ConnectionError):
            pass
        finally:
            self.streams.discard(task)

    # -- a flow ---------------------------------------------------------------------------------

    async def _render_live(
        self, request: web.Request, namespace: str, name: str
    ) -> tuple[dict[str, Any], str]:
        body = await self.client.fetch(f"{namespace}/{name}")
        node = await details_tree(body, kube=self.client.kube, allowed=self.client.allowed)
        selected = self._selected(request)
        sent = sent_request(body, stage=selected[0], task=selected[1]) if selected else None
        if selected:
            await self._fill_response(node, selected)
        viewer = await self.gate.viewer(
            session=self._session(request), csrf=self._csrf(request), namespace=namespace
        )
        live = pages.flow_live(node, selected=selected, sent=sent, viewer=viewer)
        return {"node": node, "selected": selected, "sent": sent, "viewer": viewer}, live

    async def _fill_response(self, node: dict[str, Any], selected: tuple[str, str]) -> None:
        """A large response of the selected task, from the object store (its reference stays
        when it cannot be read)."""
        for stage in node["stages"]:
            for task in stage["tasks"]:
                if (stage["name"], task["name"]) == selected and task.get("responseRef"):
                    one = {"stages": [{"tasks": [{**task, "children": []}]}]}
                    with contextlib.suppress(Exception):
                        await fill_responses(one, nats=self._nats)
                        task["response"] = one["stages"][0]["tasks"][0].get("response")

    async def flow(self, request: web.Request) -> web.Response:
        namespace, name = request.match_info["namespace"], request.match_info["name"]
        parts, _ = await self._render_live(request, namespace, name)
        session = self._session(request)
        return self._page(
            pages.flow_page(
                parts["node"],
                selected=parts["selected"],
                sent=parts["sent"],
                viewer=parts["viewer"],
                here=self._here(request),
                messages=session.take_flash() if session else (),
            )
        )

    async def flow_fragment(self, request: web.Request) -> web.Response:
        namespace, name = request.match_info["namespace"], request.match_info["name"]
        _, live = await self._render_live(request, namespace, name)
        return self._page(live)

    async def flow_stream(self, request: web.Request) -> web.StreamResponse:
        """The flow's JetStream events (replayed from the first, then live) as ``log``, and
        ``changed`` whenever its object, or a nested flow's, changes in Kubernetes."""
        namespace, name = request.match_info["namespace"], request.match_info["name"]
        body = await self.client.fetch(f"{namespace}/{name}")
        uid = str(body["metadata"]["uid"])
        tree = {uid}
        out: asyncio.Queue[tuple[str, Any]] = asyncio.Queue(1000)

        async def events() -> None:
            try:
                await self._nats()
                async for event in self.client.subscribe_events(
                    uid, replay=True, until_final=False
                ):
                    await out.put(("log", event))
            except TaskflowError as exc:
                await out.put(("logerror", exc.message))
            except Exception as exc:
                log.warning("event log of %s/%s: %s", namespace, name, exc)
                await out.put(("logerror", f"the event log is not available ({exc})"))

        async def changes() -> None:
            async with self.watch.subscribe() as queue:
                while True:
                    change = await queue.get()
                    meta = change.body.get("metadata") or {}
                    parent = (meta.get("labels") or {}).get(PARENT_UID)
                    if change is RESYNC or meta.get("uid") in tree or parent in tree:
                        if parent in tree:
                            tree.add(str(meta.get("uid")))
                        if out.empty() or out.qsize() < 10:
                            await out.put(("changed", None))

        stream = await EventStream.open(request)
        pumps = [asyncio.create_task(events()), asyncio.create_task(changes())]
        with self._tracked():
            try:
                while True:
                    try:
                        kind, value = await asyncio.wait_for(out.get(), HEARTBEAT_S)
                    except TimeoutError:
                        await stream.heartbeat()
                        continue
                    if kind == "log":
                        await stream.send("log", _log_message(value))
                    elif kind == "logerror":
                        await stream.send("logerror", {"message": value})
                    else:
                        await stream.send("changed", {})
            finally:
                for pump in pumps:
                    pump.cancel()
                with contextlib.suppress(Exception):
                    await asyncio.gather(*pumps, return_exceptions=True)
        return stream.response

    # -- actions --------------------------------------------------------------------------------

    async def _act(
        self,
        request: web.Request,
        what: str,
        call: Callable[[TaskflowClient, str, Mapping[str, Any]], Awaitable[dict[str, Any]]],
    ) -> web.StreamResponse:
        namespace, name = request.match_info["namespace"], request.match_info["name"]
        form = await request.post()
        session = self._session(request)
        if session is None:
            raise web.HTTPUnauthorized(text="sign in first: this page is read-only")
        self._check_post(request, form, session.csrf)
        back = pages.flow_path(namespace, name)
        task = str(form.get("task", ""))
        if task:
            back += "?" + urlencode({"task": task}) + "#task"
        viewer = await self.gate.viewer(session=session, csrf=session.csrf, namespace=namespace)
        if not viewer.may_act:
            session.flash.append(("error", viewer.why_not))
            return self._redirect(back)
        api_client = self.gate.user_api_client(session.token)
        user_client = TaskflowClient(
            api_client=api_client,
            namespace=namespace,
            search_namespaces=self.namespaces,
        )
        try:
            result = await call(user_client, f"{namespace}/{name}", form)
        finally:
            await user_client.close()
            closing: Any = api_client  # (untyped)
            with contextlib.suppress(Exception):
                closing.close()
        if result.get("success"):
            data = result.get("data") or {}
            if not data.get("acknowledged"):
                text = f"{what} sent; the operator has not acted on it yet."
            else:
                text = f"{what} accepted" + (
                    f": {data['message']}." if data.get("message") else "."
                )
            session.flash.append(("ok", text))
            log.info("%s of %s/%s by %s: %s", what, namespace, name, session.username, text)
        else:
            message = str((result.get("error") or {}).get("message") or "refused")
            session.flash.append(("error", f"{what} failed: {message}"))
            log.info(
                "%s of %s/%s by %s failed: %s", what, namespace, name, session.username, message
            )
        return self._redirect(back)

    async def retry(self, request: web.Request) -> web.StreamResponse:
        async def call(
            client: TaskflowClient, ident: str, form: Mapping[str, Any]
        ) -> dict[str, Any]:
            scope = str(form.get("scope", "all"))
            if scope == "task":
                task = str(form.get("task", ""))
                if task.count("/") < 1:
                    return {"success": False, "error": {"message": "no task named"}}
                return await client.retry(ident, tasks=[task])
            return await client.retry(ident, failed_only=scope == "failed")

        return await self._act(request, "Retry", call)

    async def cancel(self, request: web.Request) -> web.StreamResponse:
        async def call(
            client: TaskflowClient, ident: str, _form: Mapping[str, Any]
        ) -> dict[str, Any]:
            return await client.cancel(ident)

        return await self._act(request, "Cancel", call)

    # -- signing in -----------------------------------------------------------------------------

    @staticmethod
    def _next(value: str) -> str:
        """Where to go after signing in: a path of this view only (never another site)."""
        if not value.startswith("/") or value.startswith("//") or "\\" in value:
            return "/"
        return value

    async def sign_in_form(self, request: web.Request) -> web.Response:
        return self._page(
            pages.sign_in_page(
                viewer=self._viewer(request),
                csrf=self._csrf(request),
                next_path=self._next(request.query.get("next", "/")),
            )
        )

    async def sign_in(self, request: web.Request) -> web.StreamResponse:
        form = await request.post()
        self._check_post(request, form, request.cookies.get(CSRF_COOKIE))
        next_path = self._next(str(form.get("next", "/")))
        token = str(form.get("token", "")).strip()
        username, problem = (None, "A token is required.")
        if token:
            username, problem = await self.gate.sign_in(token)
        if username is None:
            log.info("sign-in refused: %s", problem)
            return self._page(
                pages.sign_in_page(
                    viewer=self._viewer(request),
                    csrf=self._csrf(request),
                    next_path=next_path,
                    error=problem,
                ),
                status=401,
            )
        self.sessions.drop(request.cookies.get(SESSION_COOKIE))
        session = self.sessions.create(token=token, username=username)
        session.flash.append(("ok", f"Signed in as {username}."))
        log.info("signed in: %s", username)
        response = self._redirect(next_path)
        self._cookie(request, response, SESSION_COOKIE, session.id, max_age=TTL_S)
        return response

    async def sign_out(self, request: web.Request) -> web.StreamResponse:
        form = await request.post()
        session = self._session(request)
        if session is not None:
            self._check_post(request, form, session.csrf)
            self.sessions.drop(session.id)
            log.info("signed out: %s", session.username)
        response = self._redirect("/")
        response.del_cookie(SESSION_COOKIE, path="/")
        return response

    async def healthz(self, _: web.Request) -> web.Response:
        return web.Response(text="ok")


def _log_message(event: Mapping[str, Any]) -> dict[str, Any]:
    """A ``log`` message of a flow's stream: the entry's HTML, and for a task event the
    task's new status (the page recolours its node at once; the status write follows)."""
    data = event.get("data") or {}
    message: dict[str, Any] = {"seq": event.get("seq"), "html": pages.event_entry(event)}
    if event.get("eventType") == "TASK" and data.get("taskProgress") is None:
        message["task"] = f"{data.get('stageName')}/{data.get('taskName')}"
        message["status"] = data.get("taskStatus")
        message["attempt"] = data.get("attempt")
    return message
