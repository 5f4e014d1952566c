"""The upgrade phase of each connection: parse, route, connect, check the 101, hand off.

Each accepted socket starts with an `UpgradeProtocol` that reads the request
head, then a task picks a backend, connects with a `BackendHandshake` protocol
(upstream.py) and, on a valid 101, passes both transports to a `Relay` by
`set_protocol`. Bytes that arrive on either side before the hand-off are kept
and relayed first. Everything shared with the gateway goes through its
`Books` (books.py); from the hand-off on, the relay reports to the books, and
this protocol is let go.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import replace
from functools import partial
from typing import cast

import h11

from .balancer import Pool, random_key
from .books import Books, Refusal
from .closing import Cause, gateway_close
from .config import Listener, format_host_port
from .errors import BackendUnavailable, HandshakeError, ProxyHeaderError
from .handshake import (
    Offer,
    affinity_key,
    build_upstream_request,
    check_backend_response,
    check_client_request,
    check_origin,
    plain_get,
    render_backend_reply,
    render_error,
    render_rejection,
    render_switching_protocols,
)
from .http2 import PROTOCOL as HTTP2, Http2Session
from .heads import HeadReader, RequestHead, ResponseHead, parse_request_head
from .member import Member
from .pages import below_prefix, static_reply
from .proxy_protocol import NEED_MORE, parse_proxy_header
from .relay import Relay
from .routing import Shaping
from .tls import ListenerTls, peer_subject
from .upstream import BackendHandshake

# Named as before the module was: log filters and dashboards select its lines by this name.
log = logging.getLogger("wsgate.server")

# Bounded `reason` labels for handshake rejections, by HTTP status.
_REJECTION_REASONS = {
    400: "bad_request",
    403: "origin",
    404: "no_route",
    405: "method",
    408: "timeout",
    414: "target_too_long",
    426: "upgrade_required",
    429: "rate_limit",  # the cap of open connections per address passes "ip_limit" itself
    431: "headers_too_large",
    500: "rewrite",  # a route's rewrite made a path that may not be sent
    503: "limit",
}

# How long a refused client may go on sending before the gateway closes on it.
LINGER_SECONDS = 2.0


class UpgradeProtocol(asyncio.Protocol):
    """A client connection until its upgrade is relayed or refused."""

    # Thousands can be in their handshake at once (a burst of reconnects): slots keep it small.
    __slots__ = (
        "loop",
        "books",
        "listener",
        "transport",
        "client_ip",
        "conn_id",
        "early",
        "task",
        "timer",
        "admitted",
        "counted_ip",
        "lost",
        "tls_task",
        "client_address",
        "route_name",
        "backend_tried",
        "key",
        "accepted_at",
        "client_cert",
        "tls_early",
        "head",
        "lingering",
        "proxy_buffer",
        "turn_data",
        "overdue",
        "alpn_pending",
    )

    # What the client speaks, for metrics and the access log; an HTTP/2 stream's is "h2".
    protocol = "http/1.1"
    # False where the connection this protocol runs on did TLS already (an HTTP/2 stream).
    starts_tls = True

    def __init__(self, books: Books, listener: Listener) -> None:
        self.books = books
        self.listener = listener
        self.transport: asyncio.Transport
        self.client_ip = ""
        self.conn_id = books.next_id()
        limits = books.config.limits
        self.early = bytearray()
        self.task: asyncio.Task[None] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.admitted = False
        # The address the limits per address counted it under. None until the request head
        # names the client when the peer is a trusted proxy; a peer that is not is counted
        # (or refused) at accept.
        self.counted_ip: str | None = None
        self.lost = False
        self.tls_task: asyncio.Task[None] | None = None
        # For metrics and the access log.
        self.client_address = "unknown"
        self.route_name = ""
        self.backend_tried = ""
        self.key = b""
        self.accepted_at = 0.0
        self.client_cert: str | None = None  # the verified client certificate's subject
        # Raw bytes (the ClientHello) read before start_tls takes the transport over.
        self.tls_early: bytearray | None = None
        # The parser gets the head only once it is complete and within the limits.
        self.head = HeadReader(limits.max_header_bytes, limits.max_headers, limits.max_target_bytes)
        self.lingering = False  # answered; what the client still sends is read and dropped
        # The PROXY protocol header received so far, while one is awaited.
        self.proxy_buffer: bytearray | None = None
        # Bytes of the head read while the handshakes had no step left (see wsgate/turns.py):
        # reading waits until their turn, and the handshake timeout waits for it too.
        self.turn_data: bytes | None = None
        self.overdue = False
        # Decrypted bytes read while the TLS handshake finishes, on a listener that offers h2:
        # which protocol reads them is known only once start_tls has returned.
        self.alpn_pending: bytearray | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        # Asked once: each get_running_loop() checks the process id with a system call.
        self.loop = asyncio.get_running_loop()
        # TCP_NODELAY needs no call here: uvloop and asyncio set it on every TCP transport.
        # Durations use perf_counter: uvloop's loop clock has only millisecond steps.
        self.accepted_at = time.perf_counter()
        peer = transport.get_extra_info("peername")
        self.client_ip = peer[0] if peer else "unknown"
        self.client_address = format_host_port(peer[0], peer[1]) if peer else "unknown"
        if not self._admit():
            return
        if self.listener.proxy_protocol is not None:
            self._expect_proxy_header()
            return
        self._address_known()

    def _admit(self) -> bool:
        """Count the connection against the gateway-wide cap from its accept, or refuse it."""
        books = self.books
        refusal = books.admit()
        if refusal is not None:
            self._refuse_at_accept(refusal, self.listener.name in books.tls)
            return False
        self.admitted = True
        books.handshakes.add(self)
        return True

    def _address_known(self) -> bool:
        """Admit the connection from `client_ip`, then start TLS or wait for the request."""
        books = self.books
        tls = books.tls.get(self.listener.name) if self.starts_tls else None
        if not books.trusted_proxies.includes(self.client_ip):
            refusal = books.admit_address(self.client_ip)
            if refusal is not None:
                self._refuse_at_accept(refusal, tls is not None)
                return False
            self.counted_ip = self.client_ip
        if tls is None:
            self._start_request_timer()
            return True
        # The ClientHello should wait in the kernel until start_tls takes over reading, but
        # uvloop starts reading right after connection_made whatever it did, so bytes that
        # still arrive first are kept in tls_early and handed to the TLS layer.
        self.tls_early = bytearray()
        self.transport.pause_reading()
        self.tls_task = self.loop.create_task(self._start_tls(tls))
        return True

    def _expect_proxy_header(self) -> None:
        allowed = self.books.proxy_senders.get(self.listener.name)
        if allowed is not None and not allowed.includes(self.client_ip):
            self._drop_proxy("untrusted", "the peer is not in proxy_protocol_from")
            return
        self.proxy_buffer = bytearray()
        self.timer = self.loop.call_later(
            self.books.config.timeouts.handshake, self._on_proxy_timeout
        )

    def _on_proxy_data(self, data: bytes) -> None:
        buffer, versions = self.proxy_buffer, self.listener.proxy_protocol
        assert buffer is not None and versions is not None
        buffer += data
        try:
            header = parse_proxy_header(buffer, versions)
        except ProxyHeaderError as exc:
            self._drop_proxy(exc.reason, exc.detail)
            return
        if header is NEED_MORE:
            return
        self.proxy_buffer = None
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if header.source is not None:
            self.client_ip, port = header.source
            self.client_address = format_host_port(self.client_ip, port)
        if self._address_known() and len(buffer) > header.size:
            # The connection's own first bytes (a ClientHello, a request) came with the header.
            self.data_received(bytes(buffer[header.size :]))

    def _on_proxy_timeout(self) -> None:
        self.timer = None
        timeout = self.books.config.timeouts.handshake
        self._drop_proxy("timeout", f"no complete PROXY protocol header within {timeout:g}s")

    def _drop_proxy(self, reason: str, detail: str) -> None:
        """Close over the PROXY protocol header, unanswered: the peer is a balancer, not a client."""
        log.info(
            "conn=%d %s PROXY protocol header refused (%s): %s",
            self.conn_id, self.client_address, reason, detail,
        )
        metrics = self.books.metrics
        metrics.proxy_protocol_errors.inc(self.listener.name, reason)
        self.proxy_buffer = None
        self.lingering = True  # drop whatever still arrives before the close takes effect
        self.transport.close()

    async def _start_tls(self, tls: ListenerTls) -> None:
        loop = self.loop
        early, self.tls_early = self.tls_early, None
        if early:
            # start_tls installs its protocol before it first waits; this runs after that.
            loop.call_soon(_feed_protocol, self.transport, bytes(early))
        if self.listener.http2:
            self.alpn_pending = bytearray()
        try:
            self.transport = await loop.start_tls(
                self.transport,
                self,
                tls.context,
                server_side=True,
                ssl_handshake_timeout=self.books.config.timeouts.handshake,
            )
        except (OSError, TimeoutError, EOFError) as exc:
            # Routine on a public port (scanners, plain HTTP, bad clients): count, don't shout.
            self.books.tls_handshake_failures += 1
            metrics = self.books.metrics
            metrics.tls_handshake_failures.inc(self.listener.name)
            log.debug("conn=%d %s TLS handshake failed: %r", self.conn_id, self.client_ip, exc)
            self.transport.close()
            self._finish()
            return
        pending, self.alpn_pending = self.alpn_pending, None
        ssl_object = self.transport.get_extra_info("ssl_object")
        if pending is not None and ssl_object.selected_alpn_protocol() == "h2":
            self._serve_http2(bytes(pending))
            return
        self._start_request_timer()
        if pending:
            self.data_received(bytes(pending))

    def _serve_http2(self, early: bytes) -> None:
        """Hand the connection to an HTTP/2 session, which keeps its admission until it ends."""
        self.books.handshakes.discard(self)
        self.admitted = False
        session = Http2Session(
            self.books, self.listener, self.transport, self.client_ip, self.client_address, self.counted_ip,
            partial(StreamUpgrade, self.books, self.listener),
        )
        session.start(early)

    def _refuse_at_accept(self, refusal: Refusal, tls: bool) -> None:
        """Answer a connection the limits turn away, spending nothing more on it."""
        error = refusal.error
        level = logging.WARNING if refusal.label == "limit" else logging.INFO
        log.log(level, "conn=%d refused %s: %s", self.conn_id, self.client_ip, error.reason)
        metrics = self.books.metrics
        metrics.handshake_rejections.inc(refusal.label)
        self._account(error.status, "rejected", error.reason)
        if tls:
            self.transport.close()  # no HTTP can be spoken before TLS; spend no handshake on it
        else:
            self._reply(render_rejection(error), linger=False)

    def _start_request_timer(self) -> None:
        self.timer = self.loop.call_later(
            self.books.config.timeouts.handshake, self._on_handshake_timeout
        )

    def data_received(self, data: bytes) -> None:
        if self.lingering:
            return
        if self.proxy_buffer is not None:
            self._on_proxy_data(data)
            return
        if self.tls_early is not None:
            # TLS bytes that beat start_tls (uvloop); keep them for the TLS layer.
            self.tls_early += data
            self.transport.pause_reading()
            return
        if self.alpn_pending is not None:
            self.alpn_pending += data
            return
        if self.task is not None:
            # The request is parsed; what follows is the client's first frames.
            self.early += data
            if len(self.early) > self.books.config.flow_control.high_water:
                self.transport.pause_reading()
            return
        if self.turn_data is not None:
            self.turn_data += data  # decrypted in the same read as the bytes waiting
            return
        if not self.books.handshake_turns.take():
            self.turn_data = data
            self.transport.pause_reading()
            self.books.handshake_turns.later(self._on_turn)
            return
        self._receive_head(data)

    def _on_turn(self) -> None:
        data, self.turn_data = self.turn_data, None
        if self.lost or data is None:
            return
        self.transport.resume_reading()
        self._receive_head(data)
        if self.overdue and self.task is None and not self.lingering:
            self._on_handshake_timeout()

    def _receive_head(self, data: bytes) -> None:
        try:
            head = self.head.receive_data(data)
        except HandshakeError as exc:
            self._reject(exc)
            return
        if head is not None:
            self._next_request_event(head)

    def eof_received(self) -> bool:
        if self.proxy_buffer:
            received = len(self.proxy_buffer)
            self._drop_proxy("truncated", f"the connection ended {received} bytes into the header")
            return False
        if self.task is None:
            self.transport.close()
        else:
            self.task.cancel()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.timer is not None:
            self.timer.cancel()
        if self.task is not None and not self.task.done():
            self.task.cancel()
        self._finish()

    def _finish(self) -> None:
        self.books.handshakes.discard(self)
        if self.admitted:
            self.admitted = False
            self.books.release(self.counted_ip)
            self.counted_ip = None

    def _next_request_event(self, head: bytes) -> None:
        """Parse a complete request head (with what followed it) and start its upgrade."""
        try:
            request, after = parse_request_head(head, self.books.config.http_parser)
        except HandshakeError as exc:
            self._reject(exc)
            return
        if self.timer is not None:
            self.timer.cancel()
        self.early[:0] = after
        request_at = time.perf_counter()
        self.task = self.loop.create_task(self._proxy(request, request_at))

    def _on_handshake_timeout(self) -> None:
        if self.turn_data is not None:
            self.overdue = True  # the client sent in time; the gateway has yet to read it
            return
        if self.task is None:
            log.info("conn=%d %s sent no complete request in time", self.conn_id, self.client_ip)
            metrics = self.books.metrics
            metrics.handshake_rejections.inc("timeout")
            self._account(408, "rejected", "request timeout")
            self._reply(render_error(408, "request timeout"))

    def _reply(self, data: bytes, linger: bool = True) -> None:
        self.transport.write(data)
        if not linger or not self.transport.can_write_eof():
            self.transport.close()
            return
        # Closing with unread bytes in the kernel sends a reset, which can destroy the answer
        # before the client reads it (a client still writing an oversized head, say). So
        # half-close, drop what still arrives, and close at the client's EOF or after a while.
        self.transport.write_eof()
        self.lingering = True
        if self.timer is not None:
            self.timer.cancel()
        self.timer = self.loop.call_later(LINGER_SECONDS, self.transport.close)

    def _reject(self, error: HandshakeError, label: str | None = None) -> None:
        log.info("conn=%d %s rejected: %d %s", self.conn_id, self.client_ip, error.status, error.reason)
        label = label or _REJECTION_REASONS.get(error.status, "other")
        metrics = self.books.metrics
        metrics.handshake_rejections.inc(label)
        self._account(error.status, "rejected", error.reason)
        self._reply(render_rejection(error))

    def _account(self, status: int, outcome: str, reason: str, backend: str = "") -> None:
        """Count a handshake that ended without a relay, and log its access line."""
        route = self.route_name
        metrics = self.books.metrics
        metrics.connections.inc(route, outcome, self.protocol)
        duration = time.perf_counter() - self.accepted_at
        self.books.log_access(
            self.client_address, route, backend, self.key, status, duration, reason, self.client_cert,
            protocol=self.protocol,
        )

    def _name_client(self, request: RequestHead) -> list[str]:
        """Take the client's address from a trusted proxy's headers; the X-Forwarded-For to send on."""
        client = self.books.trusted_proxies.resolve(self.client_ip, request.headers)
        if client.ip != self.client_ip:
            self.client_ip = self.client_address = client.ip
        return client.forwarded_for

    async def _proxy(self, request: RequestHead, request_at: float) -> None:
        try:
            forwarded_for = [self.client_ip]
            if self.counted_ip is None:
                # A trusted proxy's client: before anything else, as other peers are limited at accept.
                forwarded_for = self._name_client(request)
                refusal = self.books.admit_address(self.client_ip)
                if refusal is not None:
                    self._reject(refusal.error, refusal.label)
                    return
                self.counted_ip = self.client_ip
            handshake = check_client_request(request)
            pool = self.books.pool_for(handshake.host, handshake.path, handshake)
            if pool is None:
                raise HandshakeError(404, "no route for this host and path")
            route = pool.route
            shaping = self.books.shaping(route.name)
            self.route_name = route.name
            check_origin(handshake, route.allowed_origins)
            key = affinity_key(handshake, route.hash_key, self.client_ip)
            if key is None:
                key = self.client_ip.encode("ascii") if route.hash_fallback == "ip" else random_key()
            self.key = key
            tls = self.listener.tls
            if tls is not None and tls.client_ca is not None:
                self.client_cert = peer_subject(self.transport.get_extra_info)
            subject = self.client_cert if tls is not None and tls.forward_client_cert else None
            upstream, offer = build_upstream_request(
                handshake,
                client_ip=self.client_ip,
                forwarded_for=forwarded_for,
                scheme="https" if tls else "http",
                host=route.upstream_host,
                strip_extensions=route.compression == "strip",
                client_cert_subject=subject,
                target=shaping.target(handshake.target) if shaping.changes_target else None,
                route_drop=shaping.request_drop,
                route_set=shaping.request_set,
                protocols=shaping.offered(handshake.protocols),
            )
            await self.books.handshake_turns.step()
            await self._connect_backend(pool, key, upstream, offer, request_at, shaping)
        except HandshakeError as exc:
            if exc.status == 426 and self._answer_page(request):
                return
            self._reject(exc)
        except BackendUnavailable as exc:
            self._account(exc.status, "backend_failed", exc.reason, self.backend_tried)
            self._reply(render_error(exc.status, exc.reason))
        except Exception:
            log.exception("conn=%d unexpected failure in the handshake", self.conn_id)
            self._account(500, "error", "internal error")
            self._reply(render_error(500, "internal error"))

    def _answer_page(self, request: RequestHead) -> bool:
        """Answer a plain GET with its route's `static` file, if the route has any (see pages.py)."""
        target = plain_get(request)
        pool = None if target is None else self.books.pool_for(target.host, target.path, target)
        if pool is None or pool.route.static is None:
            return False
        assert target is not None
        match = pool.route.match
        relative = below_prefix(target.path, match.path_prefix_raw or match.path_prefix)
        status, reply = static_reply(pool.route.static, relative)
        self.route_name = pool.route.name
        self._account(status, "page", "static file" if status == 200 else "no such file")
        self._reply(reply)
        return True

    async def _connect_backend(
        self, pool: Pool, key: bytes, upstream: bytes, offer: Offer, request_at: float, shaping: Shaping
    ) -> None:
        """Try the key's backends in order until one answers; relay its answer."""
        loop = self.loop
        failure: BackendUnavailable | None = None  # made only when no backend answers
        metrics = self.books.metrics
        config = self.books.config
        # A reload since the route was chosen may have removed it: then the global timeout.
        connect_timeout = self.books.connect_timeouts.get(pool.route.name, config.timeouts.connect)
        for member in pool.candidates(key, loop.time()):
            backend_transport: asyncio.Transport | None = None
            self.backend_tried = member.identity
            attempt_started = time.perf_counter()
            member.connecting += 1
            try:
                try:
                    async with asyncio.timeout(connect_timeout):
                        backend_transport, answer = await loop.create_connection(
                            lambda: BackendHandshake(upstream, config.limits, config.http_parser),
                            member.host,
                            member.port,
                            ssl=member.tls,
                            server_hostname=member.server_name,
                        )
                        outcome = await answer.outcome
                except TimeoutError:
                    raise BackendUnavailable(504, "backend did not answer in time") from None
                except OSError as exc:
                    raise BackendUnavailable(502, "backend unreachable") from exc
                if isinstance(outcome, ResponseHead):
                    negotiated = check_backend_response(outcome, offer)
            except BackendUnavailable as exc:
                if backend_transport is not None:
                    backend_transport.close()
                cause = f" ({exc.__cause__})" if exc.__cause__ else ""
                log.warning(
                    "conn=%d backend %s: %s%s", self.conn_id, member.identity, exc.reason, cause
                )
                if pool.on_failed(member, loop.time(), exc.reason):
                    metrics.series(metrics.backend_ejections, pool.route.name, member.identity).inc()
                failure = exc
                continue
            except BaseException:
                if backend_transport is not None:
                    backend_transport.close()
                raise
            finally:
                member.connecting -= 1
            pool.on_connected(member)
            metrics.backend_connect_duration.observe(
                pool.route.name, time.perf_counter() - attempt_started
            )
            if isinstance(outcome, h11.Response):
                # The backend answered: its refusal is the client's answer, not a failure.
                log.info(
                    "conn=%d backend %s refused the upgrade: %d",
                    self.conn_id, member.identity, outcome.status_code,
                )
                backend_transport.close()
                self._account(
                    outcome.status_code, "backend_refused", "backend refused the upgrade", member.identity
                )
                self._reply(render_backend_reply(outcome, bytes(answer.body)))
                return
            if shaping.response_drop or shaping.response_set:
                negotiated = replace(negotiated, headers=shaping.response_headers(negotiated.headers))
            self.transport.write(render_switching_protocols(negotiated))
            handshake_seconds = time.perf_counter() - request_at
            metrics.handshake_duration.observe(pool.route.name, handshake_seconds)
            metrics.connections.inc(pool.route.name, "upgraded", self.protocol)
            self._hand_off(backend_transport, answer, negotiated.deflate, pool, member, key)
            return
        raise failure or BackendUnavailable(503, "no backend available")

    def _hand_off(
        self,
        backend_transport: asyncio.Transport,
        answer: BackendHandshake,
        deflate: bool,
        pool: Pool,
        member: Member,
        key: bytes,
    ) -> None:
        if self.lost or answer.lost:
            # One side left during the hand-off; its protocol already saw the loss.
            if not answer.lost:
                backend_transport.close()
            if not self.lost:
                self.transport.write(bytes(answer.early))
                self.transport.close()
            self._finish()
            return
        books = self.books
        books.handshakes.discard(self)
        # The admission passes to the relay, which gives it back when it ends.
        self.admitted = False
        on_closed = partial(
            books.relay_closed, pool, self.client_address, self.client_cert, self.counted_ip,
            protocol=self.protocol,
        )
        relay = Relay(
            self.transport,
            backend_transport,
            books.route_settings.get(pool.route.name, books.relay_settings),
            member=member,
            deflate=deflate,
            conn_id=self.conn_id,
            on_closed=on_closed,
            turns=books.bulk_turns,
        )
        relay.key = key
        relay.route_name = pool.route.name
        books.relay_opened(relay, pool, member)
        relay.start(client_early=bytes(self.early), backend_early=bytes(answer.early))
        if books.backend_removed(pool, member):
            # A reload removed the backend while this handshake was under way; the
            # connections it had then were handled by the reload, this one is handled here.
            if pool.route.on_backend_removed != "keep":
                books.spread_closes([relay], *gateway_close(Cause.BACKEND_REMOVED))


class StreamUpgrade(UpgradeProtocol):
    """The upgrade phase of one HTTP/2 stream (http2.py): TLS and any PROXY header were its connection's."""

    __slots__ = ()
    protocol = HTTP2
    starts_tls = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.loop = asyncio.get_running_loop()
        self.accepted_at = time.perf_counter()
        self.client_ip, self.client_address = transport.get_extra_info("wsgate_client")
        if self._admit():
            self._address_known()


def _feed_protocol(transport: asyncio.Transport, data: bytes) -> None:
    """Give `data` to the transport's current protocol as if the transport had read it."""
    protocol = transport.get_protocol()
    try:
        if hasattr(protocol, "buffer_updated"):
            view = memoryview(data)
            while view:
                buffer = protocol.get_buffer(len(view))
                size = min(len(buffer), len(view))
                buffer[:size] = view[:size]
                protocol.buffer_updated(size)
                view = view[size:]
        else:
            cast(asyncio.Protocol, protocol).data_received(data)
    except Exception:
        log.exception("handing early TLS bytes to the TLS layer failed")
        transport.abort()

