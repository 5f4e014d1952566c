"""The process around a gateway: the event loop, logging, the open-file limit, signals, the serve loop.

`wsgate run` with one process and each worker of `workers: N` serve through
`serve`; the supervisor of the workers shares the signal handling and the
loop runner. Exit codes are 0 (ok), 1 (failure) and 2 (bad config).
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import resource
import signal
import socket
import sys
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from .admin import AdminServer
from .books import AccessLineHandler, iso_time
from .config import Config, Log, read_admin_token
from .errors import ConfigError, ListenError, WorkerError
from .gateway import Gateway

if TYPE_CHECKING:
    from .demo import ChatBackends

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2

log = logging.getLogger("wsgate")


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop where it is installed, else stock asyncio's."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def run(main: Coroutine[Any, Any, Any], hints: dict[str, str] | None = None) -> int:
    """Run `main` to its exit status; `hints` add a word to a `ListenError` by its key."""
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        try:
            status = runner.run(main)
            if isinstance(status, int):
                return status
        except ConfigError as exc:
            print(f"wsgate: invalid configuration: {exc}", file=sys.stderr)
            return EXIT_CONFIG
        except ListenError as exc:
            exc.hint = exc.hint or (hints or {}).get(exc.path, "")
            print(f"wsgate: {exc}", file=sys.stderr)
            return EXIT_FAILURE
        except WorkerError as exc:
            print(f"wsgate: {exc}", file=sys.stderr)
            return EXIT_FAILURE
        except OSError as exc:
            print(f"wsgate: cannot start: {exc}", file=sys.stderr)
            return EXIT_FAILURE
    return EXIT_OK


# -- logging -------------------------------------------------------------------


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": iso_time(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def setup_logging(level: str, fmt: str, access: bool = True) -> None:
    """Log lines at `level` on stderr, as text or JSON; access lines (if `access`) as JSON on stdout."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Access lines are data for collectors: JSON on stdout, whatever the log level.
    access_log = logging.getLogger("wsgate.access")
    access_log.propagate = False
    access_log.setLevel(logging.INFO if access else logging.CRITICAL + 1)
    access_log.handlers[:] = [AccessLineHandler(sys.stdout)]


def log_reloader(started: Log, level: str | None) -> Callable[[Log], None]:
    """What a reload calls with the file's new `log` settings, to set logging up again.

    A `--log-level` from the command line holds until the file's own log.level
    changes: the level set last wins.
    """
    current = started

    def reload(settings: Log) -> None:
        nonlocal current, level
        if settings.level != current.level:
            level = None
        current = settings
        setup_logging(level or settings.level, settings.format, settings.access)

    return reload


# -- the open-file limit -------------------------------------------------------

# Descriptors a gateway holds besides its connections: listeners, admin, logs, probes.
_FD_RESERVE = 256


def raise_fd_limit(config: Config) -> None:
    """Lift the soft descriptor limit to the hard one, and warn when max_connections cannot fit.

    A proxied connection holds two descriptors, and many systems start
    processes with a soft limit of 1,024.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-file limit from %d to %d: %s", soft, hard, exc)
    need = 2 * config.limits.max_connections + _FD_RESERVE
    if soft != resource.RLIM_INFINITY and soft < need:
        log.warning(
            "limits.max_connections is %d, which needs about %d open files, but this process may"
            " open %d: connections beyond about %d will fail to be accepted; raise the limit"
            " (ulimit -n, LimitNOFILE= under systemd) or lower limits.max_connections",
            config.limits.max_connections, need, soft, max(0, (soft - _FD_RESERVE) // 2),
        )


# -- signals -------------------------------------------------------------------


def stop_on_signals(
    hurry: str = "exiting now", before_exit: Callable[[], None] | None = None
) -> asyncio.Event:
    """An event that SIGTERM or SIGINT sets; a second one logs `hurry` and exits at once.

    `before_exit` runs just before that exit (the supervisor kills its workers).
    """
    stop = asyncio.Event()

    def on_stop_signal() -> None:
        if stop.is_set():
            # A second signal: the operator does not want to wait for the drain.
            log.warning("second stop signal: %s", hurry)
            if before_exit is not None:
                before_exit()
            os._exit(EXIT_FAILURE)
        stop.set()

    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_stop_signal)
    return stop


def reload_on_sighup(reload: Callable[[], Coroutine[Any, Any, object]]) -> None:
    """Start `reload()` as a task on each SIGHUP, holding it until it ends."""
    loop = asyncio.get_running_loop()
    reloads: set[asyncio.Task[object]] = set()

    def on_reload_signal() -> None:
        task = loop.create_task(reload())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, on_reload_signal)


# -- the serve loop ------------------------------------------------------------


async def serve(
    config: Config,
    announce: Callable[[Gateway, AdminServer], None] | None = None,
    config_path: str | None = None,
    sockets: dict[str, socket.socket] | None = None,
    lifeline: int | None = None,
    admin_address: tuple[str, int] | None = None,
    log_level: str | None = None,
    admin_token: str | None = None,
    demo: ChatBackends | None = None,
) -> None:
    """Serve `config` until a stop signal (or, for a worker, the end of its `lifeline` pipe).

    `admin_address` and `admin_token` replace `admin.bind` and the token the config
    names, so a worker's config stays the one its supervisor wrote (and has the same
    version); `log_level` is the command line's, which logging was set up with.
    `demo` is the demo's backends, which its dashboard stops and starts.
    """
    raise_fd_limit(config)
    stop = stop_on_signals()
    loop = asyncio.get_running_loop()
    if lifeline is not None:

        def on_supervisor_gone() -> None:
            # The supervisor never writes: readable means it has gone, however it died.
            loop.remove_reader(lifeline)
            if not stop.is_set():
                log.warning("supervisor gone: draining")
                stop.set()

        loop.add_reader(lifeline, on_supervisor_gone)
    gateway = Gateway(config)
    gateway.config_path = config_path
    gateway.inherited = sockets or {}
    gateway.apply_log = log_reloader(config.log, log_level)
    reload_on_sighup(gateway.reload)
    if admin_address is None and config.admin.enabled:
        admin_token = read_admin_token(config.admin)
    admin = AdminServer(gateway, admin_token, demo)
    try:
        # Everything is bound before anything is announced: one error or full success.
        admin_at = admin_address or ((config.admin.host, config.admin.port) if config.admin.enabled else None)
        if admin_at is not None:
            await admin.start(*admin_at)
        await gateway.start()
        if admin_at is not None:
            admin.announce()
        if announce is not None:
            announce(gateway, admin)
        # Start-up objects live as long as the process: keep the collector from
        # walking them again and again, which shows up as latency spikes.
        gc.collect()
        gc.freeze()
        await stop.wait()
        log.info("stop signal: draining")
        await gateway.drain()
    finally:
        await gateway.close()
        await admin.close()
    log.info("stopped")
