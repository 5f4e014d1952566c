"""The admin HTTP server: /metrics, /healthz, /readyz, /status, /dashboard, POST /reload
(aiohttp, never on a traffic port).

Reading is open to whoever reaches the port. Anything else (POST /reload, and
whatever changes the gateway later) is refused to a web page, which could
otherwise make a browser on the operator's machine send it: any `Origin`
header, and the content types an HTML form or a simple fetch may send without
a CORS preflight. The one page allowed is the admin server's own dashboard
(under /dashboard/, whose only changes are the demo's buttons), and only from
its own origin at a loopback address: a page elsewhere has another origin, and
a name rebound to 127.0.0.1 is not a loopback address. What is left needs the
bearer token when one is configured, and otherwise a loopback peer.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import os
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from prometheus_client.openmetrics.exposition import CONTENT_TYPE_LATEST as OPENMETRICS_TYPE
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics

from . import __version__
from .config import format_host_port
from .dashboard import Dashboard, add_dashboard
from .errors import ListenError

if TYPE_CHECKING:
    from .demo import ChatBackends
    from .gateway import Gateway

log = logging.getLogger("wsgate.admin")


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# Requests that change nothing, open to any peer.
_READ_METHODS = frozenset({"GET", "HEAD"})
# The content types a browser sends cross-origin without asking the server first.
_FORM_TYPES = frozenset({"application/x-www-form-urlencoded", "multipart/form-data", "text/plain"})
_TOKEN = web.AppKey("token", str)
_CHALLENGE = 'Bearer realm="wsgate admin"'
# The dashboard's own requests come from under here.
DASHBOARD_PATH = "/dashboard/"


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 (IPv4-mapped too) and the name localhost."""
    if host.lower() == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def _refuse(status: int, text: str, **headers: str) -> web.Response:
    return web.Response(status=status, text=text + "\n", headers=headers)


def _from_own_page(request: web.Request) -> bool:
    """True for a request the dashboard sent: under its path, from this server's loopback origin."""
    if not request.path.startswith(DASHBOARD_PATH):
        return False
    host = request.url.host or ""
    return is_loopback(host.strip("[]")) and request.headers["Origin"] == f"http://{request.host}"


def _change_refusal(request: web.Request, token: str | None) -> web.Response | None:
    """Why `request`, which would change the gateway, is refused; None when it may go on."""
    if "Origin" in request.headers and not _from_own_page(request):
        return _refuse(
            403, "refused: a request with an Origin header (from a web page) cannot change the gateway"
        )
    if "Content-Type" in request.headers and request.content_type in _FORM_TYPES:
        return _refuse(415, f"refused: a {request.content_type} body is what a web form sends; send none")
    if token is None:
        if request.remote is None or not is_loopback(request.remote):
            return _refuse(
                403, "refused: without admin.token_file or admin.token_env, only loopback peers may do this"
            )
        return None
    scheme, _, offered = request.headers.get("Authorization", "").partition(" ")
    # Encoded, since compare_digest takes only ASCII text; "replace" so odd bytes just fail to match.
    offered_bytes = offered.strip().encode("utf-8", "replace")
    if scheme.lower() != "bearer" or not hmac.compare_digest(offered_bytes, token.encode()):
        return _refuse(401, "refused: a valid bearer token is needed", **{"WWW-Authenticate": _CHALLENGE})
    return None


@web.middleware
async def _guard_changes(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.method not in _READ_METHODS:
        refusal = _change_refusal(request, request.app.get(_TOKEN))
        if refusal is not None:
            reason = (refusal.text or "").strip()
            log.warning("admin: %s %s from %s %s", request.method, request.path, request.remote, reason)
            return refusal
    return await handler(request)


def exposition(registry: CollectorRegistry, request: web.Request) -> web.Response:
    """`registry` in the format the scraper asks for: OpenMetrics, or Prometheus text."""
    if "application/openmetrics-text" in request.headers.get("Accept", ""):
        body, content_type = generate_openmetrics(registry), OPENMETRICS_TYPE
    else:
        body, content_type = generate_latest(registry), CONTENT_TYPE_LATEST
    response = web.Response(body=body)
    response.headers["Content-Type"] = content_type
    return response


async def _healthz(request: web.Request) -> web.Response:
    # Alive is all it says: a process that can answer at all.
    return web.Response(text="ok\n")


def admin_app(
    *, metrics: Handler, readyz: Handler, status: Handler, reload: Handler, token: str | None = None
) -> web.Application:
    """The admin routes, the same for one gateway and for a supervisor of several.

    Requests other than GET and HEAD need `token` as a bearer token, or, when it
    is None, a loopback peer; see the module's docstring for the rest.
    """
    app = web.Application(middlewares=[_guard_changes])
    if token is not None:
        app[_TOKEN] = token
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/status", status)
    app.router.add_post("/reload", reload)
    return app


def build_app(
    gateway: Gateway, token: str | None = None, demo: ChatBackends | None = None
) -> web.Application:
    """The admin routes, reading live state from `gateway`; `token` guards the changes.

    `demo` (in `wsgate demo`) puts its backends' stop and start buttons on the dashboard.
    """

    async def metrics(request: web.Request) -> web.Response:
        gateway.flush_metrics()
        return exposition(gateway.registry, request)

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

    async def dashboard_status() -> dict[str, Any]:
        return gateway.status()

    async def dashboard_metrics() -> Iterable[Metric]:
        gateway.flush_metrics()
        return gateway.registry.collect()

    app = admin_app(
        metrics=metrics, readyz=readyz, status=status, reload=reload, token=token
    )
    add_dashboard(app, Dashboard(dashboard_status, dashboard_metrics, demo))
    return app


class AdminSite:
    """An admin app served on one address with AppRunner and TCPSite."""

    def __init__(self) -> None:
        self._runner: web.AppRunner | None = None

    @property
    def address(self) -> tuple[str, int]:
        """The bound (host, port): the port the kernel chose when the config says 0."""
        assert self._runner is not None
        return self._runner.addresses[0][:2]

    async def start(self, app: web.Application, host: str, port: int) -> None:
        """Serve `app` on host:port; a port that cannot be bound is a `ListenError` naming `admin.bind`."""
        if _TOKEN not in app and not is_loopback(host):
            log.warning(
                "admin.bind %s is not a loopback address and no admin token is set: POST /reload is"
                " refused to all but loopback peers, and /metrics and /status are open to anyone who"
                " reaches the port; set admin.token_file or admin.token_env", format_host_port(host, port),
            )
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port).start()
        except OSError as exc:
            await runner.cleanup()
            raise ListenError.from_os_error("admin.bind", format_host_port(host, port), exc) from exc
        self._runner = runner

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


class AdminServer:
    """Serves `build_app` for one gateway on `admin.bind`; `token` guards the changes."""

    def __init__(self, gateway: Gateway, token: str | None = None, demo: ChatBackends | None = None) -> None:
        self.gateway = gateway
        self.token = token
        self.demo = demo
        self._site = AdminSite()

    @property
    def address(self) -> tuple[str, int]:
        return self._site.address

    async def start(self, host: str, port: int) -> None:
        """Bind and serve; `announce` logs it, once the listeners are bound too."""
        await self._site.start(build_app(self.gateway, self.token, self.demo), host, port)

    def announce(self) -> None:
        log.info("admin listening on %s (version %s)", format_host_port(*self.address), __version__)

    async def close(self) -> None:
        await self._site.close()
