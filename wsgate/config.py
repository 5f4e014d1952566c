"""The YAML configuration: schema, units ("30s", "16MiB") and validation with key paths.

A pure core module: it reads a file and returns a frozen pydantic model, or
raises ``ConfigError``. It never logs and never exits; ``cli`` decides what a
bad config means for the process.
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import os
import re
import types
import typing
from collections.abc import Mapping
from fractions import Fraction
from typing import Annotated, Any, Literal, Union
from urllib.parse import urlsplit

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from wsgate.errors import ConfigError

__all__ = [
    "Admin",
    "Backend",
    "BackendTls",
    "Config",
    "Discovery",
    "Duration",
    "FlowControl",
    "FrameRate",
    "HealthCheck",
    "Heartbeat",
    "Limits",
    "Listener",
    "Log",
    "Match",
    "NewConnections",
    "PassiveEjection",
    "Rebalance",
    "Route",
    "Shutdown",
    "Size",
    "SniCertificate",
    "Timeouts",
    "Tls",
    "dump_config_data",
    "keep_restart_settings",
    "load_config",
    "load_config_data",
    "parse_config",
    "parse_duration",
    "parse_host_port",
    "parse_network",
    "parse_rate",
    "parse_size",
    "read_admin_token",
    "substitute_environment",
]

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

# Beyond this many problems the list stops helping and starts scrolling.
_MAX_LISTED_PROBLEMS = 20


# --------------------------------------------------------------------------
# Showing values in messages
# --------------------------------------------------------------------------


def _show(value: object) -> str:
    """Render a config value the way the user wrote it, for 'got ...' clauses."""
    if value is None:
        return "an empty value"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return repr(value if len(value) <= 60 else value[:57] + "...")
    if isinstance(value, (int, float)):
        return f"{value:g}" if isinstance(value, float) else str(value)
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        return "a list"
    return f"a {type(value).__name__}"


def _format_duration(seconds: float) -> str:
    """250ms, 30s, 5m, 1h: the shortest unit that shows the value exactly."""
    if seconds == 0:
        return "0s"
    if seconds < 1:
        return f"{seconds * 1000:g}ms"
    for unit, size in (("h", 3600), ("m", 60)):
        if seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"


def _format_size(size: int) -> str:
    """16MiB, 64KiB or '1000 bytes': binary units only where they are exact."""
    for unit, factor in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if size and size % factor == 0:
            return f"{size // factor}{unit}"
    return "1 byte" if size == 1 else f"{size} bytes"


# --------------------------------------------------------------------------
# Units and addresses
# --------------------------------------------------------------------------

_DURATION_HINT = "expected a duration such as 250ms, 30s, 5m or 1h"
_DURATION_RE = re.compile(r"(?P<num>[0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*(?P<unit>ms|s|m|h)?")
_DURATION_DIVISORS = {"ms": 1000, "s": 1, "m": Fraction(1, 60), "h": Fraction(1, 3600), None: 1}


def parse_duration(value: object) -> float:
    """Seconds from a number of seconds or a string like "250ms", "30s", "5m", "1h"."""
    if isinstance(value, bool):
        raise ValueError(f"{_DURATION_HINT}, got {_show(value)}")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip()
        match = _DURATION_RE.fullmatch(text.removeprefix("-"))
        if match is None:
            raise ValueError(f"{_DURATION_HINT}, got {_show(value)}")
        # Fraction keeps "1.1h" exact until the final conversion to float.
        seconds = float(Fraction(match["num"]) / _DURATION_DIVISORS[match["unit"]])
        if text.startswith("-"):
            seconds = -seconds
    else:
        raise ValueError(f"{_DURATION_HINT}, got {_show(value)}")
    if not math.isfinite(seconds):
        raise ValueError(f"{_DURATION_HINT}, got {_show(value)}")
    if seconds < 0:
        raise ValueError(f"a duration cannot be negative, got {_show(value)}")
    return seconds


_SIZE_HINT = "expected a size such as 64KiB or 16MiB"
_SIZE_RE = re.compile(r"(?P<num>[0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*(?P<unit>[A-Za-z]*)")
# Matched case-insensitively: nobody means megabits in a proxy config.
_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "kib": KiB,
    "mib": MiB,
    "gib": GiB,
    "tib": 1024 * GiB,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
}


def parse_size(value: object) -> int:
    """Bytes from an integer or a string like "512", "64KiB", "16MiB", "1GB"."""
    if isinstance(value, bool):
        raise ValueError(f"{_SIZE_HINT}, got {_show(value)}")
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer()):
        size = int(value)
    elif isinstance(value, str):
        text = value.strip()
        match = _SIZE_RE.fullmatch(text.removeprefix("-"))
        unit = match["unit"].lower() if match else None
        if match is None or unit not in _SIZE_UNITS:
            raise ValueError(f"{_SIZE_HINT}, got {_show(value)}")
        exact = Fraction(match["num"]) * _SIZE_UNITS[unit]
        if exact.denominator != 1:
            raise ValueError(f"a size must be a whole number of bytes, got {_show(value)}")
        size = -int(exact) if text.startswith("-") else int(exact)
    else:
        raise ValueError(f"{_SIZE_HINT}, got {_show(value)}")
    if size < 0:
        raise ValueError(f"a size cannot be negative, got {_show(value)}")
    return size


_RATE_HINT = "expected a rate such as 20/s or 600/m, or a number per second"
_RATE_RE = re.compile(r"(?P<num>[0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*(?:/\s*(?P<unit>s|m|h))?")
_RATE_PERIODS = {"s": 1, "m": 60, "h": 3600, None: 1}


def parse_rate(value: object) -> float:
    """Events per second from a number or a string like "20/s", "600/m", "1000/h"."""
    if isinstance(value, bool):
        raise ValueError(f"{_RATE_HINT}, got {_show(value)}")
    if isinstance(value, (int, float)):
        rate = float(value)
    elif isinstance(value, str):
        match = _RATE_RE.fullmatch(value.strip())
        if match is None:
            raise ValueError(f"{_RATE_HINT}, got {_show(value)}")
        rate = float(Fraction(match["num"]) / _RATE_PERIODS[match["unit"]])
    else:
        raise ValueError(f"{_RATE_HINT}, got {_show(value)}")
    if not math.isfinite(rate):
        raise ValueError(f"{_RATE_HINT}, got {_show(value)}")
    if rate <= 0:
        raise ValueError(f"a rate must be greater than zero, got {_show(value)}")
    return rate


_NETWORK_HINT = "expected an address or network such as 10.0.0.0/8 or 2001:db8::/32"


def parse_network(value: object) -> str:
    """A network in CIDR form ("10.0.0.0/8"; a bare address is a /32 or /128), normalized."""
    if not isinstance(value, str):
        raise ValueError(f"{_NETWORK_HINT}, got {_show(value)}")
    try:
        return str(ipaddress.ip_network(value.strip()))
    except ValueError:
        pass
    try:
        loose = ipaddress.ip_network(value.strip(), strict=False)
    except ValueError:
        raise ValueError(f"{_NETWORK_HINT}, got {_show(value)}") from None
    raise ValueError(f"{_show(value)} has bits set beyond its prefix; did you mean {str(loose)!r}?")


_HOST_PORT_HINT = "expected host:port such as 127.0.0.1:8080"
_PORT_RE = re.compile(r"[0-9]{1,5}")
# DNS names and IPv4 literals; underscores appear in real service names.
_HOSTNAME_RE = re.compile(
    r"(?=.{1,253}\Z)[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
    r"(?:\.[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)*"
)


def _is_ipv6(text: str) -> bool:
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


def format_host_port(host: str, port: int) -> str:
    """ "host:port", with an IPv6 address in brackets so the port stays readable."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_host_port(value: str) -> tuple[str, int]:
    """Split "host:port", "[v6]:port" or ":port" (all interfaces) into (host, port)."""
    if not isinstance(value, str):
        raise ValueError(f"{_HOST_PORT_HINT}, got {_show(value)}")
    if value.startswith("["):
        host, bracket, rest = value[1:].partition("]")
        if not bracket or not _is_ipv6(host):
            raise ValueError(f"{_HOST_PORT_HINT} or [::1]:8080, got {_show(value)}")
        if not rest.startswith(":"):
            raise ValueError(f"{_HOST_PORT_HINT}; the port is missing in {_show(value)}")
        port_text = rest[1:]
    else:
        host, colon, port_text = value.rpartition(":")
        if not colon:
            raise ValueError(f"{_HOST_PORT_HINT}; the port is missing in {_show(value)}")
        if _is_ipv6(host) or _is_ipv6(value):
            raise ValueError(
                f"put an IPv6 address in brackets, as in [::1]:8080, got {_show(value)}"
            )
        if host == "":
            host = "0.0.0.0"
        elif not _HOSTNAME_RE.fullmatch(host):
            raise ValueError(f"{_HOST_PORT_HINT}, got {_show(value)}")
    if not _PORT_RE.fullmatch(port_text) or int(port_text) > 65535:
        raise ValueError(f"the port must be a number from 0 to 65535, got {_show(value)}")
    return host.lower(), int(port_text)


# --------------------------------------------------------------------------
# Annotated types and small validators
# --------------------------------------------------------------------------


def _error_at(loc: tuple[str | int, ...], message: str) -> PydanticCustomError:
    """An error that points below the value being validated (e.g. at one list item's key).

    pydantic gives a validator no way to extend the location, so the suffix
    rides in the context and ``_problems`` appends it.
    """
    return PydanticCustomError("wsgate", message, {"wsgate_loc": loc})


def _check_int(value: object) -> object:
    # pydantic's lax mode reads `true` as 1 and 2.0 as 2; in a config both are mistakes.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"expected a whole number, got {_show(value)}")
    return value


def _at_least(low: int) -> AfterValidator:
    def check(value: int) -> int:
        if value < low:
            raise ValueError(f"must be at least {low}, got {value}")
        return value

    return AfterValidator(check)


def _between(low: int, high: int) -> AfterValidator:
    def check(value: int) -> int:
        if not low <= value <= high:
            raise ValueError(f"must be between {low} and {high}, got {value}")
        return value

    return AfterValidator(check)


def _size_between(low: int, high: int) -> AfterValidator:
    def check(value: int) -> int:
        if not low <= value <= high:
            raise ValueError(
                f"must be between {_format_size(low)} and {_format_size(high)}, "
                f"got {_format_size(value)}"
            )
        return value

    return AfterValidator(check)


def _positive(value: float) -> float:
    # 0 means "off" for some settings; where it would mean "never", refuse it.
    if value <= 0:
        raise ValueError("must be greater than zero")
    return value


def _check_host_port(value: object) -> str:
    parse_host_port(value)  # type: ignore[arg-type]
    return value  # type: ignore[return-value]


def _check_name(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty")
    return value


def _lower(value: object) -> object:
    return value.lower() if isinstance(value, str) else value


def _none_as_empty(value: object) -> object:
    # `timeouts:` with every line under it commented out is YAML null; it means "defaults".
    return {} if value is None else value


Duration = Annotated[float, BeforeValidator(parse_duration)]
"""Seconds; YAML may hold a number of seconds or "250ms", "30s", "5m", "1h"."""

Size = Annotated[int, BeforeValidator(parse_size)]
"""Bytes; YAML may hold an integer or "512", "64KiB", "16MiB", "1GB"."""

_Int = Annotated[int, BeforeValidator(_check_int)]
_PositiveDuration = Annotated[Duration, AfterValidator(_positive)]
_HostPort = Annotated[str, BeforeValidator(_check_host_port)]
_Network = Annotated[str, BeforeValidator(parse_network)]
_Name = Annotated[str, AfterValidator(_check_name)]


def _check_match_host(value: str) -> str:
    host = value.strip().lower()
    hint = "expected a host name such as chat.example.com"
    if host == "*":
        raise ValueError("'*' alone is not allowed; leave host out (or null) to match any host")
    for mark, what in (("://", "scheme"), ("/", "path"), (":", "port")):
        if mark in host:
            raise ValueError(f"{hint}, without a {what}, got {_show(value)}")
    name = host.removeprefix("*.")
    if "*" in name or not _HOSTNAME_RE.fullmatch(name):
        raise ValueError(
            f"expected a host name such as chat.example.com or *.example.com, got {_show(value)}"
        )
    return host


def _check_path_prefix(value: str) -> str:
    if not value.startswith("/"):
        raise ValueError(f"must start with '/', got {_show(value)}")
    if "?" in value or "#" in value or any(c.isspace() for c in value):
        raise ValueError(
            f"expected a path such as /ws, without a query or spaces, got {_show(value)}"
        )
    return value


def _check_origin(value: str) -> str:
    example = "such as https://chat.example.com"
    if value == "null":  # what browsers send for file:// pages and sandboxed frames
        return value
    if "*" in value:
        raise ValueError(
            "wildcards are not supported in origins; leave allowed_origins out to accept"
            f" any origin, got {_show(value)}"
        )
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError:
        raise ValueError(f"expected an origin {example}, got {_show(value)}") from None
    if not parts.scheme or not parts.hostname or "@" in parts.netloc:
        raise ValueError(f"expected an origin {example}, got {_show(value)}")
    if parts.path or parts.query or parts.fragment or value.endswith(("?", "#")):
        bare = f"{parts.scheme}://{parts.netloc}".lower()
        raise ValueError(
            f"an origin has no path or trailing slash (browsers send {bare!r}), got {_show(value)}"
        )
    # Browsers serialize the scheme and host in lowercase; compare like with like.
    return value.lower()


def _check_upstream_host(value: str) -> str:
    if not value or any(c.isspace() for c in value) or "/" in value:
        raise ValueError(
            "expected a Host header value such as chat.internal or chat.internal:8000,"
            f" got {_show(value)}"
        )
    return value


# --------------------------------------------------------------------------
# The schema
# --------------------------------------------------------------------------


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


_M = typing.TypeVar("_M", bound=BaseModel)
# A section whose keys all have defaults; an empty (null) section means all defaults.
_Section = Annotated[_M, BeforeValidator(_none_as_empty)]


def _tls_version(value: object) -> object:
    # YAML reads `min_version: 1.2` as a float; "1.2", 1.2 and "TLSv1.2" all mean the same.
    if isinstance(value, float):
        value = f"{value:.1f}"
    if isinstance(value, str):
        value = value.strip().lower().removeprefix("tlsv")
    return value


class SniCertificate(_Model):
    """A certificate served to clients that ask for one of `names` by SNI."""

    names: list[Annotated[str, AfterValidator(_check_match_host)]] = Field(min_length=1)
    cert: _Name
    key: _Name


class Tls(_Model):
    """TLS termination for a listener; files are loaded (and checked) when it starts."""

    cert: _Name
    key: _Name
    sni: list[SniCertificate] = []
    min_version: Annotated[Literal["1.2", "1.3"], BeforeValidator(_tls_version)] = "1.2"
    client_ca: _Name | None = None
    client_auth: Literal["required", "optional"] = "required"
    forward_client_cert: bool = False
    watch_interval: Duration = 0.0


class BackendTls(_Model):
    """TLS toward a backend: how its certificate is checked, and ours if it asks."""

    ca: _Name | None = None
    server_name: Annotated[str, AfterValidator(_check_upstream_host)] | None = None
    verify: bool = True
    cert: _Name | None = None
    key: _Name | None = None

    @model_validator(mode="after")
    def _cert_with_key(self) -> BackendTls:
        if (self.cert is None) != (self.key is None):
            raise ValueError("a client certificate needs both cert and key")
        return self


class _Bound(_Model):
    """A section with a `bind` address (declared by the subclass, to keep the key order)."""

    if typing.TYPE_CHECKING:
        bind: str

    @property
    def host(self) -> str:
        return parse_host_port(self.bind)[0]

    @property
    def port(self) -> int:
        return parse_host_port(self.bind)[1]


class Listener(_Bound):
    """One address the gateway accepts clients on."""

    name: _Name
    bind: _HostPort
    tls: Tls | None = None
    # A PROXY protocol header is required first, before TLS and HTTP, from L4 balancers.
    proxy_protocol: Literal["v1", "v2", "any"] | None = None
    # The peers allowed to send that header (the balancers); None: any peer.
    proxy_protocol_from: list[_Network] | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _proxy_protocol_from_needs_proxy_protocol(self) -> Listener:
        if self.proxy_protocol_from is not None and self.proxy_protocol is None:
            raise _error_at(
                ("proxy_protocol_from",),
                "applies only with proxy_protocol (v1, v2 or any), which this listener does not set",
            )
        return self

    @model_validator(mode="before")
    @classmethod
    def _default_name(cls, data: Any) -> Any:
        # The bind address is unique among listeners anyway, so it makes a fine name.
        # Without a usable bind the bind error is the one worth reading, not "name missing".
        if isinstance(data, dict) and "name" not in data:
            bind = data.get("bind")
            return {**data, "name": bind if isinstance(bind, str) and bind else "unnamed"}
        return data


class Admin(_Bound):
    """The admin HTTP server: /metrics, /healthz, /readyz, /status, POST /reload."""

    enabled: bool = True
    bind: _HostPort = "127.0.0.1:9090"
    # /readyz also says 503 while some route has no healthy backend.
    ready_requires_backends: bool = False
    # Where the bearer token that POST /reload needs comes from: a file, or an environment
    # variable by name. Without either, only loopback peers may POST.
    token_file: _Name | None = None
    token_env: _Name | None = None

    @model_validator(mode="after")
    def _one_token_source(self) -> Admin:
        if self.token_file is not None and self.token_env is not None:
            raise _error_at(("token_env",), "give token_file or token_env, not both")
        return self


class Match(_Model):
    """Which handshakes a route takes: by Host header and path prefix."""

    host: Annotated[str, AfterValidator(_check_match_host)] | None = None
    # Whole segments: /chat takes /chat and /chat/x, not /chatroom.
    path_prefix: Annotated[str, AfterValidator(_check_path_prefix)] = "/"
    # A plain string prefix, for the rare route that wants /chatroom under /chat.
    path_prefix_raw: Annotated[str, AfterValidator(_check_path_prefix)] | None = None

    @model_validator(mode="after")
    def _one_path_prefix(self) -> Match:
        if self.path_prefix_raw is not None and "path_prefix" in self.model_fields_set:
            raise ValueError("give path_prefix or path_prefix_raw, not both")
        return self


_URL_HINT = "expected a ws:// or wss:// URL such as ws://10.0.0.11:8000"


def _check_backend_url(value: object) -> str:
    if not isinstance(value, str) or any(c.isspace() for c in value):
        raise ValueError(f"{_URL_HINT}, got {_show(value)}")
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError:
        raise ValueError(f"{_URL_HINT}, got {_show(value)}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("ws", "wss") or not value[len(scheme) :].startswith("://") or not parts.hostname:
        raise ValueError(f"{_URL_HINT}, got {_show(value)}")
    if "@" in parts.netloc:
        raise ValueError(
            f"a backend URL must not contain a user name or password, got {_show(value)}"
        )
    if parts.query or parts.fragment or "?" in value or "#" in value:
        raise ValueError(f"a backend URL must not have a query or fragment, got {_show(value)}")
    if parts.path not in ("", "/"):
        raise ValueError(
            "a backend URL has no path (the client's request path is forwarded as is),"
            f" got {_show(value)}"
        )
    bracketed = parts.netloc.startswith("[")
    if not (_is_ipv6(parts.hostname) if bracketed else _HOSTNAME_RE.fullmatch(parts.hostname)):
        raise ValueError(f"{_URL_HINT}, got {_show(value)}")
    if port == 0:
        raise ValueError(f"the port must be a number from 1 to 65535, got {_show(value)}")
    return value


_DNS_HINT = "expected name:port such as chat-backend.default.svc.cluster.local:8000"


def _check_dns_target(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{_DNS_HINT}, got {_show(value)}")
    name, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"{_DNS_HINT}, got {_show(value)}")
    if not _HOSTNAME_RE.fullmatch(name.lower()):
        raise ValueError(f"{_DNS_HINT}, got {_show(value)}")
    return value.lower()


class Backend(_Model):
    """One upstream WebSocket server (`url`), or every address of a DNS name (`dns`)."""

    url: Annotated[str, BeforeValidator(_check_backend_url)] | None = None
    dns: Annotated[str, BeforeValidator(_check_dns_target)] | None = None
    weight: Annotated[_Int, _between(1, 1000)] = 1
    # For wss:// URLs (optional there) and for dns entries (it makes them TLS).
    tls: BackendTls | None = None

    @model_validator(mode="after")
    def _url_or_dns(self) -> Backend:
        if (self.url is None) == (self.dns is None):
            raise ValueError("give exactly one of url (ws://host:port) or dns (name:port)")
        if self.url is not None and self.tls is not None and self.scheme == "ws":
            raise _error_at(("tls",), "tls applies to wss:// backends; use a wss:// URL")
        return self

    @property
    def scheme(self) -> str:
        """ws or wss: how the gateway talks to this backend."""
        if self.url is not None:
            return urlsplit(self.url).scheme.lower()
        return "ws" if self.tls is None else "wss"

    @property
    def host(self) -> str:
        """Lowercase host name or address; an IPv6 literal without its brackets."""
        if self.dns is not None:
            return self.dns.rpartition(":")[0]
        return urlsplit(self.url).hostname or ""

    @property
    def port(self) -> int:
        if self.dns is not None:
            return int(self.dns.rpartition(":")[2])
        return urlsplit(self.url).port or (443 if self.scheme == "wss" else 80)

    @property
    def label(self) -> str:
        """How the config names this entry: its URL or its DNS target."""
        return self.url if self.url is not None else f"dns:{self.dns}"


_HASH_KEY_HINT = "expected ip, path, header:NAME, cookie:NAME or query:NAME"


def _check_hash_key(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{_HASH_KEY_HINT}, got {_show(value)}")
    kind, sep, name = value.partition(":")
    if value in ("ip", "path") or (kind in ("header", "cookie", "query") and sep and name.strip()):
        return value
    raise ValueError(f"{_HASH_KEY_HINT}, got {_show(value)}")


class HealthCheck(_Model):
    """Active probes of every backend of a route."""

    type: Literal["tcp", "http", "websocket"] = "tcp"
    path: Annotated[str, AfterValidator(_check_path_prefix)] = "/"
    interval: _PositiveDuration = 5.0
    timeout: _PositiveDuration = 2.0
    healthy_threshold: Annotated[_Int, _between(1, 100)] = 2
    unhealthy_threshold: Annotated[_Int, _between(1, 100)] = 3


def _duration_not_below(value: float, info: ValidationInfo, other: str) -> float:
    """`value` unless it is shorter than the (valid) duration in field `other`."""
    floor = info.data.get(other)  # absent when that field itself was invalid
    if floor is not None and value < floor:
        raise ValueError(
            f"must be at least {other} ({_format_duration(floor)}), got {_format_duration(value)}"
        )
    return value


class PassiveEjection(_Model):
    """Ejecting a backend after consecutive connect or handshake failures."""

    failures: Annotated[_Int, _between(0, 1000)] = 3
    backoff: _PositiveDuration = 5.0
    max_backoff: _PositiveDuration = Field(default=300.0, validate_default=True)

    @field_validator("max_backoff")
    @classmethod
    def _not_below_backoff(cls, cap: float, info: ValidationInfo) -> float:
        return _duration_not_below(cap, info, "backoff")


class Rebalance(_Model):
    """Moving connections to the backend that now owns their key, a few at a time."""

    max_fraction: Annotated[float, Field(gt=0, le=1)] = 0.05
    period: _PositiveDuration = 60.0


class Route(_Model):
    """A set of backends and the handshakes that go to them."""

    name: _Name
    match: _Section[Match] = Match()
    backends: list[Backend] = Field(min_length=1)
    compression: Literal["passthrough", "strip"] = "passthrough"
    upstream_host: Annotated[str, AfterValidator(_check_upstream_host)] | None = None
    allowed_origins: list[Annotated[str, AfterValidator(_check_origin)]] | None = None
    hash_key: Annotated[str, BeforeValidator(_check_hash_key)] = "ip"
    hash_fallback: Literal["ip", "random"] = "ip"
    balance_factor: Annotated[float, Field(gt=1.0, le=100.0)] | None = None
    retries: Annotated[_Int, _between(0, 10)] = 2
    health_check: HealthCheck | None = None
    passive_ejection: _Section[PassiveEjection] = PassiveEjection()
    rebalance: Rebalance | None = None
    # On reload, connections on a backend that left the route: closed with 1012
    # spread over shutdown.drain_period, or kept until they end.
    on_backend_removed: Literal["close", "keep"] = "close"
    # A directory whose files answer a plain GET (no Upgrade) on this route's paths;
    # without it such a request gets 426, as a WebSocket-only endpoint should answer.
    static: str | None = None

    @field_validator("backends")
    @classmethod
    def _unique_backends(cls, backends: list[Backend]) -> list[Backend]:
        # ws://a, ws://a:80 and ws://a/ are one server; compare what we connect to.
        seen: dict[tuple[str, str, int], int] = {}
        for i, backend in enumerate(backends):
            kind = "url" if backend.url is not None else "dns"
            first = seen.setdefault((kind, backend.host, backend.port), i)
            if first != i:
                raise _error_at(
                    (i, kind),
                    f"duplicate backend: {backend.label} is already backends[{first}]",
                )
        return backends


class Timeouts(_Model):
    """How long each phase of a connection may take."""

    handshake: _PositiveDuration = 10.0
    connect: _PositiveDuration = 5.0
    idle: Duration = 300.0
    close: _PositiveDuration = 5.0


class Heartbeat(_Model):
    """Pings sent to quiet peers, and how long to wait for the pong."""

    interval: Duration = 30.0
    timeout: _PositiveDuration = 10.0


class NewConnections(_Model):
    """A token bucket per client address: `burst` connections at once, `rate` a second after."""

    rate: Annotated[float, BeforeValidator(parse_rate)]
    burst: Annotated[_Int, _at_least(1)]
    # Buckets kept at most; beyond, the address seen longest ago is forgotten.
    max_addresses: Annotated[_Int, _at_least(1)] = 100_000


class FrameRate(_Model):
    """A token bucket per connection: `rate` frames a second, up to `burst` at once."""

    rate: Annotated[float, BeforeValidator(parse_rate)]
    # Defaults to one second's worth of frames.
    burst: Annotated[_Int, _at_least(1)] | None = None

    @property
    def burst_size(self) -> int:
        return self.burst if self.burst is not None else max(1, math.ceil(self.rate))


class Limits(_Model):
    """Caps that protect the gateway from too many or too large inputs."""

    max_connections: Annotated[_Int, _at_least(1)] = 100_000
    # Open connections per client address; null = no cap.
    max_connections_per_ip: Annotated[_Int, _at_least(1)] | None = 1000
    new_connections_per_ip: NewConnections | None = None
    max_message_size: Size = 16 * MiB
    max_header_bytes: Annotated[Size, _size_between(KiB, MiB)] = 16 * KiB
    max_target_bytes: Annotated[Size, _size_between(KiB, MiB)] = 8 * KiB
    max_headers: Annotated[_Int, _between(1, 10_000)] = 100
    # Frames a client may send per connection; beyond it, Close 1008. Off when absent.
    max_frames_per_second: FrameRate | None = None


class FlowControl(_Model):
    """Write-buffer watermarks: above high, stop reading the other side; below low, resume."""

    high_water: Annotated[Size, AfterValidator(_positive)] = 256 * KiB
    low_water: Size = Field(default=64 * KiB, validate_default=True)

    @field_validator("low_water")
    @classmethod
    def _below_high_water(cls, low: int, info: ValidationInfo) -> int:
        high = info.data.get("high_water")  # absent when high_water itself was invalid
        if high is not None and low >= high:
            raise ValueError(
                f"must be lower than high_water ({_format_size(high)}), got {_format_size(low)}"
            )
        return low


class Shutdown(_Model):
    """How a SIGTERM drains connections."""

    drain_period: Duration = 30.0
    grace_period: Duration = Field(default=45.0, validate_default=True)

    @field_validator("grace_period")
    @classmethod
    def _not_before_drain(cls, grace: float, info: ValidationInfo) -> float:
        return _duration_not_below(grace, info, "drain_period")


class Discovery(_Model):
    """How backends given by DNS name are resolved."""

    resolve_interval: _PositiveDuration = 10.0
    # host:port of DNS servers to ask; empty means the system resolver.
    nameservers: list[_HostPort] = []


class Log(_Model):
    """Log verbosity and line format, and the access log."""

    level: Annotated[Literal["debug", "info", "warning", "error"], BeforeValidator(_lower)] = "info"
    format: Annotated[Literal["text", "json"], BeforeValidator(_lower)] = "text"
    # One JSON line per connection on standard output when it ends.
    access: bool = True


def _worker_count(value: object) -> object:
    if value == "auto":
        return os.cpu_count() or 1
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"expected a whole number or auto, got {_show(value)}")
    return value


class Config(_Model):
    """The whole configuration file."""

    listeners: list[Listener] = Field(min_length=1)
    # Worker processes sharing the listeners; "auto" = one per CPU.
    workers: Annotated[_Int, BeforeValidator(_worker_count), _between(1, 256)] = 1
    admin: _Section[Admin] = Admin()
    routes: list[Route] = Field(min_length=1)
    # Peers whose X-Forwarded-For and Forwarded headers are believed.
    trusted_proxies: list[_Network] = []
    timeouts: _Section[Timeouts] = Timeouts()
    heartbeat: _Section[Heartbeat] = Heartbeat()
    limits: _Section[Limits] = Limits()
    flow_control: _Section[FlowControl] = FlowControl()
    shutdown: _Section[Shutdown] = Shutdown()
    discovery: _Section[Discovery] = Discovery()
    log: _Section[Log] = Log()

    @field_validator("listeners")
    @classmethod
    def _unique_listeners(cls, listeners: list[Listener]) -> list[Listener]:
        binds: dict[tuple[str, int], int] = {}
        names: dict[str, int] = {}
        for i, listener in enumerate(listeners):
            address = parse_host_port(listener.bind)
            # Port 0 asks the kernel for a fresh port, so it never collides.
            if address[1] != 0 and binds.setdefault(address, i) != i:
                raise _error_at(
                    (i, "bind"),
                    f"{listener.bind} is already used by listeners[{binds[address]}]",
                )
            if names.setdefault(listener.name, i) != i:
                raise _error_at(
                    (i, "name"),
                    f"duplicate listener name {listener.name!r}"
                    f" (also listeners[{names[listener.name]}])",
                )
        return listeners

    @field_validator("routes")
    @classmethod
    def _unique_routes(cls, routes: list[Route]) -> list[Route]:
        names: dict[str, int] = {}
        matches: dict[tuple[str | None, str, str | None], int] = {}
        for i, route in enumerate(routes):
            if names.setdefault(route.name, i) != i:
                raise _error_at(
                    (i, "name"),
                    f"duplicate route name {route.name!r} (also routes[{names[route.name]}])",
                )
            match = route.match
            key = (match.host, match.path_prefix, match.path_prefix_raw)
            if matches.setdefault(key, i) != i:
                first = routes[matches[key]].name
                raise _error_at(
                    (i, "match"),
                    f"same host and {'path_prefix_raw' if match.path_prefix_raw else 'path_prefix'}"
                    f" as route {first!r}, so this route would never be used",
                )
        return routes

    @model_validator(mode="after")
    def _admin_port_free(self) -> Config:
        address = parse_host_port(self.admin.bind)
        if self.admin.enabled and address[1] != 0:
            for listener in self.listeners:
                if parse_host_port(listener.bind) == address:
                    raise _error_at(
                        ("admin", "bind"),
                        f"{self.admin.bind} is already used by listener {listener.name!r}",
                    )
        return self


# --------------------------------------------------------------------------
# Reloading
# --------------------------------------------------------------------------


def keep_restart_settings(running: Config, new: Config, *, supervised: bool) -> tuple[Config, list[str]]:
    """`new`, with each setting that a running process cannot change put back to its value
    in `running`, and the key paths of those that differed (empty when none did).

    The worker count and the admin server are set up once, at start-up. Under a
    supervisor (`supervised`) the listeners' names and addresses are the supervisor's
    sockets, so they stay too, while a listener's other settings (TLS) still change.
    """
    kept: list[str] = []
    update: dict[str, Any] = {}
    if supervised and _addresses(new.listeners) != _addresses(running.listeners):
        kept.append("listeners")
        by_name = {listener.name: listener for listener in new.listeners}
        update["listeners"] = [
            by_name[listener.name].model_copy(update={"bind": listener.bind})
            if listener.name in by_name
            else listener
            for listener in running.listeners
        ]
    if new.workers != running.workers:
        kept.append("workers")
        update["workers"] = running.workers
    admin: dict[str, Any] = {}
    if new.admin.enabled != running.admin.enabled:
        admin["enabled"] = running.admin.enabled
    # An admin server that is off, before and after, listens nowhere: its address does not matter.
    if new.admin.bind != running.admin.bind and (new.admin.enabled or running.admin.enabled):
        admin["bind"] = running.admin.bind
    # The token is read once, when the admin server starts.
    for key in ("token_file", "token_env"):
        if getattr(new.admin, key) != getattr(running.admin, key):
            admin[key] = getattr(running.admin, key)
    if admin:
        kept += [f"admin.{key}" for key in admin]
        update["admin"] = new.admin.model_copy(update=admin)
    return (new.model_copy(update=update) if update else new), kept


def _addresses(listeners: list[Listener]) -> dict[str, str]:
    return {listener.name: listener.bind for listener in listeners}


# --------------------------------------------------------------------------
# Loading and error reporting
# --------------------------------------------------------------------------


class _Loader(yaml.SafeLoader):
    """safe_load, except that a repeated key is an error instead of a silent overwrite."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:  # an unhashable key; the base class reports it
                continue
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
        return super().construct_mapping(node, deep=deep)


class _WholeReference(str):
    """An unquoted scalar that is one ``${...}`` and nothing else; its value is typed once substituted."""


_WHOLE_REFERENCE_TAG = "tag:wsgate,2026:whole-reference"
# Implicit resolvers see plain scalars only: a quoted "${PORT}" stays a string.
_Loader.add_implicit_resolver(_WHOLE_REFERENCE_TAG, re.compile(r"\$\{[^}]*\}\Z"), ["$"])
_Loader.add_constructor(
    _WHOLE_REFERENCE_TAG, lambda loader, node: _WholeReference(loader.construct_scalar(node))
)

# $$, ${NAME} or ${NAME:-default}, where a default's own "$" is written "$$" too;
# the last alternative is a "${" that starts no reference.
_REFERENCE = re.compile(
    r"\$\$|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?::-(?P<default>(?:[^$}]|\$\$)*))?\}|\$\{"
)
# What substitution may turn a whole unquoted reference into: YAML's plain scalar types.
_TYPED_TAGS = {f"tag:yaml.org,2002:{kind}" for kind in ("int", "float", "bool", "null")}


def _typed(text: str) -> Any:
    """`text` as YAML reads it unquoted, when that is a number, a boolean or null; else the string."""
    loader = _Loader("")
    try:
        tag = loader.resolve(yaml.ScalarNode, text, (True, False))
        if tag not in _TYPED_TAGS:
            return text
        return loader.construct_object(yaml.ScalarNode(tag, text))
    finally:
        loader.dispose()


def _substitute_string(value: str, path: str, environ: Mapping[str, str]) -> Any:
    def replace(reference: re.Match[str]) -> str:
        if reference.group() == "$$":
            return "$"
        name, default = reference.group("name"), reference.group("default")
        if name is None:
            raise ConfigError(path, "expected ${NAME} or ${NAME:-default} after '${'; write $$ for a '$'")
        if environ.get(name):
            return environ[name]
        if default is not None:
            return default.replace("$$", "$")
        if name in environ:
            return ""
        raise ConfigError(path, f"environment variable {name} is not set, and ${{{name}}} has no default")

    text = _REFERENCE.sub(replace, value)
    return _typed(text) if isinstance(value, _WholeReference) else text


def substitute_environment(data: Any, environ: Mapping[str, str]) -> Any:
    """`data` with ``${NAME}`` and ``${NAME:-default}`` in every string value replaced from `environ`.

    ``$$`` is one ``$``; a ``$`` before anything else stays as it is. The default
    applies when the variable is unset or empty; an unset variable without one is a
    ``ConfigError`` at the value's key path. Keys are left alone, and a value never
    becomes a list or a mapping, but a whole unquoted reference is typed as YAML
    types a plain value (``workers: ${WORKERS:-2}`` is a number).
    """

    def walk(value: Any, path: str) -> Any:
        if isinstance(value, dict):
            return {
                str(key) if isinstance(key, str) else key: walk(item, f"{path}.{key}" if path else str(key))
                for key, item in value.items()
            }
        if isinstance(value, list):
            return [walk(item, f"{path}[{i}]") for i, item in enumerate(value)]
        if isinstance(value, str):
            return _substitute_string(value, path, environ)
        return value

    return walk(data, "")


def dump_config_data(data: Any) -> str:
    """YAML text that ``load_config_data`` reads back as `data`: each ``$`` is written as ``$$``."""

    def escape(value: Any) -> Any:
        if isinstance(value, dict):
            return {key: escape(item) for key, item in value.items()}
        if isinstance(value, list):
            return [escape(item) for item in value]
        if isinstance(value, str):
            return value.replace("$", "$$")
        return value

    return yaml.safe_dump(escape(data))


def _yaml_message(exc: yaml.YAMLError) -> str:
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        message = f"invalid YAML at line {mark.line + 1}, column {mark.column + 1}: {exc.problem}"
        if exc.context and exc.context_mark is not None:
            ctx = exc.context_mark
            message += f" ({exc.context} at line {ctx.line + 1}, column {ctx.column + 1})"
        return message
    return f"invalid YAML: {exc}"


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read, parse and validate a config file; any failure is a ``ConfigError``."""
    return parse_config(load_config_data(path), os.fspath(path))


def load_config_data(path: str | os.PathLike[str]) -> Any:
    """A config file's YAML as plain data, environment substituted, not yet validated.

    A failure is a ``ConfigError``.
    """
    file = os.fspath(path)
    try:
        with open(file, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        reason = f"[Errno {exc.errno}] {exc.strerror}" if exc.strerror else str(exc)
        raise ConfigError("", f"cannot read config file: {reason}", file) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            "", f"cannot read config file: not UTF-8 text (byte {exc.start})", file
        ) from None
    try:
        data = yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader
    except yaml.YAMLError as exc:
        raise ConfigError("", _yaml_message(exc), file) from None
    # After parsing, not before: a variable's value can then never add YAML structure.
    try:
        return substitute_environment(data, os.environ)
    except ConfigError as exc:
        exc.file = file
        raise


def read_admin_token(admin: Admin) -> str | None:
    """The bearer token `admin.token_file` or `admin.token_env` names, or None when neither is set.

    Surrounding whitespace (a file's final newline) is not part of the token. A
    source that cannot be read, or holds no token, is a ``ConfigError``.
    """
    if admin.token_file is not None:
        path, where = "admin.token_file", admin.token_file
        try:
            with open(admin.token_file, encoding="utf-8") as f:
                token = f.read().strip()
        except OSError as exc:
            reason = f"[Errno {exc.errno}] {exc.strerror}" if exc.strerror else str(exc)
            raise ConfigError(path, f"cannot read token file {where}: {reason}") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(path, f"token file {where} is not UTF-8 text (byte {exc.start})") from None
    elif admin.token_env is not None:
        path, where = "admin.token_env", admin.token_env
        token = os.environ.get(admin.token_env, "").strip()
        if admin.token_env not in os.environ:
            raise ConfigError(path, f"environment variable {where} is not set")
    else:
        return None
    if not token:
        raise ConfigError(path, f"{where} holds an empty token")
    # What goes after "Bearer " in a header: visible ASCII, no spaces.
    if not all("!" <= c <= "~" for c in token):
        raise ConfigError(path, f"the token in {where} must be visible ASCII characters, without spaces")
    return token


def parse_config(data: Any, file: str | None = None) -> Config:
    """Validate an already-parsed mapping; errors name the key path, e.g. routes[0].name."""
    if not isinstance(data, dict):
        raise ConfigError("", "the top level must be a mapping", file)
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        problems = _problems(exc)
    (path, message), rest = problems[0], problems[1:]
    lines = [message]
    lines += [f"  {p}: {m}" if p else f"  {m}" for p, m in rest[:_MAX_LISTED_PROBLEMS]]
    if len(rest) > _MAX_LISTED_PROBLEMS:
        lines.append(f"  ... and {len(rest) - _MAX_LISTED_PROBLEMS} more problems")
    raise ConfigError(path, "\n".join(lines), file) from None


def _problems(exc: ValidationError) -> list[tuple[str, str]]:
    """Each pydantic error as (key path, human sentence), in document order."""
    problems = []
    for error in exc.errors(include_url=False):
        loc = tuple(error["loc"]) + tuple(error.get("ctx", {}).get("wsgate_loc", ()))
        about_key = error["type"] in ("extra_forbidden", "invalid_key")
        if error["type"] == "extra_forbidden":
            message = _unknown_key_message(loc)
        elif error["type"] == "invalid_key":
            message = f"keys must be strings, got {_show(loc[-1])}"
        else:
            message = _describe(error)
        problems.append((_format_loc(loc, key_last=about_key), message))
    return problems


# pydantic puts these in locations for some validators and unions; they are not YAML keys.
_INTERNAL_LOC = re.compile(r"function-(before|after|wrap|plain)\[.*\]|.*\[.*\]")


def _format_loc(loc: tuple[Any, ...], key_last: bool = False) -> str:
    out = ""
    for i, part in enumerate(loc):
        is_key = key_last and i == len(loc) - 1
        if isinstance(part, int) and not is_key:
            out += f"[{part}]"
        elif isinstance(part, str) and _INTERNAL_LOC.fullmatch(part) and not is_key:
            continue
        else:
            out += f".{part}" if out else str(part)
    return out


def _unwrap(annotation: Any) -> Any:
    """Strip Annotated[...] and Optional[...] down to the type inside."""
    while True:
        origin = typing.get_origin(annotation)
        if origin is Annotated:
            annotation = typing.get_args(annotation)[0]
        elif origin in (Union, types.UnionType):
            args = [a for a in typing.get_args(annotation) if a is not type(None)]
            if len(args) != 1:
                return annotation
            annotation = args[0]
        else:
            return annotation


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The model class that validates the mapping at `loc`, found by walking the schema."""
    current: Any = Config
    for part in loc:
        current = _unwrap(current)
        if isinstance(part, int) and typing.get_origin(current) is list:
            current = typing.get_args(current)[0]
        elif (
            isinstance(part, str)
            and isinstance(current, type)
            and issubclass(current, BaseModel)
            and part in current.model_fields
        ):
            current = current.model_fields[part].annotation
        else:
            return None
    current = _unwrap(current)
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _unknown_key_message(loc: tuple[Any, ...]) -> str:
    model = _model_at(loc[:-1])
    if model is None:
        return "unknown key"
    fields = list(model.model_fields)
    message = f"unknown key; expected one of: {', '.join(fields)}"
    close = difflib.get_close_matches(str(loc[-1]), fields, n=1)
    if close:
        message += f" (did you mean {close[0]!r}?)"
    return message


_INT_ERRORS = {"int_type", "int_parsing", "int_from_float"}
_BOOL_ERRORS = {"bool_type", "bool_parsing"}
_MAPPING_ERRORS = {"model_type", "model_attributes_type", "dict_type"}


def _describe(error: Any) -> str:
    """A sentence for one pydantic error; pydantic's own wording as a fallback."""
    kind = error["type"]
    value = error.get("input")
    if kind == "wsgate":
        return error["msg"]
    if kind == "missing":
        return "missing required key"
    if kind in _MAPPING_ERRORS:
        return f"expected a mapping of keys to values, got {_show(value)}"
    if kind == "list_type":
        return f"expected a list, got {_show(value)}"
    if kind == "too_short":
        return "must have at least one entry"
    if kind == "string_type":
        return f"expected a string, got {_show(value)}"
    if kind in _BOOL_ERRORS:
        return f"expected true or false, got {_show(value)}"
    if kind in _INT_ERRORS:
        return f"expected a whole number, got {_show(value)}"
    if kind == "literal_error":
        return f"expected {error['ctx']['expected']}, got {_show(value)}"
    message: str = error["msg"]
    for prefix in ("Value error, ", "Assertion failed, "):
        message = message.removeprefix(prefix)
    return message
