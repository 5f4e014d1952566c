"""The admin server's live dashboard: a page at /dashboard and its feed of Server-Sent Events.

The feed reads only what the admin server already exposes: the /status
snapshot (routes, backends, health, connections) and the metrics registry
(counters turned into rates between two readings). Nothing is added to the
relay: the counts arrive as they do for /metrics, by a flush of the
connections' plain integers, here once per `FEED_INTERVAL` while a page is
open. A supervisor (`workers` > 1) feeds it its combined /status and /metrics,
so its dashboard shows the whole gateway.

The page and its files are package data, served from here with no CDN or web
font, so it works offline. It is read-only, except in `wsgate demo`, where
buttons stop and start the demo's backends through POST requests under
/dashboard/demo/ (the admin server's guard lets the page send those from its
own loopback origin; see admin.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client.core import Metric

from .hashring import HashRing
from .pages import CONTENT_TYPES, static_file

if TYPE_CHECKING:
    from .demo import ChatBackends

DASHBOARD_DIRECTORY = Path(__file__).parent / "static" / "dashboard"
# Seconds between two readings, and so between two events to each page.
FEED_INTERVAL = 1.0
# Keys sampled to show how each route's ring spreads keys over its backends.
SPREAD_SAMPLE = tuple(f"sample-key-{i}".encode() for i in range(512))
RECENT_CLOSES = 12
RECENT_RELOADS = 5
# What the page may load and where it may connect: its own origin only, and no framing.
_PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}

StatusSource = Callable[[], Awaitable[dict[str, Any]]]
MetricsSource = Callable[[], Awaitable[Iterable[Metric]]]
_Labels = tuple[tuple[str, str], ...]


def _samples(families: Iterable[Metric]) -> dict[str, dict[_Labels, float]]:
    """Every sample's value by sample name, then by its labels."""
    found: dict[str, dict[_Labels, float]] = {}
    for family in families:
        for sample in family.samples:
            labels = tuple(sorted(sample.labels.items()))
            found.setdefault(sample.name, {})[labels] = sample.value
    return found


def _by(samples: dict[_Labels, float], label: str) -> dict[str, float]:
    """`samples` summed by the value of one label (the rest summed over)."""
    sums: dict[str, float] = {}
    for labels, value in samples.items():
        key = dict(labels).get(label, "")
        sums[key] = sums.get(key, 0.0) + value
    return sums


class _Spread:
    """How a route's ring spreads keys: each backend's share of a fixed key sample."""

    def __init__(self) -> None:
        self._rings: dict[tuple[tuple[str, ...], tuple[int, ...]], HashRing] = {}

    def shares(self, backends: list[dict[str, Any]]) -> tuple[list[float], list[float]]:
        """(each backend's share when all are up, its share now that unavailable ones are skipped).

        The ring is rebuilt from the identities and weights /status reports: it is the
        one every gateway process computes from the same config.
        """
        identities = tuple(str(b["backend"]) for b in backends)
        weights = tuple(int(b["weight"]) for b in backends)
        ring = self._rings.get((identities, weights))
        if ring is None:
            ring = self._rings[identities, weights] = HashRing(identities, weights)
            while len(self._rings) > 16:  # reloads change rings; keep the recent ones
                del self._rings[next(iter(self._rings))]
        skip = {i for i, b in enumerate(backends) if not b["available"]}
        if len(skip) == len(backends):
            skip = set()  # as the pool does: with none available, all are tried
        everyone, now = [0] * len(backends), [0] * len(backends)
        for key in SPREAD_SAMPLE:
            first = ring.pick(key)
            chosen = ring.pick(key, skip=skip)
            if first is not None:
                everyone[first] += 1
            if chosen is not None:
                now[chosen] += 1
        total = len(SPREAD_SAMPLE)
        return [n / total for n in everyone], [n / total for n in now]


class Dashboard:
    """The figures the dashboard shows, read from a status and a metrics source."""

    def __init__(
        self, status: StatusSource, metrics: MetricsSource, demo: ChatBackends | None = None
    ) -> None:
        self.status = status
        self.metrics = metrics
        self.demo = demo
        self._spread = _Spread()
        self._previous: dict[str, dict[_Labels, float]] | None = None
        self._previous_at = 0.0
        self._last: dict[str, Any] | None = None
        self._rtt: dict[str, float | None] = {"client": None, "backend": None}
        self._closes: deque[dict[str, Any]] = deque(maxlen=RECENT_CLOSES)
        self._reloads: deque[dict[str, Any]] = deque(maxlen=RECENT_RELOADS)
        self.closing = asyncio.Event()

    async def snapshot(self) -> dict[str, Any]:
        """The current figures; readings closer than half an interval share one, so rates hold
        however many pages are open."""
        now = time.time()
        if self._last is not None and now - self._previous_at < FEED_INTERVAL / 2:
            return self._last
        status = await self.status()
        samples = _samples(await self.metrics())
        previous, elapsed = self._previous, now - self._previous_at
        self._previous, self._previous_at = samples, now
        self._last = self._figures(status, samples, previous, elapsed, now)
        return self._last

    def _figures(
        self,
        status: dict[str, Any],
        samples: dict[str, dict[_Labels, float]],
        previous: dict[str, dict[_Labels, float]] | None,
        elapsed: float,
        now: float,
    ) -> dict[str, Any]:
        def delta(name: str, label: str) -> dict[str, float]:
            current = _by(samples.get(name, {}), label)
            before = _by(previous.get(name, {}), label) if previous is not None else current
            # A counter that went down is a restarted worker's: count from zero.
            return {key: value - before.get(key, 0.0) if value >= before.get(key, 0.0) else value
                    for key, value in current.items()}

        def rate(name: str, label: str) -> dict[str, float]:
            if previous is None or elapsed <= 0:
                return {key: 0.0 for key in _by(samples.get(name, {}), label)}
            return {key: value / elapsed for key, value in delta(name, label).items()}

        stamp = time.strftime("%H:%M:%S", time.localtime(now))
        if previous is not None:
            closes = samples.get("wsgate_close_frames_total", {})
            before = previous.get("wsgate_close_frames_total", {})
            for labels, value in sorted(closes.items()):
                count = value - before.get(labels, 0.0)
                if count > 0:
                    self._closes.appendleft({"at": stamp, **dict(labels), "count": int(count)})
            for result, count in delta("wsgate_config_reloads_total", "result").items():
                if count > 0:
                    config = status.get("config", {})
                    self._reloads.appendleft(
                        {"at": stamp, "result": result, "count": int(count), "version": config.get("version")}
                    )
        rtt_sums = delta("wsgate_heartbeat_rtt_seconds_sum", "side")
        rtt_counts = delta("wsgate_heartbeat_rtt_seconds_count", "side")
        if previous is None:  # the first reading: the mean of everything so far
            rtt_sums = _by(samples.get("wsgate_heartbeat_rtt_seconds_sum", {}), "side")
            rtt_counts = _by(samples.get("wsgate_heartbeat_rtt_seconds_count", {}), "side")
        for side, count in rtt_counts.items():
            if count > 0:
                self._rtt[side] = rtt_sums.get(side, 0.0) / count
        demo = {state["url"]: state for state in self.demo.states()} if self.demo is not None else {}
        routes = []
        for route in status.get("routes", []):
            backends = [dict(backend) for backend in route["backends"]]
            if backends:
                ring, now_share = self._spread.shares(backends)
                for backend, share, current in zip(backends, ring, now_share, strict=True):
                    backend["ring_share"], backend["key_share"] = share, current
                    if backend["backend"] in demo:
                        backend["demo"] = demo[backend["backend"]]
            routes.append({"name": route["name"], "backends": backends})
        outcomes = samples.get("wsgate_connections_total", {})
        return {
            "at": stamp,
            "version": status.get("version"),
            "config": status.get("config", {}),
            "draining": status.get("draining", False),
            "connections": status.get("connections", 0),
            "routes": routes,
            # A page served to a plain GET is no handshake.
            "handshakes_per_second": sum(
                value for outcome, value in rate("wsgate_connections_total", "outcome").items()
                if outcome != "page"
            ),
            "upgrades_per_second": rate("wsgate_connections_total", "outcome").get("upgraded", 0.0),
            "handshakes": {outcome: int(value) for outcome, value in _by(outcomes, "outcome").items()},
            "messages_per_second": rate("wsgate_messages_total", "direction"),
            "bytes_per_second": rate("wsgate_bytes_total", "direction"),
            "heartbeat_rtt": dict(self._rtt),
            "recent_closes": list(self._closes),
            "reloads": {
                "totals": {
                    result: int(count)
                    for result, count in _by(samples.get("wsgate_config_reloads_total", {}), "result").items()
                },
                "recent": list(self._reloads),
            },
            "workers": [
                {
                    "index": worker["index"],
                    "pid": worker["pid"],
                    "restarts": worker["restarts"],
                    "connections": worker["status"].get("connections"),
                    "error": worker["status"].get("error"),
                }
                for worker in status.get("workers", [])
            ],
            "demo": self.demo is not None,
        }


def _page_response(path: Path) -> web.Response:
    content_type = CONTENT_TYPES.get(path.suffix, "application/octet-stream")
    response = web.Response(body=path.read_bytes(), headers=_PAGE_HEADERS)
    response.headers["Content-Type"] = content_type
    return response


def add_dashboard(app: web.Application, dashboard: Dashboard) -> None:
    """Serve `dashboard` on `app`: the page, its files, its event feed, and the demo's controls."""

    async def page(request: web.Request) -> web.Response:
        return _page_response(DASHBOARD_DIRECTORY / "index.html")

    async def asset(request: web.Request) -> web.Response:
        path = static_file(DASHBOARD_DIRECTORY, request.match_info["name"])
        if path is None:
            raise web.HTTPNotFound(text="no such file\n")
        return _page_response(path)

    async def events(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)
        while not dashboard.closing.is_set():
            data = json.dumps(await dashboard.snapshot(), separators=(",", ":"))
            try:
                await response.write(f"data: {data}\n\n".encode())
            except ConnectionResetError:
                break  # the page went away
            # The next reading is due; a shutdown ends the stream at once instead.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(dashboard.closing.wait(), FEED_INTERVAL)
        return response

    async def demo_control(request: web.Request) -> web.Response:
        assert dashboard.demo is not None
        backend = dashboard.demo.by_name(request.match_info["name"])
        if backend is None:
            raise web.HTTPNotFound(text="no such demo backend\n")
        if request.match_info["action"] == "stop":
            await backend.stop()
        else:
            await backend.start()
        return web.json_response({"name": backend.name, "running": backend.running})

    async def end_streams(app: web.Application) -> None:
        dashboard.closing.set()

    app.on_shutdown.append(end_streams)
    app.router.add_get("/dashboard", page)
    app.router.add_get("/dashboard/", page)
    app.router.add_get("/dashboard/events", events)
    app.router.add_get("/dashboard/{name}", asset)
    if dashboard.demo is not None:
        app.router.add_post("/dashboard/demo/{name}/{action:stop|start}", demo_control)
