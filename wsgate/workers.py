"""Several worker processes behind the same listeners, supervised (`workers: N`).

The supervisor binds every listener once per worker with SO_REUSEPORT, so the
kernel spreads new connections over the workers (and port 0 still means one
port for all), and it keeps those sockets while workers come and go: a worker
that dies is started again on the same sockets. Signals are forwarded to the
workers. The one admin endpoint is the supervisor's: it asks every worker's
private admin server and sums what they say. Hashing needs no coordination:
every worker computes the same ring from the same config.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable, Iterable
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families

from .admin import admin_app, exposition
from .config import Config, format_host_port, load_config

log = logging.getLogger("wsgate.workers")

# How a gauge from several workers combines; every other series is summed.
_GAUGE_COMBINE = {
    "wsgate_build_info": max,
    "python_info": max,
    "wsgate_ring_imbalance": max,
    "wsgate_backend_up": min,
    "process_start_time_seconds": min,
    "process_max_fds": min,
}
_RESTART_BACKOFF_CAP = 30.0
# A worker that ran this long before dying restarts at once, not after a grown backoff.
_STABLE_UPTIME = 60.0


def bind_listener(host: str, port: int) -> socket.socket:
    """A listening socket that other sockets may share the port of (SO_REUSEPORT)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(1024)
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


class Supervisor:
    """Starts, watches and stops the workers; serves the aggregated admin endpoint."""

    def __init__(self, config: Config, config_path: str, count: int) -> None:
        self.config = config
        self.config_path = config_path
        self.count = count
        self.workers: list[Worker] = []
        self.stopping = False
        self._watchers: set[asyncio.Task[None]] = set()
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        # Called on POST /reload, before the workers are asked (the CLI reloads its logging).
        self.on_reload: Callable[[], None] | None = None

    # -- lifecycle -------------------------------------------------------------

    async def start(self) -> None:
        sockets: list[dict[str, socket.socket]] = [{} for _ in range(self.count)]
        for listener in self.config.listeners:
            first = bind_listener(listener.host, listener.port)
            port = first.getsockname()[1]
            sockets[0][listener.name] = first
            for i in range(1, self.count):
                sockets[i][listener.name] = bind_listener(listener.host, port)
            log.info(
                "listening on %s (%s, %d workers)",
                format_host_port(listener.host, port), listener.name, self.count,
            )
        self.workers = [Worker(i, sockets[i]) for i in range(self.count)]
        self._session = aiohttp.ClientSession()
        for worker in self.workers:
            await self._spawn(worker)
        if self.config.admin.enabled:
            self._runner = web.AppRunner(self._admin_app(), access_log=None)
            await self._runner.setup()
            await web.TCPSite(self._runner, self.config.admin.host, self.config.admin.port).start()
            log.info("admin listening on %s", format_host_port(*self._runner.addresses[0][:2]))

    async def _spawn(self, worker: Worker) -> None:
        read_fd, write_fd = os.pipe()
        fds = {name: sock.fileno() for name, sock in worker.sockets.items()}
        argv = [
            sys.executable, "-m", "wsgate", "_worker", "-c", self.config_path,
            "--index", str(worker.index), "--report-fd", str(write_fd),
        ]
        for name, fd in fds.items():
            argv += ["--listen", f"{name}={fd}"]
        worker.ready = False
        worker.started_at = asyncio.get_running_loop().time()
        # A session of its own: a terminal's Ctrl-C reaches the supervisor only,
        # which forwards one signal, rather than every worker twice.
        worker.process = await asyncio.create_subprocess_exec(
            *argv, pass_fds=[write_fd, *fds.values()], start_new_session=True
        )
        os.close(write_fd)
        # The worker writes its private admin port once it serves; EOF means it died first.
        loop = asyncio.get_running_loop()
        with os.fdopen(read_fd, "rb") as report:
            line = await loop.run_in_executor(None, report.readline)
        worker.admin_port = int(line) if line.strip() else None
        worker.ready = worker.admin_port is not None
        task = loop.create_task(self._watch(worker))
        self._watchers.add(task)
        task.add_done_callback(self._watchers.discard)

    async def _watch(self, worker: Worker) -> None:
        """Restart a worker that exits while the supervisor is not stopping."""
        assert worker.process is not None
        status = await worker.process.wait()
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

    def forward(self, signum: int, *, ready_only: bool = False) -> None:
        """Send `signum` to the running workers (with `ready_only`, to those past start-up:
        a SIGHUP would kill one whose handlers are not in place yet, and it reads the
        current file anyway)."""
        for worker in self.workers:
            if worker.process is not None and worker.process.returncode is None:
                if worker.ready or not ready_only:
                    worker.process.send_signal(signum)

    async def stop(self, signum: int = signal.SIGTERM) -> int:
        """Forward `signum` (workers drain), wait for them; the exit status for the supervisor.

        Only workers that were serving count: one that had died, or was still starting
        (and so had no connections to drain), does not make the exit a failure.
        """
        self.stopping = True
        serving = [w for w in self.workers if w.ready and w.process and w.process.returncode is None]
        self.forward(signum)
        for worker in self.workers:
            if worker.process is not None:
                await worker.process.wait()
        statuses = [worker.process.returncode for worker in serving if worker.process]
        for task in list(self._watchers):
            task.cancel()
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()
        for worker in self.workers:
            for sock in worker.sockets.values():
                sock.close()
        return 0 if all(status == 0 for status in statuses) else 1

    # -- the aggregated admin endpoint ---------------------------------------------

    async def _ask(self, path: str, method: str = "GET") -> list[tuple[int, str]]:
        """(status, body) from every live worker's admin server."""
        assert self._session is not None
        answers = []
        for worker in self.workers:
            if worker.admin_port is None or worker.process is None or worker.process.returncode is not None:
                answers.append((503, f"worker {worker.index} is not running"))
                continue
            url = f"http://127.0.0.1:{worker.admin_port}{path}"
            try:
                async with self._session.request(method, url, timeout=aiohttp.ClientTimeout(total=5)) as r:
                    answers.append((r.status, await r.text()))
            except (aiohttp.ClientError, TimeoutError) as exc:
                answers.append((503, f"worker {worker.index}: {exc!r}"))
        return answers

    def _admin_app(self) -> web.Application:
        async def metrics(request: web.Request) -> web.Response:
            texts = [body for status, body in await self._ask("/metrics") if status == 200]
            registry = CollectorRegistry()
            registry.register(_Summed(texts))
            return exposition(registry, request)

        async def healthz(request: web.Request) -> web.Response:
            return web.Response(text="ok\n")

        async def readyz(request: web.Request) -> web.Response:
            answers = await self._ask("/readyz")
            bad = [body.strip() for status, body in answers if status != 200]
            if self.stopping or bad:
                return web.Response(status=503, text="not ready: " + ("; ".join(bad) or "stopping") + "\n")
            return web.Response(text="ready\n")

        async def status(request: web.Request) -> web.Response:
            answers = await self._ask("/status")
            workers = []
            for worker, (code, body) in zip(self.workers, answers, strict=True):
                entry: dict[str, Any] = {
                    "index": worker.index,
                    "pid": worker.process.pid if worker.process else None,
                    "restarts": worker.restarts,
                }
                entry["status"] = json.loads(body) if code == 200 else {"error": body}
                workers.append(entry)
            return web.json_response({"workers": workers})

        async def reload(request: web.Request) -> web.Response:
            if self.on_reload is not None:
                self.on_reload()
            answers = await self._ask("/reload", "POST")
            refused = [body.strip() for status, body in answers if status != 200]
            if refused:
                return web.Response(status=400, text="reload refused: " + "; ".join(refused) + "\n")
            return web.Response(text=answers[0][1] if answers else "no workers\n")

        return admin_app(metrics=metrics, healthz=healthz, readyz=readyz, status=status, reload=reload)


class _Summed:
    """A collector that yields several workers' exposition texts as one."""

    def __init__(self, texts: Iterable[str]) -> None:
        self.texts = list(texts)

    def collect(self) -> Iterable[Metric]:
        families: dict[str, Metric] = {}
        values: dict[tuple[str, str, tuple[tuple[str, str], ...]], list[float]] = {}
        for text in self.texts:
            for family in text_string_to_metric_families(text):
                families.setdefault(family.name, family)
                for sample in family.samples:
                    key = (family.name, sample.name, tuple(sorted(sample.labels.items())))
                    values.setdefault(key, []).append(sample.value)
        for name, family in families.items():
            merged = Metric(family.name, family.documentation, family.type)
            combine = _GAUGE_COMBINE.get(name, sum) if family.type == "gauge" else sum
            if family.type == "info":
                combine = max
            for (family_name, sample_name, labels), numbers in values.items():
                if family_name == name:
                    # A counter's or histogram's creation time is a timestamp: the earliest, not a sum.
                    how = min if sample_name.endswith("_created") else combine
                    merged.add_sample(sample_name, dict(labels), how(numbers))
            yield merged


def worker_main(config_path: str, index: int, report_fd: int, listen: list[str]) -> int:
    """The `_worker` subcommand: serve on inherited sockets, report the admin port."""
    from .cli import _run_loop, _serve, _setup_logging

    config = load_config(config_path)
    _setup_logging(config.log.level, config.log.format, config.log.access)
    sockets = {}
    for item in listen:
        name, _, fd = item.partition("=")
        sockets[name] = socket.socket(fileno=int(fd))

    def report(gateway: Any, admin_server: Any) -> None:
        os.write(report_fd, f"{admin_server.address[1]}\n".encode())
        os.close(report_fd)

    logging.getLogger("wsgate").info("worker %d serving (pid %d)", index, os.getpid())
    return _run_loop(_serve(config, report, config_path=config_path, sockets=sockets))
