"""Health probes of an address (tcp, http, websocket), against real peers on 127.0.0.1."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from conftest import Backend
from peers import STEP_TIMEOUT

from wsgate.config import HealthCheck
from wsgate.probes import Prober, ws_url


def port_of(backend: Backend) -> int:
    return int(backend.url.rsplit(":", 1)[1])


@pytest.fixture
async def prober() -> AsyncIterator[Prober]:
    prober = Prober()
    yield prober
    await prober.close()


def http_answer(status: int):
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(f"HTTP/1.1 {status} X\r\ncontent-length: 0\r\nconnection: close\r\n\r\n".encode())
        await writer.drain()

    return answer


async def test_a_tcp_probe_needs_only_a_listener(
    prober: Prober, aiohttp_backend: Backend, closed_port: int
) -> None:
    check = HealthCheck(type="tcp", timeout=1.0)
    async with asyncio.timeout(STEP_TIMEOUT):
        assert await prober.probe(check, "127.0.0.1", port_of(aiohttp_backend))
        assert not await prober.probe(check, "127.0.0.1", closed_port)


@pytest.mark.parametrize(("status", "healthy"), [(200, True), (204, True), (302, False), (503, False)])
async def test_an_http_probe_wants_a_2xx(prober: Prober, raw_backend, status: int, healthy: bool) -> None:
    backend = await raw_backend(http_answer(status))
    check = HealthCheck(type="http", path="/healthz", timeout=1.0)
    async with asyncio.timeout(STEP_TIMEOUT):
        assert await prober.probe(check, "127.0.0.1", port_of(backend)) is healthy
    assert backend.connections == 1


async def test_a_websocket_probe_wants_an_upgrade(
    prober: Prober, aiohttp_backend: Backend, raw_backend
) -> None:
    check = HealthCheck(type="websocket", path="/ws", timeout=1.0)
    plain_http = await raw_backend(http_answer(200))
    async with asyncio.timeout(STEP_TIMEOUT):
        assert await prober.probe(check, "127.0.0.1", port_of(aiohttp_backend))
        assert not await prober.probe(check, "127.0.0.1", port_of(plain_http))
    assert aiohttp_backend.requests[-1]["user-agent"] == "wsgate-health-check"


@pytest.mark.parametrize(
    ("host", "scheme", "url"),
    [
        ("10.0.0.1", "ws", "ws://10.0.0.1:80"),
        ("::1", "wss", "wss://[::1]:80"),
        ("example.com", "ws", "ws://example.com:80"),
    ],
)
def test_ws_url_brackets_ipv6_literals(host: str, scheme: str, url: str) -> None:
    assert ws_url(host, 80, scheme) == url
