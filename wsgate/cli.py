"""Command line: `wsgate run | check | demo | explain | echo-backend`.

Exit codes: 0 (ok), 1 (failure), 2 (bad config).

The commands parse their arguments, load and check the config and hand over
to `runtime`, which runs the process.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import socket
import sys
from importlib import resources

from . import __version__
from .admin import AdminServer
from .config import Backend, Config, format_host_port, load_config, read_admin_token
from .errors import ConfigError, HandshakeError, ListenError
from .gateway import Gateway
from .runtime import EXIT_CONFIG, EXIT_FAILURE, EXIT_OK, run, serve, setup_logging, stop_on_signals
from .tls import check_files


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
    setup_logging(args.log_level or config.log.level, config.log.format, config.log.access)
    if config.workers > 1:
        from .workers import supervise

        return run(supervise(config, args.config, args.log_level))
    return run(serve(config, config_path=args.config, log_level=args.log_level))


def cmd_worker(args: argparse.Namespace) -> int:
    from .workers import worker_main

    return worker_main(
        args.config, args.index, args.report_fd, args.listen or [], args.lifeline_fd, args.log_level
    )


def cmd_check(args: argparse.Namespace) -> int:
    config = _load(args.config)
    if config is None:
        return EXIT_CONFIG
    if args.effective:
        from .config.effective import dump_effective

        print(f"# {args.config}: OK; the settings each route's new connections get")
        print(dump_effective(config), end="")
        return EXIT_OK
    routes = ", ".join(f"{r.name} ({len(r.backends)} backends)" for r in config.routes)
    print(f"{args.config}: OK; routes: {routes}")
    return EXIT_OK


async def _demo(config: Config) -> None:
    from .demo import CHAT_PAGE_DIRECTORY, ChatBackends

    chats = ChatBackends(3)
    await chats.start()
    route = config.routes[0]
    route = route.model_copy(update={
        "backends": [Backend(url=url) for url in chats.urls], "static": str(CHAT_PAGE_DIRECTORY),
    })
    config = config.model_copy(update={"routes": [route, *config.routes[1:]]})

    def announce(gateway: Gateway, admin: AdminServer) -> None:
        host, port = gateway.addresses[0]
        print(f"wsgate demo: chat backends at {', '.join(chats.urls)}", flush=True)
        if config.admin.enabled:
            print("wsgate demo: metrics at http://%s:%d/metrics" % admin.address, flush=True)
            print("wsgate demo: dashboard at http://%s:%d/dashboard" % admin.address, flush=True)
        print(f"wsgate demo: open http://{host}:{port}/ in a browser (Ctrl-C stops)", flush=True)

    try:
        await serve(config, announce, demo=chats)
    finally:
        await chats.close()


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
    setup_logging(args.log_level or config.log.level, config.log.format, config.log.access)
    hints = {
        "listeners[0].bind": "the demo's WebSocket port; choose another with --port",
        "admin.bind": "the demo's admin port; choose another with --admin-port",
    }
    return run(_demo(config), hints)


async def _echo_backend(host: str, port: int, name: str) -> None:
    from .demo import start_echo_backend

    try:
        runner = await start_echo_backend(host, port, name)
    except OSError as exc:
        raise ListenError.from_os_error("--port", format_host_port(host, port), exc) from exc
    stop = stop_on_signals()
    bound_host, bound_port = runner.addresses[0][:2]
    address = format_host_port(bound_host, bound_port)
    print(f"wsgate echo-backend {name}: listening on ws://{address}", flush=True)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def cmd_echo_backend(args: argparse.Namespace) -> int:
    return run(_echo_backend(args.host, args.port, args.name or socket.gethostname()))


def _explain_request(args: argparse.Namespace) -> int:
    from .explain import explain_request, parse_request, render_explanation

    if args.route or args.key or args.keys:
        print("wsgate: --request takes no --route, --key or --keys (it finds the route)", file=sys.stderr)
        return EXIT_CONFIG
    try:
        ipaddress.ip_address(args.client_ip)
        head = parse_request(args.request, args.header or [])
    except ValueError as exc:
        print(f"wsgate: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    config = _load(args.config, files=False)
    if config is None:
        return EXIT_CONFIG
    try:
        explanation = explain_request(config, head, args.client_ip)
    except HandshakeError as exc:
        print(f"wsgate: the gateway refuses this request before routing: {exc.status} {exc.reason}",
              file=sys.stderr)
        return EXIT_CONFIG
    print(render_explanation(explanation), end="")
    return EXIT_OK if explanation.route is not None else EXIT_FAILURE


def cmd_explain(args: argparse.Namespace) -> int:
    from .balancer import Pool

    if args.request is not None:
        return _explain_request(args)
    if args.route is None:
        print("wsgate: give --request (which route a request takes) or --route with --key", file=sys.stderr)
        return EXIT_CONFIG
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
    check.add_argument(
        "--effective", action="store_true",
        help="print each route's effective settings, match and shaping as YAML",
    )
    check.set_defaults(handler=cmd_check)

    explain = commands.add_parser(
        "explain", help="print which route a request takes, or which backends a route's keys go to"
    )
    explain.add_argument("-c", "--config", required=True, metavar="FILE")
    explain.add_argument("--request", metavar="'GET /PATH?QUERY'", help="the request line to explain")
    explain.add_argument(
        "-H", "--header", action="append", metavar="'NAME: VALUE'", help="a request header (repeatable)"
    )
    explain.add_argument(
        "--client-ip", default="127.0.0.1", metavar="IP", help="the peer the request comes from (127.0.0.1)"
    )
    explain.add_argument("--route", metavar="NAME")
    explain.add_argument("--key", action="append", metavar="VALUE", help="a key (repeatable)")
    explain.add_argument("--keys", metavar="FILE", help="a file with one key per line")
    explain.set_defaults(handler=cmd_explain)

    demo = commands.add_parser(
        "demo", help="the gateway with a chat page, three built-in chat backends and a dashboard"
    )
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
