"""Writes docs/img/ui-flow.png (and docs/img/ui-flows.png): the web view of the seed's scenario.

Starts the real stack on loopback (etcd, kube-apiserver, nats-server, the CRD), the operator, the
demo services and ``taskflow-operator ui``; applies examples/configure-group.yaml and a copy of it
whose appliance service is down (so one flow is running and one has a retried task), then opens
the pages in headless Chromium (the Debian package) and saves them.

    PATH="$(bash hack/build-tools.sh test | tail -n1):$PATH" .venv/bin/python hack/screenshot-ui.py
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml
from kubernetes import client, config
from playwright.async_api import async_playwright, expect

from taskflow.devstack import DevStack
from taskflow.devstack.servers import free_port

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "img"
CHROMIUM = os.environ.get("TASKFLOW_CHROMIUM", "/usr/bin/chromium")
GROUP, VERSION, PLURAL = "taskflow.dev", "v1alpha1", "taskflows"


def start(argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen(
            argv,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            start_new_session=True,
        )


def wait_http(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=1)
            return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(url) from None
            time.sleep(0.2)


def wait_phase(custom: client.CustomObjectsApi, name: str, phases: set[str]) -> None:
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        body = custom.get_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, name)
        if (body.get("status") or {}).get("phase") in phases:
            return
        time.sleep(0.3)
    raise TimeoutError(f"{name} never reached {phases}")


async def shoot(url: str) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        page = await browser.new_page(viewport={"width": 1320, "height": 900})
        await page.goto(f"{url}?namespace=default")
        await expect(page.locator("#live")).to_contain_text("Live", timeout=20_000)
        await page.screenshot(path=str(OUT / "ui-flows.png"))
        await page.goto(
            f"{url}flows/default/configure-group?task=addApplianceToGroups/addApplianceAlpha"
        )
        await expect(page.locator("#log li").last).to_contain_text("SUCCEEDED", timeout=20_000)
        await page.screenshot(path=str(OUT / "ui-flow.png"), full_page=True)
        await browser.close()
    print(f"wrote {OUT / 'ui-flows.png'} and {OUT / 'ui-flow.png'}")


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="taskflow-screenshot-"))
    children: list[subprocess.Popen[bytes]] = []
    with DevStack(work) as stack:
        try:
            python = sys.executable
            kubeconfig, nats_url = str(stack.kubeconfig), stack.nats.url
            children.append(
                start(
                    [
                        python,
                        "-m",
                        "taskflow.cli",
                        "run",
                        "--kubeconfig",
                        kubeconfig,
                        "--nats-url",
                        nats_url,
                        "--metrics-address",
                        f"127.0.0.1:{free_port()}",
                        *stack.operator_args,
                    ],
                    work / "operator.log",
                )
            )
            children.append(
                start([python, "-m", "taskflow.demo", "--nats-url", nats_url], work / "demo.log")
            )
            port = free_port()
            children.append(
                start(
                    [
                        python,
                        "-m",
                        "taskflow.cli",
                        "ui",
                        "--kubeconfig",
                        kubeconfig,
                        "--nats-url",
                        nats_url,
                        "--address",
                        f"127.0.0.1:{port}",
                    ],
                    work / "ui.log",
                )
            )
            url = f"http://127.0.0.1:{port}/"
            wait_http(url + "healthz")
            time.sleep(3)  # the operator's watch and the demo services' subscriptions
            custom = client.CustomObjectsApi(config.new_client_from_config(kubeconfig))
            example = yaml.safe_load((ROOT / "examples/configure-group.yaml").read_text())
            custom.create_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, example)
            stuck = yaml.safe_load((ROOT / "examples/configure-group.yaml").read_text())
            stuck["metadata"]["name"] = "configure-kitchen"
            for task in stuck["spec"]["stages"][1]["tasks"]:
                task["taskDetails"]["serviceId"] = "appliance-core-offline"
            custom.create_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, stuck)
            wait_phase(custom, "configure-group", {"SUCCEEDED"})
            asyncio.run(shoot(url))
        finally:
            for child in reversed(children):
                child.terminate()
                child.wait(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
