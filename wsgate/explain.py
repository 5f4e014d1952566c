"""Sans-I/O reasoning of `wsgate explain --request`: what the gateway would do with one request.

Given a config and a request line with its headers, it says which route
matches and why each earlier route does not, the request the backend would
receive after the route's shaping, the hash key, and the key's backend order
on the ring. Nothing is contacted: every backend is assumed healthy and idle,
and a `dns` backend's addresses are only known at run time.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from .config import Config, Route
from .errors import HandshakeError
from .forwarding import TrustedProxies
from .handshake import (
    UpgradeRequest, affinity_key, build_upstream_request, check_client_request, check_origin,
)
from .hashring import HashRing
from .heads import RequestHead, is_field_value
from .routing import Router, Verdict

# RFC 6455's sample key: the request given usually has none, and the backend needs one.
SAMPLE_KEY = b"dGhlIHNhbXBsZSBub25jZQ=="
_TOKEN = re.compile(rb"[-!#$%&'*+.^_`|~0-9A-Za-z]+")
_TARGET = re.compile(rb"[\x21-\x7e]+")
_ADDED = ((b"upgrade", b"Upgrade", b"websocket"), (b"connection", b"Connection", b"Upgrade"),
          (b"sec-websocket-key", b"Sec-WebSocket-Key", SAMPLE_KEY),
          (b"sec-websocket-version", b"Sec-WebSocket-Version", b"13"))


def parse_request(request_line: str, header_lines: list[str]) -> RequestHead:
    """A request head from `GET /x?room=1` and `Name: value` lines; ValueError says what is wrong.

    The upgrade headers a client must send are added when absent, so a request
    can be given with only what routing looks at.
    """
    parts = request_line.encode("latin-1", "replace").split()
    if len(parts) == 3 and parts[2].startswith(b"HTTP/"):
        version = parts.pop()[len(b"HTTP/"):]
    else:
        version = b"1.1"
    if len(parts) != 2 or not _TOKEN.fullmatch(parts[0]) or not _TARGET.fullmatch(parts[1]):
        raise ValueError(
            f"--request: expected 'METHOD TARGET [HTTP/1.1]' such as 'GET /x?room=1', got {request_line!r}"
        )
    headers: list[tuple[bytes, bytes]] = []
    for line in header_lines:
        name, colon, value = line.partition(":")
        raw_name, raw_value = name.encode("latin-1", "replace"), value.strip().encode("latin-1", "replace")
        if not colon or not _TOKEN.fullmatch(raw_name) or not is_field_value(raw_value):
            raise ValueError(f"-H: expected 'Name: value' such as 'Host: chat.example.com', got {line!r}")
        headers.append((raw_name, raw_value))
    present = {name.lower() for name, _ in headers}
    if b"host" not in present:
        raise ValueError("give the Host header, e.g. -H 'Host: chat.example.com'")
    headers += [(name, value) for lower, name, value in _ADDED if lower not in present]
    return RequestHead(parts[0], parts[1], version, headers)


@dataclass(frozen=True, slots=True)
class Explanation:
    """What the gateway would do with one request."""

    request: UpgradeRequest
    client_ip: str
    verdicts: list[Verdict[Route]]  # every route tried, in order; the last one matched, if any did
    route: Route | None
    # Set once a route matched:
    refusal: HandshakeError | None = None  # the route refuses the request (origin, rewrite)
    upstream: bytes = b""  # the request head the backend would receive
    key: bytes | None = None  # None: a random key per connection (hash_fallback: random)
    key_fell_back: bool = False
    order: tuple[str, ...] = ()  # the ring's order for the key
    tried: int = 0  # how many of `order` a connection tries (retries + 1)
    resolved_at_run_time: tuple[str, ...] = ()  # the `dns` backends, left out of `order`
    response_edits: tuple[str, ...] = ()  # what the route changes in the 101 toward the client


def explain_request(config: Config, head: RequestHead, client_ip: str) -> Explanation:
    """The gateway's decisions for `head` arriving from `client_ip` on the first listener.

    Raises `HandshakeError` when the gateway would refuse the request before routing.
    """
    client = TrustedProxies(config.trusted_proxies).resolve(client_ip, head.headers)
    request = check_client_request(head)
    router = Router(config.routes)
    verdicts = router.verdicts(request.host, request.path, request)
    route = verdicts[-1].route if verdicts and verdicts[-1].failed is None else None
    if route is None:
        return Explanation(request, client.ip, verdicts, None)
    shaping = router.shaping[route.name]
    key = affinity_key(request, route.hash_key, client.ip)
    fell_back = key is None
    if key is None and route.hash_fallback == "ip":
        key = client.ip.encode("ascii")
    identities: list[str] = []
    weights: list[int] = []
    for backend in route.backends:
        if backend.url is not None and backend.url not in identities:
            identities.append(backend.url)
            weights.append(backend.weight)
    ring = HashRing(identities, weights)
    order = () if key is None else tuple(ring.identities[i] for i in ring.order(key))
    found = Explanation(
        request, client.ip, verdicts, route, key=key, key_fell_back=fell_back,
        order=order, tried=min(len(order), route.retries + 1),
        resolved_at_run_time=tuple(backend.dns for backend in route.backends if backend.dns is not None),
    )
    try:
        check_origin(request, route.allowed_origins)
        upstream, _ = build_upstream_request(
            request,
            client_ip=client.ip,
            forwarded_for=client.forwarded_for,
            scheme="https" if config.listeners[0].tls is not None else "http",
            host=route.upstream_host,
            strip_extensions=route.compression == "strip",
            target=shaping.target(request.target) if shaping.changes_target else None,
            route_drop=shaping.request_drop,
            route_set=shaping.request_set,
            protocols=shaping.offered(request.protocols),
        )
    except HandshakeError as exc:
        return replace(found, refusal=exc)
    return replace(found, upstream=upstream, response_edits=_response_edits(route))


def _response_edits(route: Route) -> tuple[str, ...]:
    edits = route.response_headers
    if edits is None:
        return ()
    return (
        *(f"{name}: {value}" for name, value in edits.set.items()),
        *(f"{name} removed" for name in edits.remove),
    )


def render_explanation(explanation: Explanation) -> str:
    """The explanation as the lines `wsgate explain --request` prints."""
    request = explanation.request
    target = request.target.decode("latin-1")
    lines = [f"request: GET {target} (host {request.host}, client {explanation.client_ip})"]
    lines.append("routes, in order (the first that matches wins):")
    for verdict in explanation.verdicts:
        outcome = "matched" if verdict.failed is None else f"no: {verdict.failed}"
        lines.append(f"  {verdict.route.name}: {outcome}")
    route = explanation.route
    if route is None:
        lines.append("no route matched: the gateway answers 404")
        return "\n".join(lines) + "\n"
    if explanation.refusal is not None:
        refusal = explanation.refusal
        lines.append(f"route {route.name} refuses it: the gateway answers {refusal.status}: {refusal.reason}")
    else:
        lines.append(f"the backend receives (after route {route.name}'s shaping and the gateway's headers):")
        head = explanation.upstream.rstrip(b"\r\n").split(b"\r\n")
        lines += ["  " + line.decode("latin-1") for line in head]
        if explanation.response_edits:
            lines.append("the 101 toward the client also gets: " + "; ".join(explanation.response_edits))
    if explanation.key is None:
        lines.append(f"hash key: {route.hash_key} absent; hash_fallback random: a random key per connection")
        return "\n".join(lines) + "\n"
    fallback = f" ({route.hash_key} is absent: the client address)" if explanation.key_fell_back else ""
    lines.append(f"hash key: {route.hash_key} = {explanation.key.decode('utf-8', 'replace')!r}{fallback}")
    lines.append("backend order on the ring (all assumed healthy and idle):")
    for rank, identity in enumerate(explanation.order, start=1):
        role = "chosen" if rank == 1 else "fallback" if rank <= explanation.tried else "not tried (retries)"
        lines.append(f"  {rank}. {identity}  {role}")
    for target in explanation.resolved_at_run_time:
        lines.append(f"  dns {target}: resolved at run time (its addresses join the ring and may come first)")
    return "\n".join(lines) + "\n"
