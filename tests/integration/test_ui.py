"""The web view (``taskflow-operator ui``) in a real browser against the real stack.

Headless Chromium (the Debian package, ``/usr/bin/chromium``; never a browser Playwright
downloads) driven by Playwright: the list shows a running flow and follows it live (and works
without JavaScript); a flow's page recolours a task as it finishes without a reload, opens its
details and its nested flow; retry is read-only without a token, refused for a token without
rights, and done (as the user) for one with them. Without a browser: the POSTs refuse forged
requests and nothing secret reaches a page or the log; the chart serves the view only when
``ui.enabled``. The pure parts (rendering, the execution context, sessions): tests/unit/test_ui.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from kubernetes import client as k8s
from playwright.async_api import Browser, Page, async_playwright, expect

from conftest import Flows, flow, serve, service_account_token, task_status
from taskflow.devstack import DevStack
from taskflow.devstack.servers import free_port

CHROMIUM = os.environ.get("TASKFLOW_CHROMIUM", "/usr/bin/chromium")
LIVE = 20_000  # ms: how long a live change may take to show


class UiProcess:
    """``taskflow-operator ui`` as a child process on a free port."""

    def __init__(self, stack: DevStack, log_path: Path) -> None:
        self.log_path = log_path
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        with open(log_path, "ab") as log:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "taskflow.cli",
                    "ui",
                    "--kubeconfig",
                    str(stack.kubeconfig),
                    "--nats-url",
                    stack.nats.url,
                    "--address",
                    f"127.0.0.1:{self.port}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
                start_new_session=True,
            )
        deadline = time.monotonic() + 30
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"the ui exited: {log_path.read_text()[-3000:]}")
            try:
                urllib.request.urlopen(f"{self.url}/healthz", timeout=1)
                return
            except OSError:
                assert time.monotonic() < deadline, "the ui did not start"
                time.sleep(0.1)

    def log(self) -> str:
        return self.log_path.read_text()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(30)


@pytest.fixture(scope="module")
def ui(stack: DevStack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[UiProcess]:
    proc = UiProcess(stack, tmp_path_factory.mktemp("ui") / "ui.log")
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Browser]:
    if not os.path.exists(CHROMIUM):
        pytest.fail(
            f"{CHROMIUM} is missing: `apt-get install -y chromium` (hack/run-tests.sh does it)"
        )
    async with async_playwright() as playwright:
        chromium = await playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield chromium
        await chromium.close()


@pytest.fixture
async def page(browser: Browser) -> AsyncIterator[Page]:
    context = await browser.new_context(viewport={"width": 1400, "height": 1000})
    opened = await context.new_page()
    yield opened
    await context.close()


def status_of(body: dict[str, Any], stage: str, task: str) -> str | None:
    try:
        return str(task_status(body, stage, task)["status"])
    except KeyError:
        return None


def flow_url(ui: UiProcess, namespace: str, name: str) -> str:
    return f"{ui.url}/flows/{namespace}/{name}"


async def sign_in(page: Page, ui: UiProcess, token: str, *, next_path: str) -> None:
    await page.goto(f"{ui.url}/sign-in?next={next_path}")
    await page.get_by_label("Token").fill(token)
    await page.get_by_role("button", name="Sign in").click()


async def test_the_list_shows_a_running_flow_live_and_without_javascript(
    operator, ui: UiProcess, browser: Browser, page: Page, nc, flows: Flows, namespace: str, svc
) -> None:
    held = asyncio.Event()

    async def hold(_msg: Any) -> dict[str, Any]:
        await held.wait()
        return {"success": True, "data": "done"}

    await serve(nc, f"{svc}.do", hold)
    await page.goto(f"{ui.url}/?namespace={namespace}")
    await expect(page.locator("#live")).to_contain_text("Live", timeout=LIVE)
    await expect(page.locator("#flow-rows")).to_contain_text("No flows match")

    await flows.create(flow(svc, ["a"]), name="shown-live")

    row = page.locator("#flow-rows tr", has_text="shown-live")
    await expect(row).to_contain_text("RUNNING", timeout=LIVE)
    await expect(row).to_contain_text("0/1")
    await expect(page.locator("#flow-count")).to_have_text("1 flow")

    # Without JavaScript: the same list, and the filters are a plain form.
    plain = await browser.new_context(java_script_enabled=False)
    try:
        still = await plain.new_page()
        await still.goto(f"{ui.url}/?namespace={namespace}")
        plain_row = still.locator("#flow-rows tr", has_text="shown-live")
        await expect(plain_row).to_contain_text("RUNNING")
        await expect(plain_row.get_by_role("link", name="shown-live")).to_have_attribute(
            "href", f"/flows/{namespace}/shown-live"
        )
        await still.get_by_label("Phase").select_option("SUCCEEDED")
        await still.get_by_role("button", name="Filter").click()
        await expect(still.locator("#flow-rows")).to_contain_text("No flows match")
        assert "phase=SUCCEEDED" in still.url
    finally:
        await plain.close()

    held.set()
    await expect(row).to_contain_text("SUCCEEDED", timeout=LIVE)
    await expect(row).to_contain_text("1/1")


async def test_the_flow_page_follows_tasks_as_they_finish_and_opens_their_details(
    operator, ui: UiProcess, page: Page, nc, flows: Flows, namespace: str, svc, tmp_path: Path
) -> None:
    release = asyncio.Event()

    async def reply(msg: Any) -> dict[str, Any]:
        params = json.loads(msg.data)
        if params.get("task") == "b":
            await release.wait()
        return {"success": True, "data": {"done": params.get("task")}}

    await serve(nc, f"{svc}.do", reply)
    spec = flow(svc, ["a"], ["b"])
    child = flow(svc, ["leaf"])
    spec["stages"][1]["tasks"].append({"name": "nested", "type": "TASKFLOW", "taskflow": child})
    await flows.create(spec, name="graph")
    await flows.wait("graph", until=lambda b: status_of(b, "s2", "b") == "RUNNING")

    await page.goto(flow_url(ui, namespace, "graph"))
    node = page.locator('a.node[data-task="s2/b"]')
    await expect(node).to_contain_text("RUNNING")
    await expect(page.locator('a.node[data-task="s1/a"]')).to_contain_text("SUCCEEDED")
    await expect(page.locator(".stage").nth(0)).to_contain_text("s1")
    await expect(page.locator(".stage").nth(1)).to_contain_text("s2")
    log = page.locator("#log li")
    await expect(log.filter(has_text="s1/a").last).to_contain_text("SUCCEEDED", timeout=LIVE)
    await page.evaluate("window.sameDocument = true")

    release.set()

    await expect(node).to_contain_text("SUCCEEDED", timeout=LIVE)
    await expect(node).to_have_class(re.compile(r"\bst-SUCCEEDED\b"))
    await expect(page.locator(".flow-head")).to_contain_text("SUCCEEDED", timeout=LIVE)
    await expect(log.filter(has_text="s2/b").last).to_contain_text("SUCCEEDED")
    await expect(log.filter(has_text="TASKFLOW").last).to_contain_text("SUCCEEDED")
    assert await page.evaluate("window.sameDocument") is True, "the page was reloaded"

    # The task panel: params as sent, response, attempts, the execution context.
    await node.click()
    panel = page.locator("#task")
    await expect(panel).to_contain_text("s2/b")
    await expect(panel).to_contain_text('"done": "b"')
    await expect(panel).to_contain_text("taskflowExecutionContext")
    body = await flows.get("graph")
    await expect(panel).to_contain_text(body["metadata"]["uid"])
    assert await page.evaluate("window.sameDocument") is True
    assert "task=s2%2Fb" in page.url
    await page.screenshot(path=str(tmp_path / "ui-flow.png"), full_page=True)

    # Nested flows are links to their own page, which links back to the parent.
    await page.locator('a.node[data-task="s2/nested"]').click()
    child_link = page.locator(".children a").first
    await expect(child_link).to_contain_text("graph-nested")
    await child_link.click()
    await expect(page.locator(".parent")).to_contain_text("Child flow of graph")
    await expect(page.locator('a.node[data-task="s1/leaf"]')).to_contain_text("SUCCEEDED")


async def test_retry_is_read_only_without_rights_and_acts_as_the_signed_in_user(
    operator,
    ui: UiProcess,
    page: Page,
    kube: k8s.ApiClient,
    nc,
    flows: Flows,
    namespace: str,
    svc,
    api_token: str,
) -> None:
    failing = {"on": True}

    async def reply(_msg: Any) -> dict[str, Any]:
        if failing["on"]:
            return {"success": False, "error": {"message": "<b>unreachable</b>", "code": "DOWN"}}
        return {"success": True, "data": "configured"}

    await serve(nc, f"{svc}.do", reply)
    await flows.create(flow(svc, ["a"]), name="to-retry")
    assert (await flows.wait("to-retry"))["status"]["phase"] == "FAILED"
    path = f"/flows/{namespace}/to-retry"

    await page.goto(ui.url + path)
    actions = page.locator(".actions")
    await expect(actions).to_contain_text("Read-only")
    await expect(page.get_by_role("button", name="Retry failed tasks")).to_be_disabled()
    await expect(page.get_by_role("button", name="Cancel")).to_be_disabled()

    await sign_in(page, ui, "not-a-token", next_path=path)
    await expect(page.get_by_role("alert")).to_contain_text("did not accept")

    viewer = service_account_token(kube, namespace, "viewer")
    await sign_in(page, ui, viewer, next_path=path)
    await expect(page.locator(".who")).to_contain_text(f"system:serviceaccount:{namespace}:viewer")
    await expect(actions).to_contain_text("may not patch taskflows in namespace")
    await expect(page.get_by_role("button", name="Retry failed tasks")).to_be_disabled()

    # The action is sent with the user's own token: one that may patch but not get is refused
    # by the API server itself (the view's own identity could have done it).
    patcher = service_account_token(kube, namespace, "patcher", verbs=["patch"])
    await sign_in(page, ui, patcher, next_path=path)
    await page.get_by_role("button", name="Retry failed tasks").click()
    await expect(page.get_by_role("alert")).to_contain_text("Retry failed", timeout=LIVE)
    await expect(page.get_by_role("alert")).to_contain_text("forbidden")
    assert (await flows.get("to-retry"))["spec"].get("retry") is None

    await sign_in(page, ui, api_token, next_path=path)
    await expect(actions).to_contain_text(f"act as system:serviceaccount:{namespace}:caller")
    await page.locator('a.node[data-task="s1/a"]').click()
    await expect(page.locator("#task")).to_contain_text("<b>unreachable</b>")  # as text
    failing["on"] = False
    await page.get_by_role("button", name="Retry failed tasks").click()

    await expect(page.get_by_role("status").filter(has_text="Retry accepted")).to_be_visible()
    await expect(page.locator(".flow-head")).to_contain_text("SUCCEEDED", timeout=LIVE)
    done = await flows.get("to-retry")
    assert done["status"]["retry"]["accepted"] is True
    retried = task_status(done, "s1", "a")
    assert (retried["status"], retried["attempt"]) == ("SUCCEEDED", 1)  # (counted from 0)
    await expect(page.locator('a.node[data-task="s1/a"]')).to_contain_text("attempt 1")


async def test_cancel_from_the_page_cancels_the_running_flow(
    operator, ui: UiProcess, page: Page, nc, flows: Flows, namespace: str, svc, api_token: str
) -> None:
    await serve(nc, f"{svc}.do", lambda _msg: None)  # never answers
    await flows.create(flow(svc, ["a"], ["b"]), name="to-cancel")
    await flows.wait("to-cancel", until=lambda b: status_of(b, "s1", "a") == "RUNNING")
    await sign_in(page, ui, api_token, next_path=f"/flows/{namespace}/to-cancel")
    await page.get_by_role("button", name="Cancel").click()
    await expect(page.get_by_role("status").filter(has_text="Cancel accepted")).to_be_visible(
        timeout=LIVE
    )
    await expect(page.locator(".flow-head")).to_contain_text("CANCELLED", timeout=LIVE)
    await expect(page.locator('a.node[data-task="s1/a"]')).to_contain_text("CANCELLED")
    await expect(page.locator('a.node[data-task="s2/b"]')).to_contain_text("SKIPPED")
    await expect(page.get_by_role("button", name="Cancel")).to_be_disabled()


async def test_posts_refuse_forged_requests_and_nothing_secret_leaks(
    operator, ui: UiProcess, nc, flows: Flows, namespace: str, svc, api_token: str
) -> None:
    await serve(nc, f"{svc}.do")
    await flows.create(flow(svc, ["a"]), name="guarded")
    await flows.wait("guarded")
    path = f"/flows/{namespace}/guarded"
    # (unsafe: a cookie jar that keeps cookies of an IP address, 127.0.0.1)
    async with aiohttp.ClientSession(ui.url, cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
        form = await (await http.get(f"/sign-in?next={path}")).text()
        csrf = re.search(r'name="csrf" value="([^"]+)"', form)
        assert csrf is not None
        # Without the form's token, no sign-in.
        refused = await http.post("/sign-in", data={"token": api_token, "next": path})
        assert refused.status == 403
        signed = await http.post(
            "/sign-in",
            data={"token": api_token, "next": path, "csrf": csrf.group(1)},
            allow_redirects=False,
        )
        assert signed.status == 303
        cookie = signed.headers["Set-Cookie"]
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
        assert api_token not in cookie
        page = await (await http.get(path)).text()
        assert "Retry failed tasks" in page and "Read-only" not in page
        assert api_token not in page
        session_csrf = re.search(r'name="csrf" value="([^"]+)"', page)
        assert session_csrf is not None
        # The session alone is not enough: the form's token, from this view's own origin.
        forged = await http.post(f"{path}/retry", data={"scope": "all"})
        assert forged.status == 403
        cross = await http.post(
            f"{path}/retry",
            data={"scope": "all", "csrf": session_csrf.group(1)},
            headers={"Origin": "http://evil.example"},
        )
        assert cross.status == 403
        async with aiohttp.ClientSession(ui.url) as anonymous:
            nobody = await anonymous.post(f"{path}/cancel", data={"csrf": session_csrf.group(1)})
            assert nobody.status == 401
        headers = (await http.get(path)).headers
        assert "script-src 'self'" in headers["Content-Security-Policy"]
        assert headers["X-Frame-Options"] == "DENY"
    assert (await flows.get("guarded"))["spec"].get("retry") is None
    assert api_token not in ui.log()


@pytest.mark.integration  # (helm, from the built tools)
def test_the_chart_serves_the_view_only_when_enabled(tmp_path: Path) -> None:
    from integration.test_helm import container, one, render

    docs = render(tmp_path, {})
    assert not [a for a in container(docs)["args"] if a.startswith("--ui-address")]
    assert not [d for d in docs if d["metadata"]["name"].endswith("-ui")]
    docs = render(tmp_path, {"ui": {"enabled": True, "port": 8088}})
    c = container(docs)
    assert "--ui-address=0.0.0.0:8088" in c["args"]
    assert {"name": "ui", "containerPort": 8088, "protocol": "TCP"} in c["ports"]
    service = one(docs, "Service", "taskflow-taskflow-operator-ui")
    assert service["spec"]["type"] == "ClusterIP"
    assert service["spec"]["ports"] == [
        {"name": "ui", "port": 8088, "targetPort": "ui", "protocol": "TCP"}
    ]
    (delegate,) = [
        d
        for d in docs
        if d["kind"] == "ClusterRoleBinding" and d["roleRef"]["name"] == "system:auth-delegator"
    ]
    assert delegate["subjects"][0]["name"] == "taskflow-taskflow-operator"
