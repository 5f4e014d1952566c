"""The admin HTTP server: /metrics, /healthz, /readyz, /status, POST /reload (aiohttp, never on a traffic port)."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.openmetrics.exposition import CONTENT_TYPE_LATEST as OPENMETRICS_TYPE
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics

from . import __version__
from .config import format_host_port
from .errors import ListenError

if TYPE_CHECKING:
    from .gateway import Gateway

log = logging.getLogger("wsgate.admin")


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def exposition(registry: CollectorRegistry, request: web.Request) -> web.Response:
    """`registry` in the format the scraper asks for: OpenMetrics, or Prometheus text."""
    if "application/openmetrics-text" in request.headers.get("Accept", ""):
        body, content_type = generate_openmetrics(registry), OPENMETRICS_TYPE
    else:
        body, content_type = generate_latest(registry), CONTENT_TYPE_LATEST
    response = web.Response(body=body)
    response.headers["Content-Type"] = content_type
    return response


def admin_app(
    *, metrics: Handler, healthz: Handler, readyz: Handler, status: Handler, reload: Handler
) -> web.Application:
    """The admin routes, the same for one gateway and for a supervisor of several."""
    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/status", status)
    app.router.add_post("/reload", reload)
    return app


def build_app(gateway: Gateway) -> web.Application:
    """The admin routes, reading live state from `gateway`."""

    async def metrics(request: web.Request) -> web.Response:
        gateway.flush_metrics()
        return exposition(gateway.registry, request)

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(request: web.Request) -> web.Response:
        problem = gateway.not_ready_reason()
        if problem is not None:
            return web.Response(status=503, text=f"not ready: {problem}\n")
        return web.Response(text="ready\n")

    async def status(request: web.Request) -> web.Response:
        # The supervisor's shape, with this process as the one worker, so tooling reads both alike.
        view = gateway.status()
        one = {"index": 0, "pid": os.getpid(), "restarts": 0, "status": view}
        return web.json_response({**view, "workers": [one]})

    async def reload(request: web.Request) -> web.Response:
        problem = await gateway.reload()
        if problem is not None:
            return web.Response(status=400, text=f"reload refused: {problem}\n")
        text = f"reloaded, config version {gateway.config_version}"
        if gateway.restart_needed:
            text += f"; ignored until a restart: {', '.join(gateway.restart_needed)}"
        return web.Response(text=text + "\n")

    return admin_app(metrics=metrics, healthz=healthz, readyz=readyz, status=status, reload=reload)


async def start_admin(app: web.Application, host: str, port: int) -> web.AppRunner:
    """`app` served on host:port; a port that cannot be bound is a `ListenError` naming `admin.bind`."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except OSError as exc:
        await runner.cleanup()
        raise ListenError.from_os_error("admin.bind", format_host_port(host, port), exc) from exc
    return runner


class AdminServer:
    """Runs `build_app` on `admin.bind` with AppRunner and TCPSite."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self._runner: web.AppRunner | None = None
        self.started_at = time.time()

    @property
    def address(self) -> tuple[str, int]:
        assert self._runner is not None
        return self._runner.addresses[0][:2]

    async def start(self, host: str, port: int) -> None:
        """Bind and serve; `announce` logs it, once the listeners are bound too."""
        self._runner = await start_admin(build_app(self.gateway), host, port)

    def announce(self) -> None:
        log.info("admin listening on %s (version %s)", format_host_port(*self.address), __version__)

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
