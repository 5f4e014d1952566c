"""Several worker processes behind the same listeners, supervised (`workers: N`).

The supervisor binds its admin port and every listener (once per worker, with
SO_REUSEPORT, so the kernel spreads new connections over the workers and port
0 still means one port for all) before it starts a worker, and it keeps those
sockets while workers come and go: a worker that dies is started again on the
same sockets. Workers read their config from a snapshot the supervisor writes,
so a restarted worker serves exactly what its siblings serve; a reload is the
supervisor's: it validates the file, writes the next snapshot and asks every
worker to load it. A worker whose supervisor dies, however it dies, drains and
exits: the kernel closes the supervisor's end of a pipe every worker watches,
and its end of file means the same as SIGTERM. (PR_SET_PDEATHSIG is not used: it
fires again for each thread of the dying supervisor, and a second SIGTERM means
"do not wait for the drain".) The one admin endpoint is the supervisor's: it asks every
worker's private admin server and combines what they say. Hashing needs no
coordination: every worker computes the same ring from the same config.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families

from . import __version__
from .admin import AdminSite, admin_app, exposition
from .dashboard import Dashboard, add_dashboard
from .config import (
    Config, Log, dump_config_data, format_host_port, keep_restart_settings, load_config, load_config_data,
    parse_config, read_admin_token,
)
from .errors import ConfigError, ListenError, WorkerError
from .gateway import LISTEN_BACKLOG, METRICS_FLUSH_INTERVAL, config_digest, iso_timestamp
from .runtime import log_reloader, reload_on_sighup, run, serve, setup_logging, stop_on_signals
from .tls import check_files

log = logging.getLogger("wsgate.workers")

# How a worker learns the admin token: from the supervisor, which read it once at start,
# so a worker started later takes the token the supervisor sends even if the file changed.
_WORKER_TOKEN_ENV = "WSGATE_WORKER_ADMIN_TOKEN"

# How a gauge from several workers combines; every other series is summed.
_GAUGE_COMBINE = {
    "wsgate_build_info": max,
    "python_info": max,
    "wsgate_ring_imbalance": max,
    "wsgate_backend_up": min,
    "process_start_time_seconds": min,
    "process_max_fds": min,
}
# Every worker counts the same certificate reloads: the largest count is the count.
_COUNTER_COMBINE = {"wsgate_config_reloads": max}
_RESTART_BACKOFF_CAP = 30.0
# A worker that ran this long before dying restarts at once, not after a grown backoff.
_STABLE_UPTIME = 60.0


def bind_listener(host: str, port: int) -> socket.socket:
    """A listening socket that other sockets may share the port of (SO_REUSEPORT)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(LISTEN_BACKLOG)
    except BaseException:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


class Worker:
    """One worker process and what the supervisor knows of it."""

    def __init__(self, index: int, sockets: dict[str, socket.socket]) -> None:
        self.index = index
        self.sockets = sockets
        self.process: asyncio.subprocess.Process | None = None
        self.admin_port: int | None = None
        self.ready = False  # serving, with its signal handlers in place
        self.started_at = 0.0
        self.restarts = 0  # in all
        self.crashes = 0  # in a row, each soon after starting: what the backoff grows with
        self.snapshot = 0  # the config snapshot it was started with

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None


class Supervisor:
    """Starts, watches and stops the workers; owns reloads; serves the combined admin endpoint."""

    def __init__(self, config: Config, config_path: str, count: int, log_level: str | None = None) -> None:
        self.config = config
        self.log_level = log_level  # the command line's, which the workers follow too
        self.config_path = config_path
        self.count = count
        self.workers: list[Worker] = []
        self.stopping = False
        self.loaded_at = time.time()
        self.totals = _Totals()
        self._data: dict[str, Any] = {}  # the running config as YAML data, for the next snapshot
        self._snapshots = 0
        self._snapshot_dir: str | None = None
        self._lifeline: tuple[int, int] | None = None
        self.restart_needed: list[str] = []  # as of the last reload
        self._reload_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._admin_site: AdminSite | None = None
        self._session: aiohttp.ClientSession | None = None
        self._admin_token: str | None = None  # what a POST /reload must carry, to it and to its workers
        # SIGHUP and POST /reload are the supervisor's, counted once here, not once per worker.
        self.reloads = {"success": 0, "failure": 0}
        # Set by the CLI: sets the supervisor's own logging up again from a reloaded `log`.
        self.apply_log: Callable[[Log], None] | None = None

    @property
    def snapshot_path(self) -> str:
        assert self._snapshot_dir is not None
        return os.path.join(self._snapshot_dir, "wsgate.yaml")

    # -- lifecycle -------------------------------------------------------------

    async def start(self) -> None:
        """Bind everything, then start the workers; on any failure stop what was started."""
        try:
            await self._start()
        except BaseException:
            await self.stop()
            raise

    async def _start(self) -> None:
        # The config run is the data snapshotted, read once here: a file edited since
        # `wsgate run` validated it cannot make the two differ.
        self._data = load_config_data(self.config_path)
        self.config = parse_config(self._data, self.config_path)
        check_files(self.config)
        if self.config.admin.enabled:
            self._admin_token = read_admin_token(self.config.admin)
        # The workers' private admin servers take the same token.
        auth = {"Authorization": f"Bearer {self._admin_token}"} if self._admin_token else None
        self._session = aiohttp.ClientSession(headers=auth)
        if self.config.admin.enabled:
            self._admin_site = AdminSite()
            await self._admin_site.start(self._admin_app(), self.config.admin.host, self.config.admin.port)
        sockets: list[dict[str, socket.socket]] = [{} for _ in range(self.count)]
        self.workers = [Worker(i, sockets[i]) for i in range(self.count)]  # so stop() closes them all
        ports = []
        for i, listener in enumerate(self.config.listeners):
            try:
                first = bind_listener(listener.host, listener.port)
                sockets[0][listener.name] = first
                port = first.getsockname()[1]
                for own in sockets[1:]:
                    own[listener.name] = bind_listener(listener.host, port)
            except OSError as exc:
                raise ListenError.from_os_error(f"listeners[{i}].bind", listener.bind, exc) from exc
            ports.append(port)
        self._snapshot_dir = tempfile.mkdtemp(prefix="wsgate-")
        self._write_snapshot(self._data)
        self._lifeline = os.pipe()
        for worker in self.workers:
            await self._spawn(worker)
            if not worker.ready:
                self.stopping = True  # the start has failed: nothing is to be restarted
                # Its report pipe closed, which can come before the exit status does.
                try:
                    status: int | str = await asyncio.wait_for(worker.process.wait(), 5.0)
                except TimeoutError:
                    status = "unknown"
                raise WorkerError(worker.index, f"exited with status {status} before serving")
        for listener, port in zip(self.config.listeners, ports, strict=True):
            log.info(
                "listening on %s (%s, %d workers)",
                format_host_port(listener.host, port), listener.name, self.count,
            )
        if self._admin_site is not None:
            log.info("admin listening on %s", format_host_port(*self._admin_site.address))
        self._keep(self._remember_metrics())

    def _keep(self, coroutine: Any) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _write_snapshot(self, data: dict[str, Any]) -> None:
        """The config the workers serve, replaced whole so a starting worker never reads half."""
        partial = self.snapshot_path + ".new"
        with open(partial, "w", encoding="utf-8") as file:
            # Escaped, so a worker's own substitution gives back exactly this data.
            file.write(dump_config_data(data))
        os.replace(partial, self.snapshot_path)
        self._snapshots += 1

    async def _spawn(self, worker: Worker) -> None:
        assert self._lifeline is not None
        read_fd, write_fd = os.pipe()
        lifeline = self._lifeline[0]
        fds = {name: sock.fileno() for name, sock in worker.sockets.items()}
        argv = [
            sys.executable, "-m", "wsgate", "_worker", "-c", self.snapshot_path,
            "--index", str(worker.index), "--report-fd", str(write_fd), "--lifeline-fd", str(lifeline),
        ]
        for name, fd in fds.items():
            argv += ["--listen", f"{name}={fd}"]
        if self.log_level:
            argv += ["--log-level", self.log_level]
        worker.ready = False
        worker.started_at = asyncio.get_running_loop().time()
        worker.snapshot = self._snapshots
        # A session of its own: a terminal's Ctrl-C reaches the supervisor only,
        # which forwards one signal, rather than every worker twice.
        try:
            worker.process = await asyncio.create_subprocess_exec(
                *argv, pass_fds=[write_fd, lifeline, *fds.values()], start_new_session=True,
                env={**os.environ, _WORKER_TOKEN_ENV: self._admin_token or ""},
            )
        finally:
            os.close(write_fd)
        # The worker writes its private admin port once it serves; EOF means it died first.
        loop = asyncio.get_running_loop()
        with os.fdopen(read_fd, "rb") as report:
            line = await loop.run_in_executor(None, report.readline)
        worker.admin_port = int(line) if line.strip() else None
        worker.ready = worker.admin_port is not None
        self._keep(self._watch(worker))
        if worker.ready and worker.snapshot != self._snapshots:
            # A reload came while it was starting and may have missed it: catch up now.
            await self._ask_one(worker, "/reload", "POST")

    async def _watch(self, worker: Worker) -> None:
        """Restart a worker that exits while the supervisor is not stopping."""
        assert worker.process is not None
        status = await worker.process.wait()
        self.totals.retire(worker.index)
        if self.stopping:
            return
        worker.ready = False
        worker.restarts += 1
        if asyncio.get_running_loop().time() - worker.started_at > _STABLE_UPTIME:
            worker.crashes = 0  # it had been running fine: no reason to wait long
        worker.crashes += 1
        delay = min(_RESTART_BACKOFF_CAP, 0.1 * 2 ** min(worker.crashes - 1, 10))
        log.error("worker %d exited with status %s; starting it again in %.1fs", worker.index, status, delay)
        await asyncio.sleep(delay)
        if not self.stopping:
            await self._spawn(worker)

    def forward(self, signum: int) -> None:
        """Send `signum` to the running workers."""
        for worker in self.workers:
            if worker.running:
                assert worker.process is not None
                worker.process.send_signal(signum)

    async def stop(self, signum: int = signal.SIGTERM) -> int:
        """Forward `signum` (workers drain), wait for them; the exit status for the supervisor.

        Only workers that were serving count: one that had died, or was still starting
        (and so had no connections to drain), does not make the exit a failure.
        """
        self.stopping = True
        serving = [w for w in self.workers if w.ready and w.running]
        self.forward(signum)
        for worker in self.workers:
            if worker.process is not None:
                await worker.process.wait()
        statuses = [worker.process.returncode for worker in serving if worker.process]
        for task in list(self._tasks):
            task.cancel()
        if self._admin_site is not None:
            await self._admin_site.close()
        if self._session is not None:
            await self._session.close()
        for worker in self.workers:
            for sock in worker.sockets.values():
                sock.close()
        if self._lifeline is not None:
            for fd in self._lifeline:
                os.close(fd)
            self._lifeline = None
        if self._snapshot_dir is not None:
            shutil.rmtree(self._snapshot_dir, ignore_errors=True)
        return 0 if all(status == 0 for status in statuses) else 1

    # -- reload ----------------------------------------------------------------

    async def reload(self) -> tuple[bool, str]:
        """Validate the config file, hand it to every worker; (reloaded, the answer for the operator)."""
        async with self._reload_lock:
            try:
                data = load_config_data(self.config_path)
                config = parse_config(data, self.config_path)
                check_files(config)
            except ConfigError as exc:
                self.reloads["failure"] += 1
                log.error("reload refused; keeping the running config: %s", exc)
                return False, f"reload refused: {exc}"
            data, ignored = self._restart_only(data, config)
            config = parse_config(data, self.config_path)
            self._write_snapshot(data)
            # A worker not serving yet reads the new snapshot as it starts (or catches up in _spawn).
            serving = [worker for worker in self.workers if worker.ready and worker.running]
            answers = await asyncio.gather(*(self._ask_one(worker, "/reload", "POST") for worker in serving))
            refused = {w.index: body for w, (status, body) in zip(serving, answers, strict=True) if status != 200}
            if refused:
                self._write_snapshot(self._data)  # restarted workers keep to the running config
                self.reloads["failure"] += 1
                answer = one_answer("reload refused: ", refused, len(serving))
                log.error("%s", answer)
                return False, answer
            self.config, self._data, self.loaded_at = config, data, time.time()
            self.restart_needed = ignored
            self.reloads["success"] += 1
            if self.apply_log is not None:
                self.apply_log(config.log)
            version = config_digest(config)
            log.info("reloaded %s (config version %s)", self.config_path, version)
            answer = f"reloaded, config version {version}"
            if ignored:
                answer += "; ignored until a restart: " + ", ".join(ignored)
            return True, answer

    def _restart_only(self, data: dict[str, Any], config: Config) -> tuple[dict[str, Any], list[str]]:
        """`data` with what only a restart can change put back as it runs, and those keys."""
        _, kept = keep_restart_settings(self.config, config, supervised=True)
        data = dict(data)
        for key in ("listeners", "workers"):
            if key in kept:
                data.pop(key, None)
                if key in self._data:
                    data[key] = self._data[key]
        admin = {key.removeprefix("admin."): key for key in kept if key.startswith("admin.")}
        if admin:
            running = self.config.admin
            data["admin"] = {**(data.get("admin") or {}), **{key: getattr(running, key) for key in admin}}
        if kept:
            log.warning("ignored until a restart: %s", ", ".join(kept))
        return data, kept

    # -- the combined admin endpoint -----------------------------------------------

    async def _ask_one(self, worker: Worker, path: str, method: str = "GET") -> tuple[int, str]:
        """(status, body) from one worker's admin server; 503 when it is not running."""
        assert self._session is not None
        if worker.admin_port is None or not worker.running:
            return 503, "not running"
        url = f"http://127.0.0.1:{worker.admin_port}{path}"
        try:
            async with self._session.request(method, url, timeout=aiohttp.ClientTimeout(total=5)) as r:
                return r.status, await r.text()
        except (aiohttp.ClientError, TimeoutError) as exc:
            return 503, f"no answer: {exc!r}"

    async def _ask(self, path: str, method: str = "GET") -> list[tuple[int, str]]:
        """(status, body) from every worker's admin server, in worker order."""
        return list(await asyncio.gather(*(self._ask_one(worker, path, method) for worker in self.workers)))

    async def _scrape(self) -> list[str]:
        texts = {}
        for worker, (status, body) in zip(self.workers, await self._ask("/metrics"), strict=True):
            if status == 200:
                texts[worker.index] = body
        self.totals.remember(texts)
        return list(texts.values())

    async def _remember_metrics(self) -> None:
        """Scrape the workers now and then, so a worker that dies leaves recent totals behind."""
        while True:
            await asyncio.sleep(METRICS_FLUSH_INTERVAL)
            await self._scrape()

    def status(self, answers: list[tuple[int, str]]) -> dict[str, Any]:
        """/status: the gateway's shape (summed over the workers), plus each worker's own."""
        workers, views = [], []
        for worker, (code, body) in zip(self.workers, answers, strict=True):
            view: dict[str, Any] = json.loads(body) if code == 200 else {"error": body.strip()}
            view.pop("workers", None)
            if code == 200:
                views.append(view)
            pid = worker.process.pid if worker.process else None
            workers.append({"index": worker.index, "pid": pid, "restarts": worker.restarts, "status": view})
        return {
            **(views[0] if views else {}),
            "version": __version__,
            "config": {
                "version": config_digest(self.config),
                "loaded_at": iso_timestamp(self.loaded_at),
                "restart_needed": self.restart_needed,
            },
            "draining": self.stopping or any(view["draining"] for view in views),
            "connections": sum(view["connections"] for view in views),
            "routes": _combined_routes(views),
            "workers": workers,
        }

    def _admin_app(self) -> web.Application:
        async def metrics(request: web.Request) -> web.Response:
            texts = await self._scrape()
            registry = CollectorRegistry()
            registry.register(_Summed(texts, self.totals, self.reloads))
            return exposition(registry, request)

        async def readyz(request: web.Request) -> web.Response:
            if self.stopping:
                return web.Response(status=503, text="not ready: stopping\n")
            answers = await self._ask("/readyz")
            problems = {i: body for i, (status, body) in enumerate(answers) if status != 200}
            if problems:
                return web.Response(status=503, text=one_answer("not ready: ", problems, len(answers)) + "\n")
            return web.Response(text="ready\n")

        async def status(request: web.Request) -> web.Response:
            return web.json_response(self.status(await self._ask("/status")))

        async def reload(request: web.Request) -> web.Response:
            reloaded, answer = await self.reload()
            return web.Response(status=200 if reloaded else 400, text=answer + "\n")

        async def dashboard_status() -> dict[str, Any]:
            return self.status(await self._ask("/status"))

        async def dashboard_metrics() -> Iterable[Metric]:
            return _Summed(await self._scrape(), self.totals, self.reloads).collect()

        app = admin_app(
            metrics=metrics, readyz=readyz, status=status, reload=reload,
            token=self._admin_token,
        )
        add_dashboard(app, Dashboard(dashboard_status, dashboard_metrics))
        return app


def one_answer(prefix: str, problems: dict[int, str], workers: int) -> str:
    """Workers' refusals said once: `prefix` and the reason, naming workers only when they disagree."""
    reasons: dict[str, list[int]] = {}
    for index, body in sorted(problems.items()):
        reason = body.strip().removeprefix(prefix.strip()).strip()
        reasons.setdefault(reason, []).append(index)
    if len(reasons) == 1 and len(problems) == workers:
        return prefix + next(iter(reasons))
    parts = []
    for reason, indexes in reasons.items():
        which = ", ".join(str(i) for i in indexes)
        parts.append(f"{reason} (worker{'s' if len(indexes) > 1 else ''} {which})")
    return prefix + "; ".join(parts)


def _combined_routes(views: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every worker's view of the routes as one: connections add up, health holds if it holds in all."""
    if not views:
        return []
    routes = []
    for r, route in enumerate(views[0]["routes"]):
        backends = []
        for b, backend in enumerate(route["backends"]):
            same = [view["routes"][r]["backends"][b] for view in views]
            backends.append({
                **backend,
                "healthy": all(item["healthy"] for item in same),
                "ejected": any(item["ejected"] for item in same),
                "available": all(item["available"] for item in same),
                "active_connections": sum(item["active_connections"] for item in same),
            })
        routes.append({**route, "backends": backends})
    return routes


_Key = tuple[str, str, tuple[tuple[str, str], ...]]


class _Totals:
    """The counts of workers that died, so that the supervisor's counters never go down."""

    def __init__(self) -> None:
        self.latest: dict[int, str] = {}  # each live worker's last exposition
        self.retired: dict[_Key, float] = {}
        self.families: dict[str, Metric] = {}

    def remember(self, texts: dict[int, str]) -> None:
        self.latest.update(texts)

    def retire(self, index: int) -> None:
        """Keep worker `index`'s last counts: it died, and a replacement starts from zero."""
        text = self.latest.pop(index, None)
        if text is None:
            return
        for family in text_string_to_metric_families(text):
            if family.type not in ("counter", "histogram", "summary"):
                continue  # a gauge of a dead worker is gone with it
            self.families.setdefault(family.name, family)
            combine = _COUNTER_COMBINE.get(family.name)
            for sample in family.samples:
                if sample.name.endswith("_created"):
                    continue
                key = (family.name, sample.name, tuple(sorted(sample.labels.items())))
                before = self.retired.get(key, 0.0)
                self.retired[key] = combine(before, sample.value) if combine else before + sample.value


class _Summed:
    """A collector that yields several workers' exposition texts, and the dead ones' totals, as one."""

    def __init__(self, texts: Iterable[str], totals: _Totals, reloads: dict[str, int]) -> None:
        self.texts = list(texts)
        self.totals = totals
        self.reloads = reloads  # the supervisor's own, added to the workers' certificate reloads

    def collect(self) -> Iterable[Metric]:
        families: dict[str, Metric] = dict(self.totals.families)
        values: dict[_Key, list[float]] = {key: [value] for key, value in self.totals.retired.items()}
        for text in self.texts:
            for family in text_string_to_metric_families(text):
                families.setdefault(family.name, family)
                for sample in family.samples:
                    key = (family.name, sample.name, tuple(sorted(sample.labels.items())))
                    values.setdefault(key, []).append(sample.value)
        own_reloads = dict(self.reloads)
        for name, family in families.items():
            merged = Metric(family.name, family.documentation, family.type)
            combine = _GAUGE_COMBINE.get(name, sum) if family.type == "gauge" else _COUNTER_COMBINE.get(name, sum)
            if family.type == "info":
                combine = max
            for (family_name, sample_name, labels), numbers in values.items():
                if family_name == name:
                    # A counter's or histogram's creation time is a timestamp: the earliest, not a sum.
                    how = min if sample_name.endswith("_created") else combine
                    value = how(numbers)
                    if sample_name == "wsgate_config_reloads_total":
                        value += own_reloads.pop(dict(labels)["result"], 0)
                    merged.add_sample(sample_name, dict(labels), value)
            if name == "wsgate_config_reloads":
                for result, count in own_reloads.items():
                    if count:
                        merged.add_sample("wsgate_config_reloads_total", {"result": result}, count)
            yield merged


async def supervise(config: Config, config_path: str, log_level: str | None) -> int:
    """`wsgate run` with `workers` > 1: start the workers, reload on SIGHUP, stop on SIGTERM."""
    supervisor = Supervisor(config, config_path, config.workers, log_level)
    stop = stop_on_signals("stopping the workers now", lambda: supervisor.forward(signal.SIGKILL))
    reload_on_sighup(supervisor.reload)
    supervisor.apply_log = log_reloader(config.log, log_level)
    await supervisor.start()
    await stop.wait()
    # Under the process's own logger, as a single gateway says it.
    logging.getLogger("wsgate").info("stop signal: draining %d workers", len(supervisor.workers))
    return await supervisor.stop(signal.SIGTERM)


def worker_main(
    config_path: str, index: int, report_fd: int, listen: list[str], lifeline_fd: int, log_level: str | None
) -> int:
    """The `_worker` subcommand: serve on inherited sockets, report the admin port."""
    config = load_config(config_path)
    setup_logging(log_level or config.log.level, config.log.format, config.log.access)
    sockets = {}
    for item in listen:
        name, _, fd = item.partition("=")
        sockets[name] = socket.socket(fileno=int(fd))

    def report(gateway: Any, admin_server: Any) -> None:
        os.write(report_fd, f"{admin_server.address[1]}\n".encode())
        os.close(report_fd)

    logging.getLogger("wsgate").info("worker %d serving (pid %d)", index, os.getpid())
    # The private admin server answers the supervisor only: on loopback, with its token if any.
    token = os.environ.pop(_WORKER_TOKEN_ENV, "") or None
    serving = serve(
        config, report, config_path=config_path, sockets=sockets,
        lifeline=lifeline_fd, admin_address=("127.0.0.1", 0), log_level=log_level, admin_token=token,
    )
    return run(serving)
