"""The schema: one frozen pydantic model per section of the YAML file.

Field names are the YAML keys. Values are checked by the validators beside
this module, and each model checks what spans its fields (a unique name, a
pair that goes together).
"""

from __future__ import annotations

import math
import re
import typing
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from ..handshake import ROUTE_CANNOT_EDIT_REQUEST, ROUTE_CANNOT_EDIT_RESPONSE
from .units import KiB, MiB, format_size, parse_host_port, parse_rate
from .validators import (
    Duration, HostPort, Network, NonEmpty, PositiveDuration, Size, WholeNumber, at_least, between,
    check_backend_url, check_dns_target, check_field_value, check_hash_key, check_header_name,
    check_header_spelling, check_match_host, check_origin, check_path_prefix, check_replacement,
    check_token, check_upstream_host, compile_regex, duration_not_below, error_at, installed_parser,
    lowercase, none_as_empty, positive, size_between, tls_version, value_match, worker_count,
)

class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


_M = typing.TypeVar("_M", bound=BaseModel)
# A section whose keys all have defaults; an empty (null) section means all defaults.
_Section = Annotated[_M, BeforeValidator(none_as_empty)]


class SniCertificate(_Model):
    """A certificate served to clients that ask for one of `names` by SNI."""

    names: list[Annotated[str, AfterValidator(check_match_host)]] = Field(min_length=1)
    cert: NonEmpty
    key: NonEmpty


class Tls(_Model):
    """TLS termination for a listener; files are loaded (and checked) when it starts."""

    cert: NonEmpty
    key: NonEmpty
    sni: list[SniCertificate] = []
    min_version: Annotated[Literal["1.2", "1.3"], BeforeValidator(tls_version)] = "1.2"
    client_ca: NonEmpty | None = None
    client_auth: Literal["required", "optional"] = "required"
    forward_client_cert: bool = False
    watch_interval: Duration = 0.0


class BackendTls(_Model):
    """TLS toward a backend: how its certificate is checked, and ours if it asks."""

    ca: NonEmpty | None = None
    server_name: Annotated[str, AfterValidator(check_upstream_host)] | None = None
    verify: bool = True
    cert: NonEmpty | None = None
    key: NonEmpty | None = None

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

    name: NonEmpty
    bind: HostPort
    tls: Tls | None = None
    # A PROXY protocol header is required first, before TLS and HTTP, from L4 balancers.
    proxy_protocol: Literal["v1", "v2", "any"] | None = None
    # The peers allowed to send that header (the balancers); None: any peer.
    proxy_protocol_from: list[Network] | None = Field(default=None, min_length=1)
    # Offer HTTP/2 by ALPN as well as HTTP/1.1, for WebSockets over HTTP/2 (RFC 8441); TLS only.
    http2: bool = False
    # SETTINGS_MAX_CONCURRENT_STREAMS: the streams one HTTP/2 connection may have open at once.
    http2_max_streams: Annotated[WholeNumber, between(1, 10_000)] = 100

    @model_validator(mode="after")
    def _http2_needs_tls(self) -> Listener:
        if self.http2 and self.tls is None:
            raise error_at(("http2",), "HTTP/2 is negotiated by TLS ALPN: this listener needs tls")
        return self

    @model_validator(mode="after")
    def _proxy_protocol_from_needs_proxy_protocol(self) -> Listener:
        if self.proxy_protocol_from is not None and self.proxy_protocol is None:
            raise error_at(
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
    bind: HostPort = "127.0.0.1:9090"
    # /readyz also says 503 while some route has no healthy backend.
    ready_requires_backends: bool = False
    # Where the bearer token that POST /reload needs comes from: a file, or an environment
    # variable by name. Without either, only loopback peers may POST.
    token_file: NonEmpty | None = None
    token_env: NonEmpty | None = None

    @model_validator(mode="after")
    def _one_token_source(self) -> Admin:
        if self.token_file is not None and self.token_env is not None:
            raise error_at(("token_env",), "give token_file or token_env, not both")
        return self


HeaderName = Annotated[str, AfterValidator(check_header_name)]
SpelledHeaderName = Annotated[str, AfterValidator(check_header_spelling)]
# An exact string, or `{regex: ...}` that must match the whole value (re.fullmatch).
ValueMatch = Annotated[str | re.Pattern[str], BeforeValidator(value_match)]
Regex = Annotated[re.Pattern[str], BeforeValidator(compile_regex)]


class Match(_Model):
    """Which handshakes a route takes: all of its conditions must hold."""

    host: Annotated[str, AfterValidator(check_match_host)] | None = None
    # Whole segments: /chat takes /chat and /chat/x, not /chatroom.
    path_prefix: Annotated[str, AfterValidator(check_path_prefix)] = "/"
    # A plain string prefix, for the rare route that wants /chatroom under /chat.
    path_prefix_raw: Annotated[str, AfterValidator(check_path_prefix)] | None = None
    # One of the subprotocols the client offers in Sec-WebSocket-Protocol (case-sensitive).
    subprotocol: Annotated[str, AfterValidator(check_token)] | None = None
    # Header name (any case) to the value one of its occurrences must have.
    headers: dict[HeaderName, ValueMatch] = {}
    # Query parameter name to the value (percent-decoded) one of its occurrences must have.
    query: dict[NonEmpty, ValueMatch] = {}

    @model_validator(mode="before")
    @classmethod
    def _header_names_once(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("headers"), dict):
            seen: dict[str, str] = {}
            for name in data["headers"]:
                if isinstance(name, str) and seen.setdefault(name.lower(), name) != name:
                    raise error_at(
                        ("headers", name), f"the same header as {seen[name.lower()]!r} (names ignore case)"
                    )
        return data

    @model_validator(mode="after")
    def _one_path_prefix(self) -> Match:
        if self.path_prefix_raw is not None and "path_prefix" in self.model_fields_set:
            raise ValueError("give path_prefix or path_prefix_raw, not both")
        return self

    @property
    def conditions(self) -> tuple[object, ...]:
        """What this match asks beyond host and path, comparable between routes."""
        def shown(value: str | re.Pattern[str]) -> object:
            return ("regex", value.pattern) if isinstance(value, re.Pattern) else value

        return (
            self.subprotocol,
            tuple(sorted((name, shown(value)) for name, value in self.headers.items())),
            tuple(sorted((name, shown(value)) for name, value in self.query.items())),
        )


class Backend(_Model):
    """One upstream WebSocket server (`url`), or every address of a DNS name (`dns`)."""

    url: Annotated[str, BeforeValidator(check_backend_url)] | None = None
    dns: Annotated[str, BeforeValidator(check_dns_target)] | None = None
    weight: Annotated[WholeNumber, between(1, 1000)] = 1
    # For wss:// URLs (optional there) and for dns entries (it makes them TLS).
    tls: BackendTls | None = None

    @model_validator(mode="after")
    def _url_or_dns(self) -> Backend:
        if (self.url is None) == (self.dns is None):
            raise ValueError("give exactly one of url (ws://host:port) or dns (name:port)")
        if self.url is not None and self.tls is not None and self.scheme == "ws":
            raise error_at(("tls",), "tls applies to wss:// backends; use a wss:// URL")
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


class HealthCheck(_Model):
    """Active probes of every backend of a route."""

    type: Literal["tcp", "http", "websocket"] = "tcp"
    path: Annotated[str, AfterValidator(check_path_prefix)] = "/"
    interval: PositiveDuration = 5.0
    timeout: PositiveDuration = 2.0
    healthy_threshold: Annotated[WholeNumber, between(1, 100)] = 2
    unhealthy_threshold: Annotated[WholeNumber, between(1, 100)] = 3


class PassiveEjection(_Model):
    """Ejecting a backend after consecutive connect or handshake failures."""

    failures: Annotated[WholeNumber, between(0, 1000)] = 3
    backoff: PositiveDuration = 5.0
    max_backoff: PositiveDuration = Field(default=300.0, validate_default=True)

    @field_validator("max_backoff")
    @classmethod
    def _not_below_backoff(cls, cap: float, info: ValidationInfo) -> float:
        return duration_not_below(cap, info, "backoff")


class Rebalance(_Model):
    """Moving connections to the backend that now owns their key, a few at a time."""

    max_fraction: Annotated[float, Field(gt=0, le=1)] = 0.05
    period: PositiveDuration = 60.0


class RouteTimeouts(_Model):
    """A route's own timeouts; those it leaves out are the global ones."""

    connect: PositiveDuration | None = None
    idle: Duration | None = None
    close: PositiveDuration | None = None

    @model_validator(mode="before")
    @classmethod
    def _no_handshake(cls, data: Any) -> Any:
        if isinstance(data, dict) and "handshake" in data:
            raise error_at(
                ("handshake",),
                "applies to the whole gateway only (set it under the top-level timeouts):"
                " the route is not known until the request head is read",
            )
        return data


class RouteHeartbeat(_Model):
    """A route's own heartbeat; what it leaves out is the global one."""

    interval: Duration | None = None
    timeout: PositiveDuration | None = None


class RouteLimits(_Model):
    """The limits a route may set for itself; the others are the gateway's."""

    max_message_size: Size | None = None


class RouteFlowControl(_Model):
    """A route's own watermarks; what it leaves out is the global one."""

    high_water: Annotated[Size, AfterValidator(positive)] | None = None
    low_water: Size | None = None


class Rewrite(_Model):
    """The path's first match of `regex` replaced by `replacement` (re.sub, `\\1` for groups)."""

    regex: Regex
    replacement: str

    @model_validator(mode="after")
    def _valid_replacement(self) -> Rewrite:
        check_replacement(self.regex, self.replacement)
        return self


class _HeaderEdits(_Model):
    """Headers a route sets (replacing any of that name) or removes."""

    # Names keep their case here, as they are sent.
    set: dict[SpelledHeaderName, Annotated[str, AfterValidator(check_field_value)]] = {}
    remove: list[HeaderName] = []

    forbidden: typing.ClassVar[frozenset[bytes]] = frozenset()
    why: typing.ClassVar[str] = ""

    @model_validator(mode="before")
    @classmethod
    def _allowed_names(cls, data: Any) -> Any:
        # Before validation, so that an error's key path spells the name as the file does.
        if not isinstance(data, dict):
            return data
        set_ = data.get("set") if isinstance(data.get("set"), dict) else {}
        remove = data.get("remove") if isinstance(data.get("remove"), list) else []
        setting: dict[str, str] = {}
        for name in set_:
            if not isinstance(name, str):
                continue
            if cls._gateway_owned(name):
                raise error_at(("set", name), f"{name} cannot be set by a route: {cls.why}")
            if setting.setdefault(name.lower(), name) != name:
                first = setting[name.lower()]
                raise error_at(("set", name), f"the same header as {first!r} (names ignore case)")
        for i, name in enumerate(remove):
            if not isinstance(name, str):
                continue
            if cls._gateway_owned(name):
                raise error_at(("remove", i), f"{name} cannot be removed by a route: {cls.why}")
            if name.lower() in setting:
                raise error_at(("remove", i), f"{name} is also under set; set already replaces it")
        return data

    @classmethod
    def _gateway_owned(cls, name: str) -> bool:
        lower = name.lower()
        return lower.startswith("proxy-") or lower.encode("latin-1", "replace") in cls.forbidden


class RequestHeaders(_HeaderEdits):
    forbidden: typing.ClassVar[frozenset[bytes]] = ROUTE_CANNOT_EDIT_REQUEST
    why: typing.ClassVar[str] = (
        "the gateway sets it (hop-by-hop, the handshake, X-Forwarded-*); see upstream_host,"
        " subprotocols and compression"
    )


class ResponseHeaders(_HeaderEdits):
    forbidden: typing.ClassVar[frozenset[bytes]] = ROUTE_CANNOT_EDIT_RESPONSE
    why: typing.ClassVar[str] = "the 101's own headers come from the handshake"


class Route(_Model):
    """A set of backends and the handshakes that go to them."""

    name: NonEmpty
    match: _Section[Match] = Match()
    backends: list[Backend] = Field(min_length=1)
    compression: Literal["passthrough", "strip"] = "passthrough"
    upstream_host: Annotated[str, AfterValidator(check_upstream_host)] | None = None
    allowed_origins: list[Annotated[str, AfterValidator(check_origin)]] | None = None
    hash_key: Annotated[str, BeforeValidator(check_hash_key)] = "ip"
    hash_fallback: Literal["ip", "random"] = "ip"
    balance_factor: Annotated[float, Field(gt=1.0, le=100.0)] | None = None
    retries: Annotated[WholeNumber, between(0, 10)] = 2
    health_check: HealthCheck | None = None
    passive_ejection: _Section[PassiveEjection] = PassiveEjection()
    rebalance: Rebalance | None = None
    # On reload, connections on a backend that left the route: closed with 1012
    # spread over shutdown.drain_period, or kept until they end.
    on_backend_removed: Literal["close", "keep"] = "close"
    # A directory whose files answer a plain GET (no Upgrade) on this route's paths;
    # without it such a request gets 426, as a WebSocket-only endpoint should answer.
    static: str | None = None
    # Overrides of the global sections, key by key.
    timeouts: RouteTimeouts | None = None
    heartbeat: RouteHeartbeat | None = None
    limits: RouteLimits | None = None
    flow_control: RouteFlowControl | None = None
    # Request shaping toward the backend, in this order: strip_prefix, rewrite, request_headers.
    strip_prefix: Annotated[str, AfterValidator(check_path_prefix)] | None = None
    rewrite: Rewrite | None = None
    request_headers: RequestHeaders | None = None
    response_headers: ResponseHeaders | None = None
    # The subprotocols offered to the backend: the client's, filtered to these.
    subprotocols: list[Annotated[str, AfterValidator(check_token)]] | None = None

    @field_validator("backends")
    @classmethod
    def _unique_backends(cls, backends: list[Backend]) -> list[Backend]:
        # ws://a, ws://a:80 and ws://a/ are one server; compare what we connect to.
        seen: dict[tuple[str, str, int], int] = {}
        for i, backend in enumerate(backends):
            kind = "url" if backend.url is not None else "dns"
            first = seen.setdefault((kind, backend.host, backend.port), i)
            if first != i:
                raise error_at(
                    (i, kind),
                    f"duplicate backend: {backend.label} is already backends[{first}]",
                )
        return backends


class Timeouts(_Model):
    """How long each phase of a connection may take."""

    handshake: PositiveDuration = 10.0
    connect: PositiveDuration = 5.0
    idle: Duration = 300.0
    close: PositiveDuration = 5.0


class Heartbeat(_Model):
    """Pings sent to quiet peers, and how long to wait for the pong."""

    interval: Duration = 30.0
    timeout: PositiveDuration = 10.0


class NewConnections(_Model):
    """A token bucket per client address: `burst` connections at once, `rate` a second after."""

    rate: Annotated[float, BeforeValidator(parse_rate)]
    burst: Annotated[WholeNumber, at_least(1)]
    # Buckets kept at most; beyond, the address seen longest ago is forgotten.
    max_addresses: Annotated[WholeNumber, at_least(1)] = 100_000


class FrameRate(_Model):
    """A token bucket per connection: `rate` frames a second, up to `burst` at once."""

    rate: Annotated[float, BeforeValidator(parse_rate)]
    # Defaults to one second's worth of frames.
    burst: Annotated[WholeNumber, at_least(1)] | None = None

    @property
    def burst_size(self) -> int:
        return self.burst if self.burst is not None else max(1, math.ceil(self.rate))


class Limits(_Model):
    """Caps that protect the gateway from too many or too large inputs."""

    max_connections: Annotated[WholeNumber, at_least(1)] = 100_000
    # Open connections per client address; null = no cap.
    max_connections_per_ip: Annotated[WholeNumber, at_least(1)] | None = 1000
    new_connections_per_ip: NewConnections | None = None
    max_message_size: Size = 16 * MiB
    max_header_bytes: Annotated[Size, size_between(KiB, MiB)] = 16 * KiB
    max_target_bytes: Annotated[Size, size_between(KiB, MiB)] = 8 * KiB
    max_headers: Annotated[WholeNumber, between(1, 10_000)] = 100
    # Frames a client may send per connection; beyond it, Close 1008. Off when absent.
    max_frames_per_second: FrameRate | None = None


class FlowControl(_Model):
    """Write-buffer watermarks: above high, stop reading the other side; below low, resume."""

    high_water: Annotated[Size, AfterValidator(positive)] = 256 * KiB
    low_water: Size = Field(default=64 * KiB, validate_default=True)

    @field_validator("low_water")
    @classmethod
    def _below_high_water(cls, low: int, info: ValidationInfo) -> int:
        high = info.data.get("high_water")  # absent when high_water itself was invalid
        if high is not None and low >= high:
            raise ValueError(
                f"must be lower than high_water ({format_size(high)}), got {format_size(low)}"
            )
        return low


class Shutdown(_Model):
    """How a SIGTERM drains connections."""

    drain_period: Duration = 30.0
    grace_period: Duration = Field(default=45.0, validate_default=True)

    @field_validator("grace_period")
    @classmethod
    def _not_before_drain(cls, grace: float, info: ValidationInfo) -> float:
        return duration_not_below(grace, info, "drain_period")


class Discovery(_Model):
    """How backends given by DNS name are resolved."""

    resolve_interval: PositiveDuration = 10.0
    # host:port of DNS servers to ask; empty means the system resolver.
    nameservers: list[HostPort] = []


class Log(_Model):
    """Log verbosity and line format, and the access log."""

    level: Annotated[Literal["debug", "info", "warning", "error"], BeforeValidator(lowercase)] = "info"
    format: Annotated[Literal["text", "json"], BeforeValidator(lowercase)] = "text"
    # One JSON line per connection on standard output when it ends.
    access: bool = True


class RouteSettings(typing.NamedTuple):
    """The global settings a route may override, with its overrides applied."""

    timeouts: Timeouts
    heartbeat: Heartbeat
    max_message_size: int
    flow_control: FlowControl


def _overridden(base: _M, override: BaseModel | None) -> _M:
    if override is None:
        return base
    changes = {key: value for key, value in override if value is not None}
    return base.model_copy(update=changes) if changes else base


class Config(_Model):
    """The whole configuration file."""

    listeners: list[Listener] = Field(min_length=1)
    # Worker processes sharing the listeners; "auto" = one per CPU.
    workers: Annotated[WholeNumber, BeforeValidator(worker_count), between(1, 256)] = 1
    # What parses the handshakes' HTTP heads: "auto" is httptools where it is installed, else h11.
    http_parser: Annotated[
        Literal["auto", "h11", "httptools"], BeforeValidator(lowercase), AfterValidator(installed_parser)
    ] = "auto"
    admin: _Section[Admin] = Admin()
    routes: list[Route] = Field(min_length=1)
    # Peers whose X-Forwarded-For and Forwarded headers are believed.
    trusted_proxies: list[Network] = []
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
                raise error_at(
                    (i, "bind"),
                    f"{listener.bind} is already used by listeners[{binds[address]}]",
                )
            if names.setdefault(listener.name, i) != i:
                raise error_at(
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
                raise error_at(
                    (i, "name"),
                    f"duplicate route name {route.name!r} (also routes[{names[route.name]}])",
                )
            match = route.match
            key = (match.host, match.path_prefix, match.path_prefix_raw)
            unconditional = key + ((None, (), ()),)
            shadowing = matches.get(unconditional, matches.get(key + (match.conditions,)))
            if shadowing is not None:
                first = routes[shadowing].name
                what = "path_prefix_raw" if match.path_prefix_raw else "path_prefix"
                raise error_at(
                    (i, "match"),
                    f"same host and {what} as route {first!r}"
                    f"{'' if shadowing == matches.get(unconditional) else ' and the same conditions'},"
                    " so this route would never be used",
                )
            matches.setdefault(key + (match.conditions,), i)
        return routes

    @model_validator(mode="after")
    def _route_watermarks(self) -> Config:
        for i, route in enumerate(self.routes):
            if route.flow_control is None:
                continue
            flow = self.route_settings(route).flow_control
            if flow.low_water >= flow.high_water:
                key = "low_water" if route.flow_control.low_water is not None else "high_water"
                raise error_at(
                    ("routes", i, "flow_control", key),
                    f"low_water ({format_size(flow.low_water)}) must be lower than high_water"
                    f" ({format_size(flow.high_water)}); a value the route leaves out is the global one",
                )
        return self

    def route_settings(self, route: Route) -> RouteSettings:
        """The settings in force on `route`: its own overrides over the global sections."""
        return RouteSettings(
            _overridden(self.timeouts, route.timeouts),
            _overridden(self.heartbeat, route.heartbeat),
            self.limits.max_message_size
            if route.limits is None or route.limits.max_message_size is None
            else route.limits.max_message_size,
            _overridden(self.flow_control, route.flow_control),
        )

    @model_validator(mode="after")
    def _admin_port_free(self) -> Config:
        address = parse_host_port(self.admin.bind)
        if self.admin.enabled and address[1] != 0:
            for listener in self.listeners:
                if parse_host_port(listener.bind) == address:
                    raise error_at(
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
