"""Command line: `wsgate run | check | demo | explain | echo-backend`, exit codes 0 (ok), 1 (failure), 2 (bad config)."""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import os
import resource
import signal
import socket
import sys
from datetime import datetime, timezone
from collections.abc import Callable
from importlib import resources
from typing import Any

from . import __version__
from .admin import AdminServer
from .config import Backend, Config, Log, format_host_port, load_config, read_admin_token
from .errors import ConfigError, ListenError, WorkerError
from .gateway import Gateway
from .tls import check_files

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2

log = logging.getLogger("wsgate")


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop where it is installed, else stock asyncio's."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def _iso_time(record: logging.LogRecord) -> str:
    """ISO 8601 in UTC with its offset, to the millisecond: the same in both JSON logs."""
    return datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds")


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": _iso_time(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


class _AccessFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps({"time": _iso_time(record), **getattr(record, "access", {})})


def _setup_logging(level: str, fmt: str, access: bool = True) -> None:
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
    access_handler = logging.StreamHandler(sys.stdout)
    access_handler.setFormatter(_AccessFormatter())
    access_log.handlers[:] = [access_handler]


def _log_reloader(started: Log, level: str | None) -> Callable[[Log], None]:
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
        _setup_logging(level or settings.level, settings.format, settings.access)

    return reload


# Descriptors a gateway holds besides its connections: listeners, admin, logs, probes.
_FD_RESERVE = 256


def _raise_fd_limit(config: Config) -> None:
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


async def _serve(
    config: Config,
    announce: Callable[[Gateway, AdminServer], None] | None = None,
    config_path: str | None = None,
    sockets: dict[str, socket.socket] | None = None,
    lifeline: int | None = None,
    admin_address: tuple[str, int] | None = None,
    log_level: str | None = None,
    admin_token: str | None = None,
) -> None:
    """Serve `config` until a stop signal (or, for a worker, the end of its `lifeline` pipe).

    `admin_address` and `admin_token` replace `admin.bind` and the token the config
    names, so a worker's config stays the one its supervisor wrote (and has the same
    version); `log_level` is the command line's, which logging was set up with.
    """
    _raise_fd_limit(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_stop_signal() -> None:
        if stop.is_set():
            # A second signal: the operator does not want to wait for the drain.
            log.warning("second stop signal: exiting now")
            os._exit(EXIT_FAILURE)
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_stop_signal)
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
    gateway.apply_log = _log_reloader(config.log, log_level)
    reloads: set[asyncio.Task[str | None]] = set()

    def on_reload_signal() -> None:
        task = loop.create_task(gateway.reload())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, on_reload_signal)
    if admin_address is None and config.admin.enabled:
        admin_token = read_admin_token(config.admin)
    admin = AdminServer(gateway, admin_token)
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


def _run_loop(main: Any, hints: dict[str, str] | None = None) -> int:
    """Run `main` to its exit status; `hints` add a word to a `ListenError` by its key."""
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
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


def _load(path: str, *, files: bool = True) -> Config | None:
    """The config at `path`, with its TLS files checked too; None after printing why not."""
    try:
        config = load_config(path)
        if files:
            check_files(config)
            if config.admin.enabled:
                read_admin_token(config.admin)
        return config
    except ConfigError as exc:
        if exc.file is None:
            exc.file = path
        print(f"wsgate: invalid configuration: {exc}", file=sys.stderr)
        return None


def cmd_run(args: argparse.Namespace) -> int:
    config = _load(args.config)
    if config is None:
        return EXIT_CONFIG
    _setup_logging(args.log_level or config.log.level, config.log.format, config.log.access)
    if config.workers > 1:
        return _run_loop(_supervise(config, args.config, args.log_level))
    return _run_loop(_serve(config, config_path=args.config, log_level=args.log_level))


async def _supervise(config: Config, config_path: str, log_level: str | None) -> int:
    from .workers import Supervisor

    supervisor = Supervisor(config, config_path, config.workers, log_level)
    loop = asyncio.get_running_loop()
    stop: asyncio.Future[int] = loop.create_future()

    def on_stop_signal(signum: int) -> None:
        if stop.done():
            log.warning("second stop signal: stopping the workers now")
            supervisor.forward(signal.SIGKILL)
            os._exit(EXIT_FAILURE)
        stop.set_result(signum)

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_stop_signal, signum)
    reloads: set[asyncio.Task[Any]] = set()

    def on_reload_signal() -> None:
        task = loop.create_task(supervisor.reload())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, on_reload_signal)
    supervisor.apply_log = _log_reloader(config.log, log_level)
    await supervisor.start()
    await stop
    log.info("stop signal: draining %d workers", len(supervisor.workers))
    return await supervisor.stop(signal.SIGTERM)


def cmd_worker(args: argparse.Namespace) -> int:
    from .workers import worker_main

    return worker_main(
        args.config, args.index, args.report_fd, args.listen or [], args.lifeline_fd, args.log_level
    )


def cmd_check(args: argparse.Namespace) -> int:
    config = _load(args.config)
    if config is None:
        return EXIT_CONFIG
    routes = ", ".join(f"{r.name} ({len(r.backends)} backends)" for r in config.routes)
    print(f"{args.config}: OK; routes: {routes}")
    return EXIT_OK


async def _demo(config: Config) -> None:
    from .demo import EchoBackends

    echoes = EchoBackends(2)
    await echoes.start()
    route = config.routes[0]
    route = route.model_copy(update={"backends": [Backend(url=url) for url in echoes.urls]})
    config = config.model_copy(update={"routes": [route, *config.routes[1:]]})

    def announce(gateway: Gateway, admin: AdminServer) -> None:
        host, port = gateway.addresses[0]
        print(f"wsgate demo: echo backends at {', '.join(echoes.urls)}", flush=True)
        if config.admin.enabled:
            print("wsgate demo: metrics at http://%s:%d/metrics" % admin.address, flush=True)
        print(f"wsgate demo: connect to ws://{host}:{port}/ (Ctrl-C stops)", flush=True)

    try:
        await _serve(config, announce)
    finally:
        await echoes.close()


def cmd_demo(args: argparse.Namespace) -> int:
    with resources.as_file(resources.files("wsgate") / "demo.yaml") as path:
        config = _load(str(path))
    if config is None:
        return EXIT_CONFIG
    listener = config.listeners[0]
    bind = f"{args.host}:{args.port}" if ":" not in args.host else f"[{args.host}]:{args.port}"
    listener = listener.model_validate({**listener.model_dump(), "bind": bind})
    admin = config.admin.model_validate(
        {**config.admin.model_dump(), "bind": f"127.0.0.1:{args.admin_port}"}
    )
    config = config.model_copy(update={"listeners": [listener], "admin": admin})
    _setup_logging(args.log_level or config.log.level, config.log.format, config.log.access)
    hints = {
        "listeners[0].bind": "the demo's WebSocket port; choose another with --port",
        "admin.bind": "the demo's admin port; choose another with --admin-port",
    }
    return _run_loop(_demo(config), hints)


async def _echo_backend(host: str, port: int, name: str) -> None:
    from .demo import start_echo_backend

    try:
        runner = await start_echo_backend(host, port, name)
    except OSError as exc:
        raise ListenError.from_os_error("--port", format_host_port(host, port), exc) from exc
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    bound_host, bound_port = runner.addresses[0][:2]
    print(f"wsgate echo-backend {name}: listening on ws://{format_host_port(bound_host, bound_port)}", flush=True)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def cmd_echo_backend(args: argparse.Namespace) -> int:
    return _run_loop(_echo_backend(args.host, args.port, args.name or socket.gethostname()))


def cmd_explain(args: argparse.Namespace) -> int:
    from .balancer import Pool

    config = _load(args.config)
    if config is None:
        return EXIT_CONFIG
    route = next((r for r in config.routes if r.name == args.route), None)
    if route is None:
        names = ", ".join(r.name for r in config.routes)
        print(f"wsgate: no route named {args.route!r}; routes: {names}", file=sys.stderr)
        return EXIT_CONFIG
    keys = list(args.key or [])
    if args.keys:
        try:
            with open(args.keys, encoding="utf-8") as lines:
                keys += [line.rstrip("\r\n") for line in lines if line.strip()]
        except OSError as exc:
            print(f"wsgate: cannot read {args.keys}: {exc.strerror}", file=sys.stderr)
            return EXIT_CONFIG
    if not keys:
        print("wsgate: give at least one --key or a --keys file", file=sys.stderr)
        return EXIT_CONFIG
    pool = Pool(route, config.discovery)
    asyncio.run(pool.resolve_once())
    if not pool.members:
        print(f"wsgate: route {route.name!r} has no backends (DNS gave no address)", file=sys.stderr)
        return EXIT_FAILURE
    identities = pool.ring.identities
    if len(keys) == 1 and not args.keys:
        print(f"route {route.name}, key {keys[0]!r} (hash_key {route.hash_key}):")
        for rank, index in enumerate(pool.ring.order(keys[0].encode("utf-8")), start=1):
            role = "chosen" if rank == 1 else "fallback"
            print(f"{rank:4d}. {identities[index]}  {role}")
        return EXIT_OK
    for key in keys:
        print(f"{key}\t{identities[next(pool.ring.order(key.encode('utf-8')))]}")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wsgate", description="A frame-aware reverse proxy and load balancer for WebSockets."
    )
    parser.add_argument("--version", action="version", version=f"wsgate {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="serve with a config file")
    run.add_argument("-c", "--config", required=True, metavar="FILE")
    run.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    run.set_defaults(handler=cmd_run)

    check = commands.add_parser("check", help="validate a config file and exit")
    check.add_argument("-c", "--config", required=True, metavar="FILE")
    check.set_defaults(handler=cmd_check)

    explain = commands.add_parser(
        "explain", help="print which backends a route's keys go to (ignores live health)"
    )
    explain.add_argument("-c", "--config", required=True, metavar="FILE")
    explain.add_argument("--route", required=True, metavar="NAME")
    explain.add_argument("--key", action="append", metavar="VALUE", help="a key (repeatable)")
    explain.add_argument("--keys", metavar="FILE", help="a file with one key per line")
    explain.set_defaults(handler=cmd_explain)

    demo = commands.add_parser("demo", help="the gateway with two built-in echo backends")
    demo.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    demo.add_argument("--port", type=int, default=8080, help="port to listen on (8080; 0 picks one)")
    demo.add_argument(
        "--admin-port", type=int, default=9090, help="admin server port on 127.0.0.1 (9090; 0 picks one)"
    )
    demo.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    demo.set_defaults(handler=cmd_demo)

    echo = commands.add_parser(
        "echo-backend", help="a WebSocket echo server, as a backend for trying a gateway out"
    )
    echo.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    echo.add_argument("--port", type=int, default=8080, help="port to listen on (8080; 0 picks one)")
    echo.add_argument("--name", help="the X-Echo-Backend header it answers with (the host name)")
    echo.set_defaults(handler=cmd_echo_backend)
    return parser


def _worker_parser() -> argparse.ArgumentParser:
    """`wsgate _worker`: started by the supervisor when `workers` > 1, so kept out of --help."""
    worker = argparse.ArgumentParser(prog="wsgate _worker")
    worker.add_argument("-c", "--config", required=True)
    worker.add_argument("--index", type=int, required=True)
    worker.add_argument("--report-fd", type=int, required=True)
    worker.add_argument("--listen", action="append")
    worker.add_argument("--lifeline-fd", type=int, required=True)
    worker.add_argument("--log-level")
    worker.set_defaults(handler=cmd_worker)
    return worker


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_worker"]:
        args = _worker_parser().parse_args(argv[1:])
    else:
        args = build_parser().parse_args(argv)
    return int(args.handler(args))
