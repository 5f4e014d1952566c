"""Tests of wsgate.config: units, addresses, schema rules with key paths, file loading."""

from __future__ import annotations

import copy
import math
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from wsgate.config import (
    Admin,
    Config,
    FlowControl,
    Heartbeat,
    Limits,
    Log,
    Match,
    NewConnections,
    Shutdown,
    Timeouts,
    dump_config_data,
    keep_restart_settings,
    load_config,
    load_config_data,
    parse_config,
    parse_duration,
    parse_host_port,
    parse_network,
    parse_rate,
    parse_size,
    read_admin_token,
    substitute_environment,
)
from wsgate.errors import ConfigError

EXAMPLE = Path(__file__).resolve().parent.parent / "config" / "wsgate.yaml"

MINIMAL: dict[str, Any] = {
    "listeners": [{"bind": "127.0.0.1:8080"}],
    "routes": [{"name": "echo", "backends": [{"url": "ws://127.0.0.1:9001"}]}],
}


def with_(path: str, value: Any, base: dict[str, Any] | None = None) -> dict[str, Any]:
    """A copy of MINIMAL with `value` set at a dotted path ("routes.0.match.host")."""
    data = copy.deepcopy(MINIMAL if base is None else base)
    *parents, last = path.split(".")
    node: Any = data
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return data


def config_error(data: Any) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    return info.value


# --------------------------------------------------------------------------
# Units and addresses
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (0, 0.0),
        ("0", 0.0),
        (30, 30.0),
        (1.5, 1.5),
        ("250ms", 0.25),
        ("30s", 30.0),
        ("1.5s", 1.5),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("0.5h", 1800.0),
        ("30", 30.0),
        (" 10s ", 10.0),
        ("0ms", 0.0),
    ],
)
def test_parse_duration_valid(value: object, seconds: float) -> None:
    assert parse_duration(value) == seconds


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("5 seconds", "expected a duration such as 250ms, 30s, 5m or 1h, got '5 seconds'"),
        ("", "expected a duration such as 250ms, 30s, 5m or 1h, got ''"),
        ("s", "expected a duration"),
        ("10d", "expected a duration"),
        ("1m30s", "expected a duration"),
        ("5M", "expected a duration"),
        ("abc", "expected a duration"),
        (True, "expected a duration such as 250ms, 30s, 5m or 1h, got true"),
        (None, "expected a duration"),
        ([1], "expected a duration"),
        (math.inf, "expected a duration"),
        (math.nan, "expected a duration"),
        (-1, "a duration cannot be negative, got -1"),
        ("-5s", "a duration cannot be negative, got '-5s'"),
    ],
)
def test_parse_duration_invalid(value: object, message: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_duration(value)
    assert str(info.value).startswith(message)


@pytest.mark.parametrize(
    ("value", "size"),
    [
        (0, 0),
        (512, 512),
        ("512", 512),
        ("512B", 512),
        ("64KiB", 64 * 1024),
        ("16MiB", 16 * 1024**2),
        ("1GiB", 1024**3),
        ("64KB", 64_000),
        ("64kB", 64_000),
        ("16MB", 16_000_000),
        ("1GB", 1_000_000_000),
        ("1.5KiB", 1536),
        ("16 MiB", 16 * 1024**2),
        (2048.0, 2048),
    ],
)
def test_parse_size_valid(value: object, size: int) -> None:
    assert parse_size(value) == size


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("16 megs", "expected a size such as 64KiB or 16MiB, got '16 megs'"),
        ("", "expected a size such as 64KiB or 16MiB, got ''"),
        ("MiB", "expected a size"),
        ("16M", "expected a size"),
        ("1.5", "a size must be a whole number of bytes, got '1.5'"),
        ("0.0001KiB", "a size must be a whole number of bytes"),
        (1.5, "expected a size such as 64KiB or 16MiB, got 1.5"),
        (True, "expected a size such as 64KiB or 16MiB, got true"),
        (None, "expected a size"),
        (-1, "a size cannot be negative, got -1"),
        ("-1KiB", "a size cannot be negative, got '-1KiB'"),
    ],
)
def test_parse_size_invalid(value: object, message: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_size(value)
    assert str(info.value).startswith(message)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("127.0.0.1:8080", ("127.0.0.1", 8080)),
        ("0.0.0.0:443", ("0.0.0.0", 443)),
        ("[::1]:8080", ("::1", 8080)),
        ("[::]:80", ("::", 80)),
        (":8080", ("0.0.0.0", 8080)),
        ("localhost:0", ("localhost", 0)),
        ("LocalHost:65535", ("localhost", 65535)),
        ("my_service.internal:9000", ("my_service.internal", 9000)),
    ],
)
def test_parse_host_port_valid(value: str, expected: tuple[str, int]) -> None:
    assert parse_host_port(value) == expected


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("127.0.0.1", "expected host:port such as 127.0.0.1:8080; the port is missing"),
        ("127.0.0.1:", "the port must be a number from 0 to 65535"),
        ("127.0.0.1:65536", "the port must be a number from 0 to 65535, got '127.0.0.1:65536'"),
        ("127.0.0.1:http", "the port must be a number from 0 to 65535"),
        ("127.0.0.1:-1", "the port must be a number from 0 to 65535"),
        ("::1:8080", "put an IPv6 address in brackets, as in [::1]:8080, got '::1:8080'"),
        ("::1", "put an IPv6 address in brackets"),
        ("[::1]", "expected host:port such as 127.0.0.1:8080; the port is missing in '[::1]'"),
        ("[nope]:80", "expected host:port such as 127.0.0.1:8080 or [::1]:8080"),
        ("[::1:80", "expected host:port"),
        ("bad host:80", "expected host:port such as 127.0.0.1:8080, got 'bad host:80'"),
        ("http://x:80", "expected host:port such as 127.0.0.1:8080, got 'http://x:80'"),
        ("", "expected host:port"),
        (8080, "expected host:port such as 127.0.0.1:8080, got 8080"),
    ],
)
def test_parse_host_port_invalid(value: str, message: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_host_port(value)
    assert str(info.value).startswith(message)


@pytest.mark.parametrize(
    ("value", "per_second"),
    [
        (20, 20.0),
        (0.5, 0.5),
        ("20/s", 20.0),
        ("600/m", 10.0),
        ("600 / m", 10.0),
        ("36/h", 0.01),
        ("2.5", 2.5),
    ],
)
def test_parse_rate_valid(value: object, per_second: float) -> None:
    assert parse_rate(value) == pytest.approx(per_second)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("20/d", "expected a rate such as 20/s or 600/m, or a number per second, got '20/d'"),
        ("fast", "expected a rate such as 20/s"),
        (True, "expected a rate such as 20/s"),
        (None, "expected a rate such as 20/s"),
        ("-1/s", "expected a rate such as 20/s"),
        (0, "a rate must be greater than zero, got 0"),
        ("0/m", "a rate must be greater than zero, got '0/m'"),
        (math.inf, "expected a rate such as 20/s"),
    ],
)
def test_parse_rate_invalid(value: object, message: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_rate(value)
    assert str(info.value).startswith(message)


@pytest.mark.parametrize(
    ("value", "network"),
    [
        ("10.0.0.0/8", "10.0.0.0/8"),
        (" 192.0.2.7 ", "192.0.2.7/32"),
        ("2001:DB8::/32", "2001:db8::/32"),
        ("::1", "::1/128"),
        ("0.0.0.0/0", "0.0.0.0/0"),
    ],
)
def test_parse_network_valid(value: str, network: str) -> None:
    assert parse_network(value) == network


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("10.0.0.1/8", "'10.0.0.1/8' has bits set beyond its prefix; did you mean '10.0.0.0/8'?"),
        ("10.0.0.0/33", "expected an address or network such as 10.0.0.0/8 or 2001:db8::/32, got '10."),
        ("proxy.internal", "expected an address or network such as 10.0.0.0/8"),
        (8, "expected an address or network such as 10.0.0.0/8 or 2001:db8::/32, got 8"),
    ],
)
def test_parse_network_invalid(value: object, message: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_network(value)
    assert str(info.value).startswith(message)


# --------------------------------------------------------------------------
# Defaults and accepted values
# --------------------------------------------------------------------------


def test_defaults_applied() -> None:
    config = parse_config(MINIMAL)
    assert config.admin == Admin(enabled=True, bind="127.0.0.1:9090")
    assert (config.admin.host, config.admin.port) == ("127.0.0.1", 9090)
    assert config.timeouts == Timeouts(handshake=10, connect=5, idle=300, close=5)
    assert config.heartbeat == Heartbeat(interval=30, timeout=10)
    assert config.limits == Limits(
        max_connections=100_000,
        max_connections_per_ip=1000,
        new_connections_per_ip=None,
        max_message_size=16 * 1024**2,
        max_header_bytes=16 * 1024,
        max_target_bytes=8 * 1024,
        max_headers=100,
    )
    assert config.trusted_proxies == []
    assert config.flow_control == FlowControl(high_water=256 * 1024, low_water=64 * 1024)
    assert config.shutdown == Shutdown(drain_period=30, grace_period=45)
    assert config.log == Log(level="info", format="text")

    (listener,) = config.listeners
    assert listener.name == "127.0.0.1:8080"  # derived from bind
    assert (listener.host, listener.port, listener.tls) == ("127.0.0.1", 8080, None)

    (route,) = config.routes
    assert route.match == Match(host=None, path_prefix="/")
    assert route.compression == "passthrough"
    assert route.upstream_host is None
    assert route.allowed_origins is None
    (backend,) = route.backends
    assert (backend.host, backend.port, backend.weight) == ("127.0.0.1", 9001, 1)


def test_models_are_frozen() -> None:
    config = parse_config(MINIMAL)
    with pytest.raises(Exception):
        config.timeouts.idle = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    "section", ["admin", "timeouts", "heartbeat", "limits", "flow_control", "shutdown", "log"]
)
def test_empty_section_means_defaults(section: str) -> None:
    # `timeouts:` with everything under it commented out is null in YAML.
    config = parse_config(with_(section, None))
    assert getattr(config, section) == getattr(parse_config(MINIMAL), section)


def test_client_address_settings() -> None:
    config = parse_config(
        {
            **MINIMAL,
            "trusted_proxies": ["10.0.0.0/8", "2001:db8::1"],
            "limits": {
                "max_connections_per_ip": None,
                "new_connections_per_ip": {"rate": "600/m", "burst": 40},
            },
        }
    )
    assert config.trusted_proxies == ["10.0.0.0/8", "2001:db8::1/128"]
    assert config.limits.max_connections_per_ip is None
    rate_limit = NewConnections(rate=10.0, burst=40, max_addresses=100_000)
    assert config.limits.new_connections_per_ip == rate_limit
    # What the config holds reads back as the same config (the supervisor hands it on).
    assert parse_config(config.model_dump()) == config


def test_values_in_units_are_converted() -> None:
    config = parse_config(
        {
            **MINIMAL,
            "timeouts": {"handshake": "250ms", "connect": 2, "idle": 0, "close": "1.5s"},
            "heartbeat": {"interval": "1m", "timeout": "5s"},
            "limits": {
                "max_message_size": "1MiB",
                "max_header_bytes": "8KiB",
                "max_target_bytes": "2KiB",
                "max_headers": 20,
            },
            "flow_control": {"high_water": "1MB", "low_water": 1000},
            "shutdown": {"drain_period": 0, "grace_period": "0s"},
            "log": {"level": "DEBUG", "format": "json"},
        }
    )
    assert config.timeouts == Timeouts(handshake=0.25, connect=2, idle=0, close=1.5)
    assert config.heartbeat == Heartbeat(interval=60, timeout=5)
    assert config.limits.max_message_size == 1024**2
    assert config.limits.max_header_bytes == 8 * 1024
    assert (config.limits.max_target_bytes, config.limits.max_headers) == (2 * 1024, 20)
    assert config.flow_control == FlowControl(high_water=1_000_000, low_water=1000)
    assert config.shutdown == Shutdown(drain_period=0, grace_period=0)
    assert config.log == Log(level="debug", format="json")


@pytest.mark.parametrize(
    ("url", "host", "port"),
    [
        ("ws://127.0.0.1:9001", "127.0.0.1", 9001),
        ("ws://backend.internal", "backend.internal", 80),
        ("ws://Backend.Internal/", "backend.internal", 80),
        ("ws://[::1]:8000", "::1", 8000),
        ("WS://h:1", "h", 1),
    ],
)
def test_backend_url_valid(url: str, host: str, port: int) -> None:
    backend = parse_config(with_("routes.0.backends.0.url", url)).routes[0].backends[0]
    assert (backend.url, backend.host, backend.port) == (url, host, port)


@pytest.mark.parametrize(
    ("host", "stored"),
    [("chat.example.com", "chat.example.com"), ("Chat.Example.COM", "chat.example.com"),
     ("*.example.com", "*.example.com"), ("10.0.0.1", "10.0.0.1"), (None, None)],
)
def test_match_host_valid(host: str | None, stored: str | None) -> None:
    assert parse_config(with_("routes.0.match.host", host)).routes[0].match.host == stored


def test_route_options() -> None:
    route = parse_config(
        with_(
            "routes.0",
            {
                "name": "chat",
                "match": {"host": "chat.example.com", "path_prefix": "/ws"},
                "backends": [{"url": "ws://a:1", "weight": 3}, {"url": "ws://b:1", "weight": 1000}],
                "compression": "strip",
                "upstream_host": "chat.internal:8000",
                "allowed_origins": ["https://Chat.Example.com", "http://localhost:3000", "null"],
            },
        )
    ).routes[0]
    assert route.match == Match(host="chat.example.com", path_prefix="/ws")
    assert [b.weight for b in route.backends] == [3, 1000]
    assert route.compression == "strip"
    assert route.upstream_host == "chat.internal:8000"
    assert route.allowed_origins == ["https://chat.example.com", "http://localhost:3000", "null"]


def test_listener_with_tls_and_ports_zero() -> None:
    config = parse_config(
        {
            **MINIMAL,
            "listeners": [
                {"name": "a", "bind": "127.0.0.1:0", "tls": {"cert": "c.pem", "key": "k.pem"}},
                {"name": "b", "bind": "127.0.0.1:0"},
            ],
            "admin": {"bind": "127.0.0.1:0"},
        }
    )
    assert config.listeners[0].tls is not None
    assert (config.listeners[0].tls.cert, config.listeners[0].tls.key) == ("c.pem", "k.pem")
    assert config.listeners[1].port == 0


@pytest.mark.parametrize(
    ("section", "burst"), [({"rate": 100}, 100), ({"rate": 0.5}, 1), ({"rate": 10, "burst": 3}, 3)]
)
def test_frame_rate_burst_defaults_to_one_seconds_worth(section: dict[str, Any], burst: int) -> None:
    frame_rate = parse_config(with_("limits.max_frames_per_second", section)).limits.max_frames_per_second
    assert frame_rate is not None and frame_rate.burst_size == burst


@pytest.mark.parametrize(
    ("environment", "token", "error"),
    [
        ({"WSGATE_T": " abc\n"}, "abc", None),
        ({}, None, "admin.token_env: environment variable WSGATE_T is not set"),
        ({"WSGATE_T": "  "}, None, "admin.token_env: WSGATE_T holds an empty token"),
        ({"WSGATE_T": "a\u00e9"}, None, "admin.token_env: the token in WSGATE_T must be visible ASCII"),
    ],
)
def test_read_admin_token_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, environment: dict[str, str], token: str | None, error: str | None
) -> None:
    monkeypatch.delenv("WSGATE_T", raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    admin = parse_config(with_("admin.token_env", "WSGATE_T")).admin
    if error is None:
        assert read_admin_token(admin) == token
    else:
        with pytest.raises(ConfigError, match=re.escape(error)):
            read_admin_token(admin)


def test_no_token_source_means_no_token() -> None:
    assert read_admin_token(parse_config(MINIMAL).admin) is None


def _proxy_from(networks: Any) -> dict[str, Any]:
    return {"bind": ":1", "proxy_protocol": "v2", "proxy_protocol_from": networks}


def test_listener_with_proxy_protocol() -> None:
    listener = parse_config(
        with_("listeners.0", {
            "bind": ":8080",
            "proxy_protocol": "any",
            "proxy_protocol_from": ["10.0.0.0/8", "192.0.2.7", "2001:DB8::/32"],
        })
    ).listeners[0]
    assert listener.proxy_protocol == "any"
    assert [str(network) for network in listener.proxy_protocol_from or []] == [
        "10.0.0.0/8", "192.0.2.7/32", "2001:db8::/32"
    ]
    plain = parse_config(MINIMAL).listeners[0]
    assert (plain.proxy_protocol, plain.proxy_protocol_from) == (None, None)


def test_admin_may_share_a_port_when_disabled() -> None:
    data = with_("admin", {"enabled": False, "bind": "127.0.0.1:8080"})
    assert parse_config(data).admin.enabled is False


# --------------------------------------------------------------------------
# Validation rules: each with its key path
# --------------------------------------------------------------------------

DUP_ROUTES = [
    {"name": "a", "backends": [{"url": "ws://x:1"}], "match": {"path_prefix": "/a"}},
    {"name": "a", "backends": [{"url": "ws://x:1"}], "match": {"path_prefix": "/b"}},
]


@pytest.mark.parametrize(
    ("data", "path", "message"),
    [
        # top level
        ({"routes": MINIMAL["routes"]}, "listeners", "missing required key"),
        ({"listeners": MINIMAL["listeners"]}, "routes", "missing required key"),
        (with_("listeners", []), "listeners", "must have at least one entry"),
        (with_("routes", []), "routes", "must have at least one entry"),
        (with_("routes", None), "routes", "expected a list, got an empty value"),
        (with_("routes", {"name": "a"}), "routes", "expected a list, got a mapping"),
        (with_("timeouts", [1]), "timeouts", "expected a mapping of keys to values, got a list"),
        # listeners
        (with_("listeners.0.bind", "127.0.0.1"), "listeners[0].bind",
         "expected host:port such as 127.0.0.1:8080; the port is missing in '127.0.0.1'"),
        (with_("listeners.0.bind", 8080), "listeners[0].bind",
         "expected host:port such as 127.0.0.1:8080, got 8080"),
        (with_("listeners.0.bind", "127.0.0.1:99999"), "listeners[0].bind",
         "the port must be a number from 0 to 65535, got '127.0.0.1:99999'"),
        (with_("listeners.0", {"name": "x"}), "listeners[0].bind", "missing required key"),
        (with_("listeners.0.name", ""), "listeners[0].name", "must not be empty"),
        (with_("listeners.0.name", 7), "listeners[0].name", "expected a string, got 7"),
        (with_("listeners.0.tls", {"cert": "c.pem"}), "listeners[0].tls.key", "missing required key"),
        (with_("listeners", [{"bind": "127.0.0.1:1"}, {"bind": "127.0.0.1:1"}]), "listeners[1].bind",
         "127.0.0.1:1 is already used by listeners[0]"),
        (with_("listeners", [{"name": "x", "bind": ":1"}, {"name": "x", "bind": ":2"}]),
         "listeners[1].name", "duplicate listener name 'x' (also listeners[0])"),
        (with_("listeners.0.proxy_protocol", "v3"), "listeners[0].proxy_protocol",
         "expected 'v1', 'v2' or 'any', got 'v3'"),
        (with_("listeners.0.proxy_protocol", True), "listeners[0].proxy_protocol",
         "expected 'v1', 'v2' or 'any', got true"),
        (with_("listeners.0.proxy_protocol_from", ["10.0.0.0/8"]), "listeners[0].proxy_protocol_from",
         "applies only with proxy_protocol (v1, v2 or any), which this listener does not set"),
        (with_("listeners.0", _proxy_from(["10.0.0.0/8", "lb"])), "listeners[0].proxy_protocol_from[1]",
         "expected an address or network such as 10.0.0.0/8 or 2001:db8::/32, got 'lb'"),
        (with_("listeners.0", _proxy_from(["10.1.2.3/8"])), "listeners[0].proxy_protocol_from[0]",
         "'10.1.2.3/8' has bits set beyond its prefix; did you mean '10.0.0.0/8'?"),
        (with_("listeners.0", _proxy_from([])), "listeners[0].proxy_protocol_from",
         "must have at least one entry"),
        (with_("listeners.0", _proxy_from("10.0.0.0/8")), "listeners[0].proxy_protocol_from",
         "expected a list, got '10.0.0.0/8'"),
        # admin
        (with_("admin.bind", "localhost"), "admin.bind", "expected host:port such as 127.0.0.1:8080"),
        (with_("admin.bind", "127.0.0.1:8080"), "admin.bind",
         "127.0.0.1:8080 is already used by listener '127.0.0.1:8080'"),
        (with_("admin.enabled", "maybe"), "admin.enabled", "expected true or false, got 'maybe'"),
        (with_("admin", {"token_file": "/etc/token", "token_env": "TOKEN"}), "admin.token_env",
         "give token_file or token_env, not both"),
        (with_("admin.token_file", ""), "admin.token_file", "must not be empty"),
        # routes
        (with_("routes.0.name", ""), "routes[0].name", "must not be empty"),
        (with_("routes.0", {"backends": [{"url": "ws://x"}]}), "routes[0].name", "missing required key"),
        (with_("routes", DUP_ROUTES), "routes[1].name", "duplicate route name 'a' (also routes[0])"),
        (with_("routes", [{**MINIMAL["routes"][0], "name": "a"}, {**MINIMAL["routes"][0], "name": "b"}]),
         "routes[1].match", "same host and path_prefix as route 'a', so this route would never be used"),
        (with_("routes.0.backends", []), "routes[0].backends", "must have at least one entry"),
        (with_("routes.0.compression", "gzip"), "routes[0].compression",
         "expected 'passthrough' or 'strip', got 'gzip'"),
        (with_("routes.0.upstream_host", "http://x/"), "routes[0].upstream_host",
         "expected a Host header value such as chat.internal"),
        (with_("routes.0.upstream_host", "chat\x00internal"), "routes[0].upstream_host",
         "expected a Host header value such as chat.internal"),
        (with_("routes.0.upstream_host", "chat\x7finternal"), "routes[0].upstream_host",
         "expected a Host header value such as chat.internal"),
        (with_("routes.0.upstream_host", "ch\u00e4t.internal"), "routes[0].upstream_host",
         "expected a Host header value such as chat.internal"),
        (with_("routes.0.allowed_origins", "https://a.com"), "routes[0].allowed_origins",
         "expected a list, got 'https://a.com'"),
        (with_("routes.0.allowed_origins", ["https://a.com", "https://b.com/"]),
         "routes[0].allowed_origins[1]",
         "an origin has no path or trailing slash (browsers send 'https://b.com'), got 'https://b.com/'"),
        (with_("routes.0.allowed_origins", ["*"]), "routes[0].allowed_origins[0]",
         "wildcards are not supported in origins"),
        (with_("routes.0.allowed_origins", ["chat.example.com"]), "routes[0].allowed_origins[0]",
         "expected an origin such as https://chat.example.com"),
        # match
        (with_("routes.0.match.host", "*"), "routes[0].match.host", "'*' alone is not allowed"),
        (with_("routes.0.match.host", "chat.example.com:443"), "routes[0].match.host",
         "expected a host name such as chat.example.com, without a port, got 'chat.example.com:443'"),
        (with_("routes.0.match.host", "https://chat.example.com"), "routes[0].match.host",
         "expected a host name such as chat.example.com, without a scheme"),
        (with_("routes.0.match.host", "chat.example.com/ws"), "routes[0].match.host",
         "expected a host name such as chat.example.com, without a path"),
        (with_("routes.0.match.host", "a.*.com"), "routes[0].match.host",
         "expected a host name such as chat.example.com or *.example.com, got 'a.*.com'"),
        (with_("routes.0.match.path_prefix", "ws"), "routes[0].match.path_prefix",
         "must start with '/', got 'ws'"),
        (with_("routes.0.match", {"path_prefix": "/a", "path_prefix_raw": "/a"}), "routes[0].match",
         "give path_prefix or path_prefix_raw, not both"),
        (with_("routes.0.match.path_prefix_raw", "a"), "routes[0].match.path_prefix_raw",
         "must start with '/', got 'a'"),
        (with_("routes", [{**MINIMAL["routes"][0], "name": "a", "match": {"path_prefix_raw": "/a"}},
                          {**MINIMAL["routes"][0], "name": "b", "match": {"path_prefix_raw": "/a"}}]),
         "routes[1].match", "same host and path_prefix_raw as route 'a', so this route would never be used"),
        (with_("routes.0.match.path_prefix", "/ws?x=1"), "routes[0].match.path_prefix",
         "expected a path such as /ws"),
        (with_("routes.0.match", "/ws"), "routes[0].match",
         "expected a mapping of keys to values, got '/ws'"),
        # backends
        (with_("routes.0.backends.0.url", "http://x"), "routes[0].backends[0].url",
         "expected a ws:// or wss:// URL such as ws://10.0.0.11:8000, got 'http://x'"),
        (with_("routes.0.backends.0", {"url": "ws://x", "tls": {}}), "routes[0].backends[0].tls",
         "tls applies to wss:// backends; use a wss:// URL"),
        (with_("routes.0.backends.0", {"url": "wss://x", "tls": {"cert": "c.pem"}}),
         "routes[0].backends[0].tls", "a client certificate needs both cert and key"),
        (with_("routes.0.backends.0", {"url": "wss://x", "tls": {"server_name": "b\u00e4ckend.internal"}}),
         "routes[0].backends[0].tls.server_name", "expected a Host header value such as chat.internal"),
        (with_("listeners.0.tls", {"cert": "c", "key": "k", "min_version": 1.1}),
         "listeners[0].tls.min_version", "expected '1.2' or '1.3', got '1.1'"),
        (with_("listeners.0.tls", {"cert": "c", "key": "k", "sni": [{"names": [], "cert": "c", "key": "k"}]}),
         "listeners[0].tls.sni[0].names", "must have at least one entry"),
        (with_("listeners.0.tls", {"cert": "c", "key": "k", "client_auth": "maybe"}),
         "listeners[0].tls.client_auth", "expected 'required' or 'optional', got 'maybe'"),
        (with_("routes.0.backends.0.url", "127.0.0.1:9001"), "routes[0].backends[0].url",
         "expected a ws:// or wss:// URL"),
        (with_("routes.0.backends.0.url", "ws://"), "routes[0].backends[0].url", "expected a ws:// or wss:// URL"),
        (with_("routes.0.backends.0.url", "ws:/x"), "routes[0].backends[0].url", "expected a ws:// or wss:// URL"),
        (with_("routes.0.backends.0.url", "ws://x:99999"), "routes[0].backends[0].url",
         "expected a ws:// or wss:// URL"),
        (with_("routes.0.backends.0.url", "ws://x:0"), "routes[0].backends[0].url",
         "the port must be a number from 1 to 65535"),
        (with_("routes.0.backends.0.url", "ws://x/chat"), "routes[0].backends[0].url",
         "a backend URL has no path"),
        (with_("routes.0.backends.0.url", "ws://x/?a=1"), "routes[0].backends[0].url",
         "a backend URL must not have a query or fragment"),
        (with_("routes.0.backends.0.url", "ws://x#f"), "routes[0].backends[0].url",
         "a backend URL must not have a query or fragment"),
        (with_("routes.0.backends.0.url", "ws://u:p@x"), "routes[0].backends[0].url",
         "a backend URL must not contain a user name or password"),
        (with_("routes.0.backends.0.url", "ws://[nope]:1"), "routes[0].backends[0].url",
         "expected a ws:// or wss:// URL"),
        (with_("routes.0.backends.0.url", 9001), "routes[0].backends[0].url",
         "expected a ws:// or wss:// URL such as ws://10.0.0.11:8000, got 9001"),
        (with_("routes.0.backends", [{"url": "ws://a"}, {"url": "ws://b"}, {"url": "ws://A:80/"}]),
         "routes[0].backends[2].url", "duplicate backend: ws://A:80/ is already backends[0]"),
        (with_("routes.0.backends.0", {"weight": 2}), "routes[0].backends[0]",
         "give exactly one of url (ws://host:port) or dns (name:port)"),
        (with_("routes.0.backends.0", {"url": "ws://a", "dns": "a:1"}), "routes[0].backends[0]",
         "give exactly one of url"),
        (with_("routes.0.backends.0", {"dns": "chat"}), "routes[0].backends[0].dns",
         "expected name:port such as chat-backend.default.svc.cluster.local:8000, got 'chat'"),
        (with_("routes.0.backends.0", {"dns": "chat:0"}), "routes[0].backends[0].dns",
         "expected name:port"),
        (with_("routes.0.backends", [{"dns": "a:1"}, {"dns": "A:1"}]), "routes[0].backends[1].dns",
         "duplicate backend: dns:a:1 is already backends[0]"),
        # balancing
        (with_("routes.0.hash_key", "cookie"), "routes[0].hash_key",
         "expected ip, path, header:NAME, cookie:NAME or query:NAME, got 'cookie'"),
        (with_("routes.0.hash_key", "host"), "routes[0].hash_key", "expected ip, path"),
        (with_("routes.0.hash_fallback", "first"), "routes[0].hash_fallback", "expected 'ip' or 'random', got 'first'"),
        (with_("routes.0.balance_factor", 1.0), "routes[0].balance_factor", "Input should be greater than 1"),
        (with_("routes.0.retries", 11), "routes[0].retries", "must be between 0 and 10, got 11"),
        (with_("routes.0.health_check", {"type": "icmp"}), "routes[0].health_check.type",
         "expected 'tcp', 'http' or 'websocket', got 'icmp'"),
        (with_("routes.0.health_check", {"interval": "0s"}), "routes[0].health_check.interval",
         "must be greater than zero"),
        (with_("routes.0.passive_ejection", {"failures": -1}), "routes[0].passive_ejection.failures",
         "must be between 0 and 1000, got -1"),
        (with_("routes.0.passive_ejection", {"backoff": "10s", "max_backoff": "5s"}),
         "routes[0].passive_ejection.max_backoff", "must be at least backoff (10s), got 5s"),
        (with_("routes.0.rebalance", {"max_fraction": 2}), "routes[0].rebalance.max_fraction",
         "Input should be less than or equal to 1"),
        (with_("discovery.nameservers", ["127.0.0.1"]), "discovery.nameservers[0]", "expected host:port"),
        (with_("routes.0.backends.0.weight", 0), "routes[0].backends[0].weight",
         "must be between 1 and 1000, got 0"),
        (with_("routes.0.backends.0.weight", 1001), "routes[0].backends[0].weight",
         "must be between 1 and 1000, got 1001"),
        (with_("routes.0.backends.0.weight", True), "routes[0].backends[0].weight",
         "expected a whole number, got true"),
        (with_("routes.0.backends.0.weight", 1.5), "routes[0].backends[0].weight",
         "expected a whole number, got 1.5"),
        # timeouts and heartbeat
        (with_("timeouts.connect", "5 seconds"), "timeouts.connect",
         "expected a duration such as 250ms, 30s, 5m or 1h, got '5 seconds'"),
        (with_("timeouts.handshake", 0), "timeouts.handshake", "must be greater than zero"),
        (with_("timeouts.connect", "0s"), "timeouts.connect", "must be greater than zero"),
        (with_("timeouts.close", 0), "timeouts.close", "must be greater than zero"),
        (with_("timeouts.idle", "-1s"), "timeouts.idle", "a duration cannot be negative, got '-1s'"),
        (with_("heartbeat.timeout", 0), "heartbeat.timeout", "must be greater than zero"),
        (with_("heartbeat.interval", "often"), "heartbeat.interval", "expected a duration"),
        # limits
        (with_("limits.max_connections", 0), "limits.max_connections", "must be at least 1, got 0"),
        (with_("limits.max_connections_per_ip", 0), "limits.max_connections_per_ip",
         "must be at least 1, got 0"),
        (with_("limits.new_connections_per_ip", {"rate": "fast", "burst": 1}),
         "limits.new_connections_per_ip.rate", "expected a rate such as 20/s or 600/m"),
        (with_("limits.new_connections_per_ip", {"rate": "20/s"}),
         "limits.new_connections_per_ip.burst", "missing required key"),
        (with_("limits.new_connections_per_ip", {"rate": 1, "burst": 0}),
         "limits.new_connections_per_ip.burst", "must be at least 1, got 0"),
        (with_("limits.new_connections_per_ip", {"rate": 1, "burst": 1, "max_addresses": 0}),
         "limits.new_connections_per_ip.max_addresses", "must be at least 1, got 0"),
        (with_("limits.new_connections_per_ip", "20/s"), "limits.new_connections_per_ip",
         "expected a mapping of keys to values, got '20/s'"),
        # trusted proxies
        (with_("trusted_proxies", ["10.0.0.0/8", "10.0.0.1/8"]), "trusted_proxies[1]",
         "'10.0.0.1/8' has bits set beyond its prefix; did you mean '10.0.0.0/8'?"),
        (with_("trusted_proxies", ["lb.internal"]), "trusted_proxies[0]",
         "expected an address or network such as 10.0.0.0/8"),
        (with_("trusted_proxies", "10.0.0.0/8"), "trusted_proxies", "expected a list, got '10.0.0.0/8'"),
        (with_("limits.max_connections", "many"), "limits.max_connections",
         "expected a whole number, got 'many'"),
        (with_("limits.max_message_size", "16 megs"), "limits.max_message_size",
         "expected a size such as 64KiB or 16MiB, got '16 megs'"),
        (with_("limits.max_header_bytes", 512), "limits.max_header_bytes",
         "must be between 1KiB and 1MiB, got 512 bytes"),
        (with_("limits.max_header_bytes", "2MiB"), "limits.max_header_bytes",
         "must be between 1KiB and 1MiB, got 2MiB"),
        (with_("limits.max_frames_per_second", {"burst": 10}), "limits.max_frames_per_second.rate",
         "missing required key"),
        (with_("limits.max_frames_per_second", {"rate": 0}), "limits.max_frames_per_second.rate",
         "a rate must be greater than zero"),
        (with_("limits.max_frames_per_second", {"rate": True}), "limits.max_frames_per_second.rate",
         "expected a rate such as 20/s or 600/m, or a number per second, got true"),
        (with_("limits.max_frames_per_second", {"rate": 10, "burst": 0}),
         "limits.max_frames_per_second.burst", "must be at least 1, got 0"),
        (with_("limits.max_target_bytes", 100), "limits.max_target_bytes",
         "must be between 1KiB and 1MiB, got 100 bytes"),
        (with_("limits.max_headers", 0), "limits.max_headers", "must be between 1 and 10000, got 0"),
        # flow control
        (with_("flow_control.high_water", 0), "flow_control.high_water", "must be greater than zero"),
        (with_("flow_control.low_water", "256KiB"), "flow_control.low_water",
         "must be lower than high_water (256KiB), got 256KiB"),
        (with_("flow_control.high_water", "32KiB"), "flow_control.low_water",
         "must be lower than high_water (32KiB), got 64KiB"),
        # shutdown
        (with_("shutdown.grace_period", "10s"), "shutdown.grace_period",
         "must be at least drain_period (30s), got 10s"),
        (with_("shutdown.drain_period", "1m"), "shutdown.grace_period",
         "must be at least drain_period (1m), got 45s"),
        # log
        (with_("log.level", "verbose"), "log.level",
         "expected 'debug', 'info', 'warning' or 'error', got 'verbose'"),
        (with_("log.format", "xml"), "log.format", "expected 'text' or 'json', got 'xml'"),
        # workers
        (with_("workers", "two"), "workers", "expected a whole number or auto, got 'two'"),
        (with_("workers", 1.5), "workers", "expected a whole number or auto, got 1.5"),
        (with_("workers", 0), "workers", "must be"),
        # http_parser
        (with_("http_parser", "llhttp"), "http_parser",
         "expected 'auto', 'h11' or 'httptools', got 'llhttp'"),
    ],
)
def test_validation_rule(data: dict[str, Any], path: str, message: str) -> None:
    error = config_error(data)
    assert error.path == path
    assert error.message.startswith(message), error.message
    assert "\n" not in error.message  # exactly one problem in each case
    assert "Value error" not in error.message
    assert "errors.pydantic.dev" not in error.message


def test_http_parser_httptools_is_refused_where_it_is_not_installed():
    # Runs here with httptools installed, and in test_core_collection.py with it blocked.
    try:
        import httptools  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError) as caught:
            parse_config(with_("http_parser", "httptools"))
        assert caught.value.path == "http_parser"
        assert "httptools is not installed" in caught.value.message
        assert parse_config(with_("http_parser", "auto")).http_parser == "auto"
    else:
        assert parse_config(with_("http_parser", "httptools")).http_parser == "httptools"


@pytest.mark.parametrize(
    ("data", "path", "allowed"),
    [
        (with_("bogus", 1), "bogus",
         "listeners, workers, http_parser, admin, routes, trusted_proxies, timeouts, heartbeat,"
         " limits, flow_control, shutdown, discovery, log"),
        (with_("listeners.0.port", 1), "listeners[0].port", "name, bind, tls"),
        (with_("listeners.0.tls", {"cert": "c", "key": "k", "ca": "x"}), "listeners[0].tls.ca",
         "cert, key, sni, min_version, client_ca, client_auth, forward_client_cert, watch_interval"),
        (with_("admin.port", 1), "admin.port", "enabled, bind"),
        (with_("routes.0.hash", "ip"), "routes[0].hash",
         "name, match, backends, compression, upstream_host, allowed_origins, hash_key, hash_fallback,"
         " balance_factor, retries, health_check, passive_ejection, rebalance"),
        (with_("routes.0.match.path", "/"), "routes[0].match.path", "host, path_prefix, path_prefix_raw"),
        (with_("routes.0.backends.0.address", "x"), "routes[0].backends[0].address", "url, dns, weight, tls"),
        (with_("timeouts.read", "1s"), "timeouts.read", "handshake, connect, idle, close"),
        (with_("heartbeat.pong", "1s"), "heartbeat.pong", "interval, timeout"),
        (with_("limits.max_frame_size", 1), "limits.max_frame_size",
         "max_connections, max_connections_per_ip, new_connections_per_ip, max_message_size,"
         " max_header_bytes, max_target_bytes, max_headers"),
        (with_("flow_control.mid_water", 1), "flow_control.mid_water", "high_water, low_water"),
        (with_("shutdown.drain", "1s"), "shutdown.drain", "drain_period, grace_period"),
        (with_("log.file", "x"), "log.file", "level, format"),
    ],
)
def test_unknown_key(data: dict[str, Any], path: str, allowed: str) -> None:
    error = config_error(data)
    assert error.path == path
    assert error.message.startswith(f"unknown key; expected one of: {allowed}")


def test_non_string_key() -> None:
    error = config_error({**MINIMAL, 1: "x"})
    assert (error.path, error.message) == ("1", "keys must be strings, got 1")


def test_unknown_key_suggests_the_closest_name() -> None:
    error = config_error(with_("routes.0.match.pathprefix", "/"))
    assert error.message == (
        "unknown key; expected one of: host, path_prefix, path_prefix_raw, subprotocol, headers, query"
        " (did you mean 'path_prefix'?)"
    )


def test_multiple_errors_are_all_listed() -> None:
    data = with_("timeouts.connect", "5 seconds")
    data = with_("routes.0.backends.0.url", "http://x", data)
    data = with_("log.level", "loud", data)
    error = config_error(data)
    assert error.path == "routes[0].backends[0].url"
    assert error.message.splitlines() == [
        "expected a ws:// or wss:// URL such as ws://10.0.0.11:8000, got 'http://x'",
        "  timeouts.connect: expected a duration such as 250ms, 30s, 5m or 1h, got '5 seconds'",
        "  log.level: expected 'debug', 'info', 'warning' or 'error', got 'loud'",
    ]
    assert str(error).startswith("routes[0].backends[0].url: expected a ws:// or wss:// URL")


def test_many_errors_are_capped() -> None:
    data = with_("routes.0.backends", [{"url": f"http://x{i}"} for i in range(30)])
    lines = config_error(data).message.splitlines()
    assert len(lines) == 22
    assert lines[-1] == "  ... and 9 more problems"


@pytest.mark.parametrize("data", [None, [], "listeners", 3])
def test_top_level_must_be_a_mapping(data: Any) -> None:
    error = config_error(data)
    assert (error.path, error.message) == ("", "the top level must be a mapping")


# --------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "wsgate.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_load_config(tmp_path: Path) -> None:
    path = write(tmp_path, yaml.safe_dump(MINIMAL))
    assert load_config(path) == parse_config(MINIMAL)
    assert load_config(str(path)) == parse_config(MINIMAL)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    error = info.value
    assert (error.file, error.path) == (str(path), "")
    assert error.message == "cannot read config file: [Errno 2] No such file or directory"
    assert str(error) == f"{path}: cannot read config file: [Errno 2] No such file or directory"
    assert error.__suppress_context__  # no chained traceback


def test_directory_is_not_a_config(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file: "):
        load_config(tmp_path)


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_bytes(b"listeners: \xff\n")
    with pytest.raises(ConfigError, match="cannot read config file: not UTF-8 text"):
        load_config(path)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("listeners:\n  - bind: 127.0.0.1:8080\n   name: x\n",
         "invalid YAML at line 3, column 4: "),
        ("routes: [a, b\n", "invalid YAML at line 2, column 1: "),
        ("a: b: c\n", "invalid YAML at line 1, column 5: mapping values are not allowed here"),
        ("listeners: []\nlisteners: []\n", "invalid YAML at line 2, column 1: duplicate key 'listeners'"),
        ("log:\n  level: info\n  level: debug\n", "invalid YAML at line 3, column 3: duplicate key 'level'"),
    ],
)
def test_invalid_yaml(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert (info.value.file, info.value.path) == (str(path), "")
    assert info.value.message.startswith(message), info.value.message


def test_yaml_merge_keys_still_work(tmp_path: Path) -> None:
    # Anchors and merges are plain YAML; only the result is validated.
    text = """
listeners: [{bind: "127.0.0.1:8080"}]
routes:
  - name: a
    backends:
      - &b {url: "ws://127.0.0.1:9001", weight: 2}
      - {<<: *b, url: "ws://127.0.0.1:9002"}
"""
    config = load_config(write(tmp_path, text))
    assert [(b.port, b.weight) for b in config.routes[0].backends] == [(9001, 2), (9002, 2)]


@pytest.mark.parametrize("text", ["", "\n", "# only a comment\n", "---\n"])
def test_empty_file(tmp_path: Path, text: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    assert info.value.message == "the top level must be a mapping"


def test_validation_error_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, yaml.safe_dump(with_("timeouts.connect", "soon")))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == (
        f"{path}: timeouts.connect: expected a duration such as 250ms, 30s, 5m or 1h, got 'soon'"
    )


# --------------------------------------------------------------------------
# Environment variables
# --------------------------------------------------------------------------

ENVIRONMENT = {"WSGATE_T_HOST": "10.0.0.7", "WSGATE_T_PORT": "8000", "WSGATE_T_EMPTY": "",
               "WSGATE_T_FLAG": "on", "WSGATE_T_DOLLAR": "a$b", "WSGATE_T_LIST": "[a, {b: c}]"}


@pytest.fixture
def environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in ENVIRONMENT.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("WSGATE_T_UNSET", raising=False)


@pytest.mark.parametrize(
    ("written", "value"),
    [
        ("${WSGATE_T_HOST}", "10.0.0.7"),
        ("ws://${WSGATE_T_HOST}:${WSGATE_T_PORT}/ws", "ws://10.0.0.7:8000/ws"),
        ("${WSGATE_T_UNSET:-fallback}", "fallback"),
        ("${WSGATE_T_EMPTY:-fallback}", "fallback"),
        ("${WSGATE_T_HOST:-unused}", "10.0.0.7"),
        ("x${WSGATE_T_EMPTY}y", "xy"),
        ("'${WSGATE_T_UNSET:-}'", ""),
        # A whole unquoted reference is typed as YAML types a plain value; a quoted one is not.
        ("${WSGATE_T_PORT}", 8000),
        ("${WSGATE_T_UNSET:-9001}", 9001),
        ("${WSGATE_T_FLAG}", True),
        ("${WSGATE_T_UNSET:-}", None),
        ("'${WSGATE_T_PORT}'", "8000"),
        ('"${WSGATE_T_PORT}"', "8000"),
        ("${WSGATE_T_PORT}s", "8000s"),
        # A variable's value is text, never YAML structure, and is not substituted again.
        ("${WSGATE_T_LIST}", "[a, {b: c}]"),
        ("${WSGATE_T_DOLLAR}", "a$b"),
        # $$ is one $; any other $ stays as written.
        ("$${WSGATE_T_HOST}", "${WSGATE_T_HOST}"),
        ("$$$${WSGATE_T_HOST}", "$${WSGATE_T_HOST}"),
        ("$$${WSGATE_T_HOST}", "$10.0.0.7"),
        ("${WSGATE_T_UNSET:-a$$b}", "a$b"),
        ("pa$word", "pa$word"),
        ("100$", "100$"),
        ("$", "$"),
    ],
)
def test_environment_substitution(tmp_path: Path, environment: None, written: str, value: Any) -> None:
    assert load_config_data(write(tmp_path, f"key: {written}\n")) == {"key": value}


def test_substitution_reaches_values_in_lists_and_mappings_but_not_keys() -> None:
    data = {"${A}": [{"x": "${A}"}, "${A}", 5, None], "y": {"z": "${A:-d}"}}
    assert substitute_environment(data, {"A": "1"}) == {"${A}": [{"x": "1"}, "1", 5, None], "y": {"z": "1"}}


@pytest.mark.parametrize(
    ("text", "path", "message"),
    [
        ("routes: [{backends: [{url: 'ws://${WSGATE_T_UNSET}:9001'}]}]\n", "routes[0].backends[0].url",
         "environment variable WSGATE_T_UNSET is not set, and ${WSGATE_T_UNSET} has no default"),
        ("log:\n  level: ${WSGATE_T_UNSET}\n", "log.level",
         "environment variable WSGATE_T_UNSET is not set, and ${WSGATE_T_UNSET} has no default"),
        ("a: {b: [x, '${1X}']}\n", "a.b[1]", "expected ${NAME} or ${NAME:-default} after '${'"),
        ("a: '${WSGATE_T_HOST'\n", "a", "expected ${NAME} or ${NAME:-default} after '${'"),
        ("a: '${WSGATE_T_UNSET:-a$b}'\n", "a", "expected ${NAME} or ${NAME:-default} after '${'"),
    ],
)
def test_a_reference_that_cannot_be_substituted_names_its_key_path(
    tmp_path: Path, environment: None, text: str, path: str, message: str
) -> None:
    file = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(file)
    assert (info.value.file, info.value.path) == (str(file), path)
    assert info.value.message.startswith(message), info.value.message


def test_a_config_with_variables_validates_with_their_values(tmp_path: Path, environment: None) -> None:
    text = """
listeners: [{bind: "127.0.0.1:${WSGATE_T_PORT}"}]
workers: ${WSGATE_T_UNSET:-2}
routes:
  - name: echo
    backends: [{url: "ws://${WSGATE_T_HOST}:9001"}]
limits:
  # Unquoted in a block: a flow mapping's braces would end the plain scalar.
  max_connections: ${WSGATE_T_PORT}
  max_message_size: ${WSGATE_T_UNSET:-1MiB}
"""
    config = load_config(write(tmp_path, text))
    assert (config.listeners[0].port, config.workers) == (8000, 2)
    assert config.routes[0].backends[0].host == "10.0.0.7"
    assert (config.limits.max_connections, config.limits.max_message_size) == (8000, 1024 * 1024)


def test_dumped_data_loads_back_unchanged(tmp_path: Path, environment: None) -> None:
    # What the supervisor hands its workers: substituted once, and not again.
    text = "a: '$${WSGATE_T_HOST}'\nb: ${WSGATE_T_DOLLAR}\nc:\n- $$\n- '$$$$'\n"
    text += "- ${WSGATE_T_PORT}\n- '${WSGATE_T_PORT}'\n"
    data = load_config_data(write(tmp_path, text))
    assert data == {"a": "${WSGATE_T_HOST}", "b": "a$b", "c": ["$", "$$", 8000, "8000"]}
    assert load_config_data(write(tmp_path, dump_config_data(data))) == data


# --------------------------------------------------------------------------
# Reloading: the settings that take a restart
# --------------------------------------------------------------------------

_TLS = {"cert": "/etc/tls.crt", "key": "/etc/tls.key"}


@pytest.mark.parametrize(
    ("path", "value", "supervised", "kept"),
    [
        ("workers", 4, False, ["workers"]),
        ("admin.bind", "127.0.0.1:9091", False, ["admin.bind"]),
        ("admin.enabled", False, False, ["admin.enabled"]),
        ("admin.ready_requires_backends", True, False, []),
        ("admin.token_file", "/etc/wsgate/token", False, ["admin.token_file"]),
        ("admin.token_env", "WSGATE_TOKEN", True, ["admin.token_env"]),
        ("limits.max_frames_per_second", {"rate": 100}, True, []),
        ("log.level", "debug", False, []),
        ("limits.max_connections", 10, True, []),
        ("listeners.0.bind", "127.0.0.1:8081", False, []),
        ("listeners.0.bind", "127.0.0.1:8081", True, ["listeners"]),
        ("listeners.0", {"name": "other", "bind": "127.0.0.1:8080"}, True, ["listeners"]),
        ("listeners.0.tls", _TLS, True, []),
    ],
)
def test_keep_restart_settings(path: str, value: Any, supervised: bool, kept: list[str]) -> None:
    running, new = parse_config(MINIMAL), parse_config(with_(path, value))
    effective, listed = keep_restart_settings(running, new, supervised=supervised)
    assert listed == kept
    assert effective == (running if kept else new)


def test_keep_restart_settings_lists_every_key_in_schema_order() -> None:
    running = parse_config(with_("admin", {"enabled": False}))
    new = parse_config(with_("workers", 2, with_("admin", {"bind": "127.0.0.1:9091", "enabled": True})))
    effective, listed = keep_restart_settings(running, new, supervised=False)
    assert listed == ["workers", "admin.enabled", "admin.bind"]
    assert (effective.workers, effective.admin) == (1, running.admin)


def test_under_a_supervisor_a_moved_listener_stays_but_takes_its_new_tls() -> None:
    listeners = [{"name": "public", "bind": "127.0.0.1:8080"}, {"name": "old", "bind": ":8082"}]
    named = with_("listeners", listeners)
    running = parse_config(named)
    new = parse_config(with_("listeners", [{"name": "public", "bind": "127.0.0.1:8081", "tls": _TLS}], named))
    effective, listed = keep_restart_settings(running, new, supervised=True)
    assert listed == ["listeners"]
    assert [(listener.name, listener.bind) for listener in effective.listeners] == [
        ("public", "127.0.0.1:8080"),
        ("old", ":8082"),
    ]
    assert effective.listeners[0].tls == new.listeners[0].tls
    assert effective.listeners[1] == running.listeners[1]


def test_an_admin_server_that_stays_off_can_move() -> None:
    running = parse_config(with_("admin", {"enabled": False}))
    new = parse_config(with_("admin", {"enabled": False, "bind": "127.0.0.1:9091"}))
    assert keep_restart_settings(running, new, supervised=False) == (new, [])


# --------------------------------------------------------------------------
# The example file
# --------------------------------------------------------------------------


def test_example_file_loads() -> None:
    config = load_config(EXAMPLE)
    assert [(listener.host, listener.port) for listener in config.listeners] == [("127.0.0.1", 8080)]
    assert (config.admin.host, config.admin.port) == ("127.0.0.1", 9090)
    (route,) = config.routes
    assert route.name == "echo"
    assert route.match.path_prefix == "/"
    assert [b.label for b in route.backends] == ["ws://127.0.0.1:9001", "dns:localhost:9002"]


def test_example_file_shows_the_defaults() -> None:
    config = load_config(EXAMPLE)
    defaults = parse_config(
        {"listeners": [{"bind": "127.0.0.1:8080"}], "routes": [{"name": "r", "backends": [{"url": "ws://x"}]}]}
    )
    assert config.workers == defaults.workers
    for section in ("admin", "timeouts", "heartbeat", "limits", "flow_control", "shutdown", "discovery", "log"):
        assert getattr(config, section) == getattr(defaults, section), section
    route, default_route = config.routes[0], defaults.routes[0]
    for key in ("match", "compression", "upstream_host", "allowed_origins", "hash_key", "hash_fallback",
                "balance_factor", "retries", "passive_ejection", "rebalance"):
        assert getattr(route, key) == getattr(default_route, key), key


# Keys that exclude each other: an entry shows one of them.
_ALTERNATIVES = {
    ("Backend", "url"): "dns",
    ("Backend", "dns"): "url",
    ("Match", "path_prefix_raw"): "path_prefix",
}


def _missing_keys(model: type[BaseModel], data: Any, path: str) -> list[str]:
    """Schema keys absent from `data`, descending into nested sections and lists."""
    missing = []
    for name, field in model.model_fields.items():
        other = _ALTERNATIVES.get((model.__name__, name))
        if isinstance(data, dict) and other in data:
            continue
        if not isinstance(data, dict) or name not in data:
            missing.append(f"{path}{name}")
            continue
        value = data[name]
        nested = field.annotation
        args = getattr(nested, "__args__", ())
        inner = next((a for a in (nested, *args) if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if inner is None:
            continue
        for i, item in enumerate(value if isinstance(value, list) else [value]):
            if item is not None:
                missing += _missing_keys(inner, item, f"{path}{name}[{i}].")
    return missing


def test_example_file_has_every_option() -> None:
    data = yaml.safe_load(EXAMPLE.read_text(encoding="utf-8"))
    assert _missing_keys(Config, data, "") == []


def test_example_file_comments_every_option() -> None:
    lines = EXAMPLE.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines[1:], start=2):
        text = line.strip()
        if text and not text.startswith(("#", "- #")):
            above = lines[number - 2].strip()
            assert above.startswith(("#", "- #")), f"line {number} has no comment above it: {text}"
