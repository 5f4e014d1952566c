"""TLS end to end: wss:// listeners (SNI, mTLS, versions, rotation) and wss:// backends.

Certificates come from trustme, made fresh for this module. Every client is an
independent implementation (websockets, aiohttp, `openssl s_client`, raw
sockets); every network wait is bounded by STEP_TIMEOUT.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import ssl
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme
import websockets
from conftest import gateway_config
from cryptography import x509
from cryptography.x509.oid import NameOID
from peers import (
    STEP_TIMEOUT,
    client_frame,
    proxy_v1_header,
    proxy_v2_header,
    read_frame,
    read_response_head,
    upgrade_request,
)
from peers import until as wait_until

from wsgate.gateway import Gateway

REPO = Path(__file__).resolve().parent.parent


# -- certificates -------------------------------------------------------------------


@dataclass
class Pem:
    """A leaf certificate written to disk: chain file, key file, and the trustme object."""

    cert: str
    key: str
    leaf: trustme.LeafCert


def write_leaf(directory: Path, stem: str, ca: trustme.CA, *names: str, cn: str | None = None) -> Pem:
    leaf = ca.issue_cert(*names, common_name=cn or stem)
    cert, key = directory / f"{stem}.crt", directory / f"{stem}.key"
    cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    key.write_bytes(leaf.private_key_pem.bytes())
    return Pem(str(cert), str(key), leaf)


@dataclass
class Pki:
    """Everything the tests need, made once per module."""

    directory: Path
    ca: trustme.CA  # signs the gateway's and the backends' certificates
    ca_file: str
    other_ca: trustme.CA  # nobody trusts it
    other_ca_file: str
    client_ca: trustme.CA  # signs client certificates (mTLS)
    client_ca_file: str
    default: Pem  # the listener's default certificate
    chat: Pem
    api: Pem
    wildcard: Pem
    alice: Pem  # a client certificate from client_ca
    mallory: Pem  # a client certificate from other_ca
    backend_ip: Pem  # a backend certificate for 127.0.0.1
    backend_name: Pem  # a backend certificate for backend.test only
    backend_untrusted: Pem  # from other_ca

    def client_context(self, *, trust: trustme.CA | None = None, client: Pem | None = None) -> ssl.SSLContext:
        context = ssl.create_default_context()
        (trust or self.ca).configure_trust(context)
        if client is not None:
            client.leaf.configure_cert(context)
        return context


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    ca, other_ca, client_ca = trustme.CA(), trustme.CA(), trustme.CA()
    files = {}
    for name, authority in (("ca", ca), ("other-ca", other_ca), ("client-ca", client_ca)):
        path = directory / f"{name}.pem"
        authority.cert_pem.write_to_path(str(path))
        files[name] = str(path)
    return Pki(
        directory=directory,
        ca=ca,
        ca_file=files["ca"],
        other_ca=other_ca,
        other_ca_file=files["other-ca"],
        client_ca=client_ca,
        client_ca_file=files["client-ca"],
        default=write_leaf(directory, "default", ca, "default.test", "127.0.0.1"),
        chat=write_leaf(directory, "chat", ca, "chat.test"),
        api=write_leaf(directory, "api", ca, "api.test"),
        wildcard=write_leaf(directory, "wildcard", ca, "*.example.test"),
        alice=write_leaf(directory, "alice", client_ca, "alice@example.test", cn="alice"),
        mallory=write_leaf(directory, "mallory", other_ca, "mallory@example.test", cn="mallory"),
        backend_ip=write_leaf(directory, "backend-ip", ca, "127.0.0.1"),
        backend_name=write_leaf(directory, "backend-name", ca, "backend.test"),
        backend_untrusted=write_leaf(directory, "backend-untrusted", other_ca, "127.0.0.1"),
    )


def common_name(cert: x509.Certificate) -> str:
    return str(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


def dns_names(cert: x509.Certificate) -> list[str]:
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return list(san.get_values_for_type(x509.DNSName))


def insecure_context(**versions: ssl.TLSVersion) -> ssl.SSLContext:
    """A client that accepts any certificate: for looking at what is served."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    for name, version in versions.items():
        setattr(context, name, version)
    return context


async def close_writer(writer: asyncio.StreamWriter) -> None:
    writer.close()
    try:
        async with asyncio.timeout(1):
            await writer.wait_closed()
    except (OSError, TimeoutError, ssl.SSLError):
        pass


async def tls_peek(
    port: int, context: ssl.SSLContext, server_hostname: str | None
) -> tuple[x509.Certificate, ssl.SSLObject]:
    """Complete a TLS handshake with the listener; the certificate it served and the session."""
    async with asyncio.timeout(STEP_TIMEOUT):
        _, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=context, server_hostname=server_hostname
        )
    ssl_object = writer.get_extra_info("ssl_object")
    der = ssl_object.getpeercert(binary_form=True)
    await close_writer(writer)
    return x509.load_der_x509_certificate(der), ssl_object


# -- backends and gateways ----------------------------------------------------------


@dataclass
class EchoBackend:
    """A websockets echo server; what it saw, headers raw and in order."""

    url: str
    requests: list[list[tuple[str, str]]] = field(default_factory=list)
    server_names: list[str | None] = field(default_factory=list)
    client_subjects: list[Any] = field(default_factory=list)

    def headers(self, name: str, index: int = -1) -> list[str]:
        return [v for k, v in self.requests[index] if k.lower() == name.lower()]


@pytest.fixture
async def echo_backend() -> AsyncIterator[Callable[..., Awaitable[EchoBackend]]]:
    """`await echo_backend(ssl_context=None)`: a ws:// (or wss://) echo server on 127.0.0.1."""
    servers: list[Any] = []

    async def start(ssl_context: ssl.SSLContext | None = None) -> EchoBackend:
        backend = EchoBackend(url="")
        if ssl_context is not None:
            ssl_context.sni_callback = lambda _obj, name, _ctx: backend.server_names.append(name)

        def process_request(connection: Any, request: Any) -> None:
            backend.requests.append(list(request.headers.raw_items()))
            ssl_object = connection.transport.get_extra_info("ssl_object")
            if ssl_object is not None:
                backend.client_subjects.append((ssl_object.getpeercert() or {}).get("subject"))

        async def echo(connection: Any) -> None:
            async for message in connection:
                await connection.send(message)

        server = await websockets.serve(echo, "127.0.0.1", 0, ssl=ssl_context, process_request=process_request)
        servers.append(server)
        scheme = "wss" if ssl_context is not None else "ws"
        backend.url = f"{scheme}://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        return backend

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()


def backend_server_context(pem: Pem, client_ca: trustme.CA | None = None) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    pem.leaf.configure_cert(context)
    if client_ca is not None:
        client_ca.configure_trust(context)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def tls_config(backend_url: str, tls: dict[str, Any], **sections: Any) -> dict[str, Any]:
    config = gateway_config([backend_url], **sections)
    config["listeners"][0]["tls"] = tls
    return config


def port_of(gateway: Gateway) -> int:
    return gateway.addresses[0][1]


@pytest.fixture
async def tls_listener(pki, echo_backend, start_gateway_object):
    """A TLS listener with a default certificate and three SNI entries, in front of a ws:// echo."""
    backend = await echo_backend()
    tls = {
        "cert": pki.default.cert,
        "key": pki.default.key,
        "sni": [
            {"names": ["chat.test"], "cert": pki.chat.cert, "key": pki.chat.key},
            {"names": ["api.test"], "cert": pki.api.cert, "key": pki.api.key},
            {"names": ["*.example.test"], "cert": pki.wildcard.cert, "key": pki.wildcard.key},
        ],
    }
    gateway = await start_gateway_object(tls_config(backend.url, tls))
    return gateway, backend


# -- real clients over wss:// ------------------------------------------------------


async def test_websockets_client_echoes_text_and_binary(pki, tls_listener):
    gateway, backend = tls_listener
    url = f"wss://127.0.0.1:{port_of(gateway)}/chat?room=1"
    async with asyncio.timeout(STEP_TIMEOUT):
        async with websockets.connect(url, ssl=pki.client_context(), server_hostname="chat.test") as ws:
            await ws.send("héllo over TLS")
            assert await ws.recv() == "héllo over TLS"
            data = os.urandom(70_000)
            await ws.send(data)
            assert await ws.recv() == data
    assert backend.headers("X-Forwarded-Proto") == ["https"]
    assert backend.headers("Host") == [f"127.0.0.1:{port_of(gateway)}"]


async def test_client_supplied_forwarded_proto_is_replaced(pki, tls_listener):
    gateway, backend = tls_listener
    url = f"wss://127.0.0.1:{port_of(gateway)}/"
    async with asyncio.timeout(STEP_TIMEOUT):
        async with websockets.connect(
            url, ssl=pki.client_context(), additional_headers={"X-Forwarded-Proto": "http"}
        ) as ws:
            await ws.send("x")
            assert await ws.recv() == "x"
    assert backend.headers("X-Forwarded-Proto") == ["https"]


async def test_aiohttp_client_echoes_text_and_binary(pki, tls_listener):
    gateway, backend = tls_listener
    url = f"wss://127.0.0.1:{port_of(gateway)}/"
    async with asyncio.timeout(STEP_TIMEOUT):
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(url, ssl=pki.client_context()) as ws:
                await ws.send_str("text via aiohttp")
                assert (await ws.receive()).data == "text via aiohttp"
                await ws.send_bytes(b"\x00\xffbinary")
                assert (await ws.receive()).data == b"\x00\xffbinary"
    assert backend.headers("X-Forwarded-Proto") == ["https"]


async def test_openssl_s_client_sees_the_sni_certificate_and_echoes(pki, tls_listener):
    gateway, _ = tls_listener
    process = await asyncio.create_subprocess_exec(
        "openssl", "s_client", "-connect", f"127.0.0.1:{port_of(gateway)}",
        "-servername", "api.test", "-CAfile", pki.ca_file, "-verify_return_error",
        "-alpn", "http/1.1", "-brief", "-nocommands",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(STEP_TIMEOUT):
            process.stdin.write(upgrade_request(host="api.test") + client_frame(0x1, b"through openssl"))
            await process.stdin.drain()
            status, headers, _ = await read_response_head(process.stdout)
            assert status == 101
            assert headers["upgrade"].lower() == "websocket"
            frame = await read_frame(process.stdout)
            assert (frame.opcode, frame.payload) == (0x1, b"through openssl")
            process.stdin.close()
            _, stderr = await process.communicate()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    report = stderr.decode()
    assert "Verification: OK" in report, report
    assert re.search(r"Peer certificate:.*CN\s*=\s*api\b", report), report


# -- certificates by SNI -------------------------------------------------------------


@pytest.mark.parametrize(
    ("server_name", "expected_cn"),
    [
        ("chat.test", "chat"),
        ("api.test", "api"),
        ("a.example.test", "wildcard"),
        ("CHAT.TEST", "chat"),
        ("third.test", "default"),
        (None, "default"),
    ],
)
async def test_sni_chooses_the_certificate(pki, tls_listener, server_name, expected_cn):
    gateway, _ = tls_listener
    port = port_of(gateway)
    # Verify the chain but not the name, to see which certificate answers; None means
    # connecting by IP, for which Python sends no SNI.
    context = pki.client_context()
    context.check_hostname = False
    cert, _ = await tls_peek(port, context, server_name)
    assert common_name(cert) == expected_cn
    if expected_cn == "wildcard":
        assert dns_names(cert) == ["*.example.test"]
    if server_name is not None and expected_cn != "default":
        # And a client that checks the name too gets through to the backend.
        async with asyncio.timeout(STEP_TIMEOUT):
            async with websockets.connect(
                f"wss://127.0.0.1:{port}/", ssl=pki.client_context(), server_hostname=server_name
            ) as ws:
                await ws.send(server_name)
                assert await ws.recv() == server_name


async def test_default_certificate_names_the_ip(pki, tls_listener):
    gateway, _ = tls_listener
    cert, _ = await tls_peek(port_of(gateway), pki.client_context(), None)
    assert "default.test" in dns_names(cert)


# -- failures that must stay contained -------------------------------------------------


async def test_verifying_client_rejects_an_untrusted_certificate(pki, tls_listener):
    gateway, backend = tls_listener
    before = gateway.tls_handshake_failures
    with pytest.raises(ssl.SSLCertVerificationError):
        await tls_peek(port_of(gateway), pki.client_context(trust=pki.other_ca), "chat.test")
    await wait_until(lambda: gateway.tls_handshake_failures > before, "the failure to be counted")
    assert backend.requests == []


async def test_plain_tcp_on_the_tls_port_fails_cleanly(pki, tls_listener):
    gateway, backend = tls_listener
    before = gateway.tls_handshake_failures
    async with asyncio.timeout(STEP_TIMEOUT):
        reader, writer = await asyncio.open_connection("127.0.0.1", port_of(gateway))
        writer.write(upgrade_request())
        try:
            answer = await reader.read()
        except ConnectionResetError:
            answer = b""
        await close_writer(writer)
    # Nothing, or at most a TLS alert record: never an HTTP answer.
    assert answer == b"" or answer[:1] == b"\x15", answer
    await wait_until(lambda: gateway.tls_handshake_failures > before, "the failure to be counted")
    assert backend.requests == []
    # The listener keeps serving.
    async with asyncio.timeout(STEP_TIMEOUT):
        async with websockets.connect(f"wss://127.0.0.1:{port_of(gateway)}/", ssl=pki.client_context()) as ws:
            await ws.send("still serving")
            assert await ws.recv() == "still serving"


async def test_limits_per_address_on_a_tls_listener(pki, echo_backend, start_gateway_object):
    # A client that is its own peer is refused at accept, before any TLS is spent on it;
    # one behind a trusted proxy is known only from the request, so it hears a 429 over TLS.
    backend = await echo_backend()
    tls = {"cert": pki.default.cert, "key": pki.default.key}
    config = tls_config(
        backend.url, tls, trusted_proxies=["127.0.0.2"], limits={"max_connections_per_ip": 1}
    )
    gateway = await start_gateway_object(config)
    url = f"wss://127.0.0.1:{port_of(gateway)}/"
    async with asyncio.timeout(STEP_TIMEOUT):
        async with websockets.connect(url, ssl=pki.client_context()) as held:
            with pytest.raises((ssl.SSLError, ConnectionError)):
                _, writer = await asyncio.open_connection(
                    "127.0.0.1", port_of(gateway), ssl=pki.client_context()
                )
                await close_writer(writer)
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port_of(gateway), ssl=pki.client_context(), local_addr=("127.0.0.2", 0)
            )
            writer.write(upgrade_request(extra="X-Forwarded-For: 127.0.0.1\r\n"))
            status, headers, _ = await read_response_head(reader)
            await close_writer(writer)
            await held.send("still serving")
            assert await held.recv() == "still serving"
    assert (status, headers["retry-after"]) == (429, "1")
    assert len(backend.requests) == 1
    await wait_until(lambda: gateway.connection_count == 0, "every connection's release")


async def test_silent_client_is_dropped_after_the_handshake_timeout(pki, echo_backend, start_gateway_object):
    backend = await echo_backend()
    tls = {"cert": pki.default.cert, "key": pki.default.key}
    gateway = await start_gateway_object(tls_config(backend.url, tls, timeouts={"handshake": "200ms"}))
    before = gateway.tls_handshake_failures
    async with asyncio.timeout(STEP_TIMEOUT):
        reader, writer = await asyncio.open_connection("127.0.0.1", port_of(gateway))
        started = time.monotonic()
        try:
            answer = await asyncio.wait_for(reader.read(), 3)
        except ConnectionResetError:
            answer = b""
        elapsed = time.monotonic() - started
        await close_writer(writer)
    assert answer == b""
    assert 0.15 <= elapsed < 2.0, elapsed
    await wait_until(lambda: gateway.tls_handshake_failures > before, "the timeout to be counted")
    await wait_until(lambda: gateway.connection_count == 0, "the connection to be released")


# -- behind a PROXY protocol header -----------------------------------------------------


async def upgrade_over_tls_after(port: int, context: ssl.SSLContext, header: bytes, pieces: int) -> bytes:
    """Send `header` and the ClientHello together in `pieces` writes, complete TLS by hand
    (memory BIOs), send an upgrade request and return the response head."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="default.test")

    async def receive() -> None:
        chunk = await asyncio.wait_for(reader.read(65536), STEP_TIMEOUT)
        assert chunk, "the gateway closed the connection"
        incoming.write(chunk)

    try:
        with pytest.raises(ssl.SSLWantReadError):
            tls.do_handshake()
        first = header + outgoing.read()
        size = -(-len(first) // pieces)
        for start in range(0, len(first), size):
            writer.write(first[start : start + size])
            await writer.drain()
        for _ in range(10):  # the handshake takes one or two round trips
            await receive()
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                writer.write(outgoing.read())
        else:
            raise AssertionError("no TLS handshake after 10 reads")
        tls.write(upgrade_request())
        writer.write(outgoing.read())
        answer = b""
        for _ in range(20):
            await receive()
            try:
                answer += tls.read(65536)
            except ssl.SSLWantReadError:
                continue
            if b"\r\n\r\n" in answer:
                return answer
        raise AssertionError(f"no response head after 20 reads: {answer!r}")
    finally:
        writer.close()


@pytest.mark.parametrize("pieces", [1, 2, 100_000], ids=["one-write", "two-writes", "byte-by-byte"])
@pytest.mark.parametrize(
    "header", [proxy_v1_header(("203.0.113.7", 1)), proxy_v2_header(("2001:db8::7", 2))], ids=["v1", "v2"]
)
async def test_tls_listener_reads_the_proxy_header_first(pki, echo_backend, start_gateway_object, header, pieces):
    backend = await echo_backend()
    config = tls_config(backend.url, {"cert": pki.default.cert, "key": pki.default.key})
    config["listeners"][0]["proxy_protocol"] = "any"
    gateway = await start_gateway_object(config)
    head = await upgrade_over_tls_after(port_of(gateway), pki.client_context(), header, pieces)
    assert head.startswith(b"HTTP/1.1 101 ")
    client_ip = "203.0.113.7" if header.startswith(b"PROXY") else "2001:db8::7"
    assert backend.headers("X-Real-IP") == [client_ip]
    assert backend.headers("X-Forwarded-Proto") == ["https"]
    assert gateway.tls_handshake_failures == 0


# -- versions and ALPN -----------------------------------------------------------------


async def test_default_listener_negotiates_tls13_and_http11_alpn(pki, tls_listener):
    gateway, _ = tls_listener
    context = pki.client_context()
    context.set_alpn_protocols(["h2", "http/1.1"])
    _, session = await tls_peek(port_of(gateway), context, "chat.test")
    assert session.version() == "TLSv1.3"
    assert session.selected_alpn_protocol() == "http/1.1"


async def test_default_listener_accepts_a_tls12_client(pki, tls_listener):
    gateway, _ = tls_listener
    context = pki.client_context()
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    _, session = await tls_peek(port_of(gateway), context, "chat.test")
    assert session.version() == "TLSv1.2"


async def test_min_version_13_refuses_a_tls12_client(pki, echo_backend, start_gateway_object):
    backend = await echo_backend()
    tls = {"cert": pki.default.cert, "key": pki.default.key, "min_version": "1.3"}
    gateway = await start_gateway_object(tls_config(backend.url, tls))
    before = gateway.tls_handshake_failures
    old = pki.client_context()
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    # An alert, or (as OpenSSL may do here) the connection simply closed.
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await tls_peek(port_of(gateway), old, None)
    await wait_until(lambda: gateway.tls_handshake_failures > before, "the failure to be counted")
    _, session = await tls_peek(port_of(gateway), pki.client_context(), None)
    assert session.version() == "TLSv1.3"


# -- client certificates (mTLS) --------------------------------------------------------


@pytest.fixture
async def mtls_gateway(pki, echo_backend, start_gateway_object):
    async def start(client_auth: str) -> tuple[int, EchoBackend]:
        backend = await echo_backend()
        tls = {
            "cert": pki.default.cert,
            "key": pki.default.key,
            "client_ca": pki.client_ca_file,
            "client_auth": client_auth,
            "forward_client_cert": True,
            # One SNI entry, so the per-name context must carry the client CA too.
            "sni": [{"names": ["chat.test"], "cert": pki.chat.cert, "key": pki.chat.key}],
        }
        gateway = await start_gateway_object(tls_config(backend.url, tls))
        return port_of(gateway), backend

    return start


FORGED = {"X-Client-Cert-Subject": "CN=admin"}


async def echo_once(port: int, context: ssl.SSLContext, server_name: str = "default.test") -> None:
    async with asyncio.timeout(STEP_TIMEOUT):
        async with websockets.connect(
            f"wss://127.0.0.1:{port}/", ssl=context, server_hostname=server_name, additional_headers=FORGED
        ) as ws:
            await ws.send("authenticated")
            assert await ws.recv() == "authenticated"


async def expect_refused(port: int, context: ssl.SSLContext, server_name: str = "default.test") -> None:
    # Under TLS 1.3 the client may finish its side first and learn of the refusal on its first read.
    try:
        async with asyncio.timeout(STEP_TIMEOUT):
            async with websockets.connect(
                f"wss://127.0.0.1:{port}/", ssl=context, server_hostname=server_name, open_timeout=None
            ) as ws:
                await ws.send("should not pass")
                await ws.recv()
    except TimeoutError:
        raise AssertionError("the gateway neither refused nor served the client") from None
    except (OSError, EOFError, websockets.exceptions.InvalidHandshake):
        return
    raise AssertionError("the client got through")


@pytest.mark.parametrize("server_name", ["default.test", "chat.test"])
async def test_mtls_required(pki, mtls_gateway, server_name):
    port, backend = await mtls_gateway("required")
    await expect_refused(port, pki.client_context(), server_name)
    await expect_refused(port, pki.client_context(client=pki.mallory), server_name)
    assert backend.requests == []
    await echo_once(port, pki.client_context(client=pki.alice), server_name)
    [subject] = backend.headers("X-Client-Cert-Subject")
    assert "CN=alice" in subject.split(",")
    assert "admin" not in subject


async def test_mtls_optional(pki, mtls_gateway, caplog):
    caplog.set_level(logging.INFO, logger="wsgate.access")
    port, backend = await mtls_gateway("optional")
    await echo_once(port, pki.client_context())
    # Without a certificate there is no subject, and the client's forged one is gone.
    assert backend.headers("X-Client-Cert-Subject") == []
    await echo_once(port, pki.client_context(client=pki.alice))
    [subject] = backend.headers("X-Client-Cert-Subject")
    assert "CN=alice" in subject.split(",")
    # A certificate from an unknown CA is still refused.
    await expect_refused(port, pki.client_context(client=pki.mallory))
    assert len(backend.requests) == 2
    # The access log names the verified subject, and nothing for the anonymous client.
    await wait_until(
        lambda: len([r for r in caplog.records if r.name == "wsgate.access"]) >= 2, "two access lines"
    )
    certs = [r.access["client_cert"] for r in caplog.records if r.name == "wsgate.access"]
    assert certs[0] is None
    assert "CN=alice" in certs[1].split(",")


async def test_client_cert_subject_is_stripped_without_forwarding(pki, echo_backend, start_gateway_object):
    backend = await echo_backend()
    tls = {"cert": pki.default.cert, "key": pki.default.key, "client_ca": pki.client_ca_file}
    gateway = await start_gateway_object(tls_config(backend.url, tls))
    await echo_once(port_of(gateway), pki.client_context(client=pki.alice))
    assert backend.headers("X-Client-Cert-Subject") == []


# -- wss:// backends -------------------------------------------------------------------


async def ws_echo(url: str) -> None:
    async with asyncio.timeout(STEP_TIMEOUT):
        async with websockets.connect(url) as ws:
            await ws.send("to a wss backend")
            assert await ws.recv() == "to a wss backend"
            await ws.send(b"\x01\x02")
            assert await ws.recv() == b"\x01\x02"


async def expect_status(url: str, status: int) -> None:
    with pytest.raises(websockets.exceptions.InvalidStatus) as info:
        async with asyncio.timeout(STEP_TIMEOUT):
            async with websockets.connect(url):
                pass
    assert info.value.response.status_code == status


def wss_backend_config(backend: EchoBackend, tls: dict[str, Any] | None) -> dict[str, Any]:
    config = gateway_config([backend.url])
    config["routes"][0]["backends"][0]["tls"] = tls
    return config


async def test_wss_backend_with_ca(pki, echo_backend, start_gateway):
    backend = await echo_backend(backend_server_context(pki.backend_ip))
    url = await start_gateway(wss_backend_config(backend, {"ca": pki.ca_file}))
    await ws_echo(url)
    assert backend.headers("X-Forwarded-Proto") == ["http"]


async def test_wss_backend_with_the_wrong_ca_is_a_502(pki, echo_backend, start_gateway, caplog):
    caplog.set_level(logging.INFO, logger="wsgate")
    backend = await echo_backend(backend_server_context(pki.backend_untrusted))
    url = await start_gateway(wss_backend_config(backend, {"ca": pki.ca_file}))
    await expect_status(url, 502)
    assert backend.requests == []
    assert "certificate verify failed" in caplog.text


async def test_wss_backend_server_name_override(pki, echo_backend, start_gateway, caplog):
    caplog.set_level(logging.INFO, logger="wsgate")
    backend = await echo_backend(backend_server_context(pki.backend_name))
    # By IP the name check fails...
    url = await start_gateway(wss_backend_config(backend, {"ca": pki.ca_file}))
    await expect_status(url, 502)
    assert "certificate verify failed" in caplog.text
    # ...and with server_name it passes, sent as SNI too.
    url = await start_gateway(wss_backend_config(backend, {"ca": pki.ca_file, "server_name": "backend.test"}))
    await ws_echo(url)
    assert backend.server_names[-1] == "backend.test"


async def test_wss_backend_without_verification(pki, echo_backend, start_gateway, caplog):
    caplog.set_level(logging.INFO, logger="wsgate")
    backend = await echo_backend(backend_server_context(pki.backend_untrusted))
    url = await start_gateway(wss_backend_config(backend, {"verify": False, "server_name": "anything.test"}))
    await ws_echo(url)
    assert "NOT VERIFIED" in caplog.text


async def test_wss_backend_requiring_a_client_certificate(pki, echo_backend, start_gateway):
    backend = await echo_backend(backend_server_context(pki.backend_ip, client_ca=pki.client_ca))
    without = await start_gateway(wss_backend_config(backend, {"ca": pki.ca_file}))
    await expect_status(without, 502)
    tls = {"ca": pki.ca_file, "cert": pki.alice.cert, "key": pki.alice.key}
    url = await start_gateway(wss_backend_config(backend, tls))
    await ws_echo(url)
    assert dict(x[0] for x in backend.client_subjects[-1])["commonName"] == "alice"


async def test_wss_listener_to_wss_backend(pki, echo_backend, start_gateway_object):
    backend = await echo_backend(backend_server_context(pki.backend_ip))
    config = wss_backend_config(backend, {"ca": pki.ca_file})
    config["listeners"][0]["tls"] = {"cert": pki.default.cert, "key": pki.default.key}
    gateway = await start_gateway_object(config)
    async with asyncio.timeout(STEP_TIMEOUT):
        async with websockets.connect(f"wss://127.0.0.1:{port_of(gateway)}/", ssl=pki.client_context()) as ws:
            await ws.send("tls both ways")
            assert await ws.recv() == "tls both ways"
    assert backend.headers("X-Forwarded-Proto") == ["https"]


# -- rotation in a real process ----------------------------------------------------------


class GatewayProcess:
    """`python -m wsgate run` in a child process; its stderr lines, collected as they come."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.lines: list[str] = []
        self._changed = asyncio.Event()
        self._reader = asyncio.get_running_loop().create_task(self._read())
        self.port = 0

    @classmethod
    async def start(cls, config: Path) -> GatewayProcess:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "wsgate", "run", "-c", str(config),
            cwd=REPO,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        gateway = cls(process)
        line = await gateway.wait_for("listening on")
        gateway.port = int(re.search(r"listening on 127\.0\.0\.1:(\d+)", line).group(1))
        return gateway

    async def _read(self) -> None:
        while line := await self.process.stderr.readline():
            self.lines.append(line.decode(errors="replace"))
            self._changed.set()
        self._changed.set()

    async def wait_for(self, marker: str, start: int = 0) -> str:
        async with asyncio.timeout(STEP_TIMEOUT):
            while True:
                for line in self.lines[start:]:
                    if marker in line:
                        return line
                if self._reader.done():
                    raise AssertionError(f"{marker!r} never logged:\n{''.join(self.lines)}")
                self._changed.clear()
                await self._changed.wait()

    async def reload(self, marker: str) -> str:
        mark = len(self.lines)
        self.process.send_signal(signal.SIGHUP)
        return await self.wait_for(marker, mark)

    async def stop(self) -> None:
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(STEP_TIMEOUT):
                    await self.process.wait()
            except TimeoutError:
                self.process.kill()
                await self.process.wait()
        self._reader.cancel()


def replace_files(pem: Pem, cert: Path, key: Path) -> None:
    """Swap in a new certificate and key the way a deploy would: write aside, then rename."""
    for source, target in ((pem.key, key), (pem.cert, cert)):
        aside = target.with_suffix(".new")
        aside.write_bytes(Path(source).read_bytes())
        os.replace(aside, target)


def rotation_setup(tmp_path: Path, pki: Pki, backend_url: str, **tls: Any) -> tuple[Path, Path, Path]:
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    replace_files(write_leaf(tmp_path, "v1", pki.ca, "gateway.test", cn="gateway-v1"), cert, key)
    tls_yaml = ", ".join(f"{k}: {v}" for k, v in {"cert": cert, "key": key, **tls}.items())
    config = tmp_path / "wsgate.yaml"
    config.write_text(
        f'listeners: [{{bind: "127.0.0.1:0", tls: {{{tls_yaml}}}}}]\n'
        f"admin: {{enabled: false}}\n"
        f'routes: [{{name: echo, backends: [{{url: "{backend_url}"}}]}}]\n'
        f"timeouts: {{close: 200ms}}\n"
    )
    return config, cert, key


async def served_cn(pki: Pki, port: int) -> str:
    cert, _ = await tls_peek(port, pki.client_context(), "gateway.test")
    return common_name(cert)


async def test_sighup_rotates_certificates_and_keeps_old_connections(tmp_path, pki, echo_backend):
    backend = await echo_backend()
    config, cert, key = rotation_setup(tmp_path, pki, backend.url)
    gateway = await GatewayProcess.start(config)
    try:
        url = f"wss://127.0.0.1:{gateway.port}/"
        async with asyncio.timeout(STEP_TIMEOUT):
            old = await websockets.connect(url, ssl=pki.client_context(), server_hostname="gateway.test")
        v1_serial = x509.load_der_x509_certificate(
            old.transport.get_extra_info("ssl_object").getpeercert(binary_form=True)
        ).serial_number
        await old.send("before")
        assert await asyncio.wait_for(old.recv(), STEP_TIMEOUT) == "before"
        assert await served_cn(pki, gateway.port) == "gateway-v1"

        v2 = write_leaf(tmp_path, "v2", pki.ca, "gateway.test", cn="gateway-v2")
        replace_files(v2, cert, key)
        await gateway.reload("certificates loaded")
        new_cert, _ = await tls_peek(gateway.port, pki.client_context(), "gateway.test")
        assert common_name(new_cert) == "gateway-v2"
        assert new_cert.serial_number != v1_serial
        await old.send("after rotation")
        assert await asyncio.wait_for(old.recv(), STEP_TIMEOUT) == "after rotation"

        # A broken key is refused: the last good certificate stays in service.
        key.write_text("-----BEGIN PRIVATE KEY-----\nbroken\n-----END PRIVATE KEY-----\n")
        line = await gateway.reload("the old certificates")
        assert str(key) in line or str(cert) in line
        assert await served_cn(pki, gateway.port) == "gateway-v2"
        async with asyncio.timeout(STEP_TIMEOUT):
            async with websockets.connect(url, ssl=pki.client_context(), server_hostname="gateway.test") as ws:
                await ws.send("new client")
                assert await ws.recv() == "new client"
        await old.send("still open")
        assert await asyncio.wait_for(old.recv(), STEP_TIMEOUT) == "still open"
        await asyncio.wait_for(old.close(), STEP_TIMEOUT)
    finally:
        await gateway.stop()
    assert gateway.process.returncode == 0, "".join(gateway.lines)


async def until_served(pki: Pki, gateway: GatewayProcess, cn: str) -> None:
    """Poll new handshakes (bounded, 5 s) until they get the certificate named `cn`."""
    deadline = time.monotonic() + 5
    while (served := await served_cn(pki, gateway.port)) != cn:
        assert time.monotonic() < deadline, f"still serving {served}:\n{''.join(gateway.lines)}"
        await asyncio.sleep(0.05)


async def test_watch_interval_reloads_changed_files(tmp_path, pki, echo_backend):
    backend = await echo_backend()
    config, cert, key = rotation_setup(tmp_path, pki, backend.url, watch_interval="100ms")
    gateway = await GatewayProcess.start(config)
    try:
        assert await served_cn(pki, gateway.port) == "gateway-v1"
        replace_files(write_leaf(tmp_path, "v2", pki.ca, "gateway.test", cn="gateway-v2"), cert, key)
        await until_served(pki, gateway, "gateway-v2")
        await gateway.wait_for("certificates loaded")
    finally:
        await gateway.stop()


async def test_a_reload_starts_the_watch_that_the_new_config_asks_for(tmp_path, pki, echo_backend):
    backend = await echo_backend()
    config, cert, key = rotation_setup(tmp_path, pki, backend.url)
    gateway = await GatewayProcess.start(config)
    try:
        rotation_setup(tmp_path, pki, backend.url, watch_interval="100ms")
        await gateway.reload("reloaded ")
        assert await served_cn(pki, gateway.port) == "gateway-v1"
        # Changed after the reload, the files reach new handshakes only through the watch.
        replace_files(write_leaf(tmp_path, "v2", pki.ca, "gateway.test", cn="gateway-v2"), cert, key)
        await until_served(pki, gateway, "gateway-v2")
    finally:
        await gateway.stop()


# -- bad files: `check` and `run` exit 2 without listening ---------------------------------


def _bad_files(pki: Pki, tmp_path: Path, case: str) -> tuple[dict[str, Any], str, str]:
    """The listener's tls section (or {"backend_ca": file}), the key path and the file the error must name."""
    good = {"cert": pki.default.cert, "key": pki.default.key}
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("this is not PEM\n")
    missing = str(tmp_path / "missing.crt")
    if case == "missing-cert":
        return {**good, "cert": missing}, "listeners[0].tls.cert", missing
    if case == "missing-key":
        return {**good, "key": missing}, "listeners[0].tls.key", missing
    if case == "unreadable":
        directory = tmp_path / "a-directory.key"
        directory.mkdir()
        return {**good, "key": str(directory)}, "listeners[0].tls.key", str(directory)
    if case == "unreadable-mode":
        locked = tmp_path / "locked.key"
        locked.write_bytes(Path(pki.default.key).read_bytes())
        locked.chmod(0)
        return {**good, "key": str(locked)}, "listeners[0].tls.key", str(locked)
    if case == "mismatch":
        return {**good, "key": pki.chat.key}, "listeners[0].tls.cert", pki.chat.key
    if case == "sni-missing-key":
        sni = [{"names": ["chat.test"], "cert": pki.chat.cert, "key": missing}]
        return {**good, "sni": sni}, "listeners[0].tls.sni[0].key", missing
    if case == "bad-client-ca":
        return {**good, "client_ca": str(garbage)}, "listeners[0].tls.client_ca", str(garbage)
    if case == "bad-backend-ca":
        return {"backend_ca": str(garbage)}, "routes[0].backends[0].tls.ca", str(garbage)
    raise AssertionError(case)


BAD_FILES = [
    "missing-cert",
    "missing-key",
    "unreadable",
    pytest.param(
        "unreadable-mode",
        marks=pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode"),
    ),
    "mismatch",
    "sni-missing-key",
    "bad-client-ca",
    "bad-backend-ca",
]


@pytest.mark.parametrize("case", BAD_FILES)
async def test_bad_tls_files_exit_2_naming_file_and_key(tmp_path, pki, case):
    tls, key_path, culprit = _bad_files(pki, tmp_path, case)
    if "backend_ca" in tls:
        listener = '{bind: "127.0.0.1:0"}'
        backend = f'{{url: "wss://127.0.0.1:9", tls: {{ca: {tls["backend_ca"]}}}}}'
    else:
        sni = tls.pop("sni", None)
        parts = [f"{k}: {v}" for k, v in tls.items()]
        if sni:
            parts.append(f"sni: [{{names: [chat.test], cert: {sni[0]['cert']}, key: {sni[0]['key']}}}]")
        listener = f'{{bind: "127.0.0.1:0", tls: {{{", ".join(parts)}}}}}'
        backend = '{url: "ws://127.0.0.1:9"}'
    config = tmp_path / "wsgate.yaml"
    config.write_text(
        f"listeners: [{listener}]\nadmin: {{enabled: false}}\n"
        f"routes: [{{name: echo, backends: [{backend}]}}]\n"
    )

    async def cli(command: str) -> tuple[int, str]:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "wsgate", command, "-c", str(config),
            cwd=REPO, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )
        try:
            async with asyncio.timeout(STEP_TIMEOUT):
                output, _ = await process.communicate()
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
        return process.returncode, output.decode()

    for command, (status, output) in zip(("check", "run"), await asyncio.gather(cli("check"), cli("run"))):
        assert status == 2, (command, output)
        assert f"{config}: {key_path}: " in output, (command, output)
        assert culprit in output, (command, output)
        assert "Traceback" not in output and "listening on" not in output, (command, output)
