"""Serving the web view: ``serve_ui`` starts it on a running loop (``run --ui-address`` and the
tests), ``run_ui`` is the ``taskflow-operator ui`` command (serves until SIGINT or SIGTERM)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from taskflow.client import TaskflowClient
from taskflow.ui.access import Gate
from taskflow.ui.app import NatsConnect, Ui

log = logging.getLogger("taskflow.ui")


@dataclass
class UiServer:
    """A running view: where it listens, and how to stop it."""

    url: str
    ui: Ui
    runner: web.AppRunner
    nc: list[Any]

    async def close(self) -> None:
        self.ui.watch.stop()
        await self.runner.cleanup()
        await self.ui.client.close()
        for nc in self.nc:
            with contextlib.suppress(Exception):
                await nc.drain()


def split_address(address: str) -> tuple[str, int]:
    """``host:port`` (``[::1]:8081`` for IPv6; an empty host is every interface)."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"{address!r} is not host:port")
    return host.strip("[]") or "0.0.0.0", int(port)


def _nats_connect(options: Mapping[str, Any], made: list[Any]) -> NatsConnect:
    async def connect() -> Any:
        import nats

        async def on_error(exc: Exception) -> None:
            log.warning("nats: %s", exc)

        # Fail fast when NATS is not there (the page says so and its stream tries again),
        # then reconnect for ever once connected, as the client does.
        nc = await nats.connect(
            **{
                **options,
                "name": "taskflow-ui",
                "connect_timeout": 5,
                "max_reconnect_attempts": 2,
                "reconnect_time_wait": 0.5,
                "error_cb": on_error,
            }
        )
        nc.options["max_reconnect_attempts"] = -1
        nc.options["reconnect_time_wait"] = 2
        made.append(nc)
        return nc

    return connect


async def serve_ui(
    *,
    address: str,
    kubeconfig: str | None = None,
    api_client: Any = None,
    namespaces: Sequence[str] | None = None,
    nats_url: str | None = None,
    nats_options: Mapping[str, Any] | None = None,
    secure_cookies: str = "auto",
) -> UiServer:
    """Start the view on ``address`` and return it. ``nats_options``: ``nats.connect``'s
    keyword arguments (servers, credentials, TLS), else ``nats_url`` without credentials."""
    client = TaskflowClient(
        kubeconfig=kubeconfig,
        api_client=api_client,
        namespace=namespaces[0] if namespaces else None,
        search_namespaces=namespaces,
        nats_url=nats_url,
    )
    made: list[Any] = []
    ui = Ui(
        client=client,
        namespaces=namespaces,
        gate=Gate(client.kube.api_client),
        nats_connect=_nats_connect(nats_options, made) if nats_options else None,
        secure_cookies=secure_cookies,
    )
    runner = web.AppRunner(ui.app(), access_log=None, shutdown_timeout=2.0)
    await runner.setup()
    host, port = split_address(address)
    site = web.TCPSite(runner, host, port)
    await site.start()
    server: Any = site._server  # the bound port, when 0 was asked for
    bound = server.sockets[0].getsockname()[1] if server and server.sockets else port
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else host
    url = f"http://{'[' + shown + ']' if ':' in shown else shown}:{bound}/"
    where = ", ".join(namespaces) if namespaces else "all namespaces"
    log.info("taskflow ui on %s (%s)", url, where)
    return UiServer(url=url, ui=ui, runner=runner, nc=made)


def run_ui(**kwargs: Any) -> int:
    """Serve until SIGINT or SIGTERM (the ``taskflow-operator ui`` command)."""

    async def main() -> None:
        server = await serve_ui(**kwargs)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            await stop.wait()
        finally:
            await server.close()

    asyncio.run(main())
    return 0
