"""The admin server's guard on changes: a bearer token, loopback peers, no web pages.

Real HTTP requests (aiohttp's client) go to real admin servers: in-process ones
on 127.0.0.1:0, and `wsgate run` in a subprocess for the token file. Reading
endpoints stay open in every case. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from conftest import gateway_config
from peers import STEP_TIMEOUT
from test_operations import GatewayProcess

from wsgate.admin import AdminServer, is_loopback
from wsgate.config import parse_config, read_admin_token
from wsgate.gateway import Gateway

TOKEN = "s3cret-token_for.tests"
TOKEN_ENV = "WSGATE_TEST_ADMIN_TOKEN"
READ_PATHS = ["/metrics", "/healthz", "/readyz", "/status"]


class Guarded:
    """An in-process gateway whose config file is on disk, so POST /reload can succeed."""

    def __init__(self, gateway: Gateway, server: AdminServer, session: aiohttp.ClientSession) -> None:
        self.gateway = gateway
        self.server = server
        self.session = session
        self.port = server.address[1]

    async def request(
        self, method: str, path: str, host: str = "127.0.0.1", data: bytes | None = None, **headers: str
    ) -> tuple[int, dict[str, str], str]:
        url = f"http://{host}:{self.port}{path}"
        async with asyncio.timeout(STEP_TIMEOUT):
            async with self.session.request(method, url, data=data, headers=headers) as response:
                return response.status, dict(response.headers), await response.text()


@pytest.fixture
async def guarded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Callable[..., Awaitable[Guarded]]]:
    """`await guarded(admin_section, bind_host)`: a gateway, its config file and its admin server.

    The token comes from the config as `wsgate run` reads it (`admin.token_env` here).
    """
    started: list[Guarded] = []
    session = aiohttp.ClientSession()
    monkeypatch.setenv(TOKEN_ENV, TOKEN)

    async def start(admin: dict[str, Any], host: str = "127.0.0.1") -> Guarded:
        # No connection is made through the gateway: its backend is only a URL.
        data = gateway_config(["ws://127.0.0.1:9"], admin={**admin, "bind": f"{host}:0"})
        path = tmp_path / "wsgate.yaml"
        path.write_text(yaml.safe_dump(data))
        config = parse_config(data)
        gateway = Gateway(config)
        gateway.config_path = str(path)
        await gateway.start()
        server = AdminServer(gateway, read_admin_token(config.admin))
        try:
            await server.start(host, 0)
        except BaseException:
            await gateway.close()
            raise
        guarded = Guarded(gateway, server, session)
        started.append(guarded)
        return guarded

    yield start
    for guarded in started:
        await guarded.server.close()
        await guarded.gateway.close()
    await session.close()


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("::1", True),
        ("::ffff:127.0.0.1", True),
        ("localhost", True),
        ("LocalHost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("10.1.2.3", False),
        ("::ffff:10.1.2.3", False),
        ("fe80::1%eth0", False),
        ("gateway.example", False),
        ("", False),
    ],
)
def test_loopback_peers_and_binds_are_told_apart(host, loopback):
    # The tests speak only to loopback, so a peer off loopback (refused without a token) and
    # a bind off loopback (warned about at start) are judged by this rule alone.
    assert is_loopback(host) is loopback


async def test_without_a_token_a_loopback_peer_may_reload_and_read(guarded):
    admin = await guarded({})
    status, _, text = await admin.request("POST", "/reload")
    assert status == 200, text
    for path in READ_PATHS:
        assert (await admin.request("GET", path))[0] == 200, path


async def test_a_loopback_bind_without_a_token_logs_no_warning(guarded, caplog):
    caplog.set_level(logging.WARNING, logger="wsgate.admin")
    await guarded({})
    assert [r for r in caplog.records if r.name == "wsgate.admin"] == []


# -- with a token ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "authorization",
    [None, "Bearer wrong", f"Bearer {TOKEN}x", f"Bearer {TOKEN[:-1]}", f"Basic {TOKEN}", TOKEN, "Bearer"],
)
async def test_with_a_token_a_reload_without_it_is_401(guarded, authorization):
    admin = await guarded({"token_env": TOKEN_ENV})
    headers = {} if authorization is None else {"Authorization": authorization}
    status, response_headers, text = await admin.request("POST", "/reload", **headers)
    assert status == 401
    assert response_headers["WWW-Authenticate"].startswith("Bearer")
    assert text == "refused: a valid bearer token is needed\n"
    reloads = admin.gateway.registry.get_sample_value("wsgate_config_reloads_total", {"result": "success"})
    assert reloads is None


async def test_with_a_token_the_token_reloads_and_reading_needs_none(guarded):
    admin = await guarded({"token_env": TOKEN_ENV})
    for authorization in (f"Bearer {TOKEN}", f"bearer {TOKEN}"):
        status, _, text = await admin.request("POST", "/reload", Authorization=authorization)
        assert status == 200, text
    for path in READ_PATHS:
        assert (await admin.request("GET", path))[0] == 200, path


# -- requests a web page could make ---------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "status", "text"),
    [
        ({"Origin": "https://evil.example"}, 403, "a request with an Origin header"),
        ({"Origin": "null"}, 403, "a request with an Origin header"),
        ({"Content-Type": "application/x-www-form-urlencoded"}, 415, "x-www-form-urlencoded body"),
        ({"Content-Type": "multipart/form-data; boundary=x"}, 415, "multipart/form-data body"),
        ({"Content-Type": "text/plain;charset=UTF-8"}, 415, "text/plain body"),
        ({"Content-Type": "TEXT/PLAIN"}, 415, "text/plain body"),
        ({"Content-Type": "application/json"}, 200, "reloaded"),
    ],
)
@pytest.mark.parametrize("admin_section", [{}, {"token_env": TOKEN_ENV}], ids=["open", "token"])
async def test_what_a_web_page_could_send_is_refused_even_with_the_token(
    guarded, admin_section, headers, status, text
):
    admin = await guarded(admin_section)
    if admin_section:
        headers = {**headers, "Authorization": f"Bearer {TOKEN}"}
    got, _, body = await admin.request("POST", "/reload", data=b"x=1", **headers)
    assert got == status, body
    assert text in body
    for path in READ_PATHS:  # reading stays open, with an Origin or not
        assert (await admin.request("GET", path, **headers))[0] == 200, path


# -- wsgate run with a token file -------------------------------------------------------------


async def test_wsgate_run_reads_the_token_file_once_at_start(tmp_path, ws_backend):
    token_file = tmp_path / "admin-token"
    token_file.write_text(TOKEN + "\n")
    config = gateway_config([ws_backend.url], admin={"token_file": str(token_file)})
    gateway = await GatewayProcess.start(tmp_path, config)
    try:
        async with aiohttp.ClientSession() as session, asyncio.timeout(STEP_TIMEOUT):

            async def post(token: str | None) -> int:
                headers = {"Authorization": f"Bearer {token}"} if token else {}
                async with session.post(gateway.admin_url + "/reload", headers=headers) as response:
                    return response.status

            assert await post(None) == 401
            assert await post("other") == 401
            assert await post(TOKEN) == 200
            token_file.write_text("rotated\n")  # takes a restart
            assert await post("rotated") == 401
            assert await post(TOKEN) == 200
    finally:
        await gateway.stop()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("\n", "admin.token_file: {path} holds an empty token"),
        ("two words", "admin.token_file: the token in {path} must be visible ASCII characters"),
        (None, "admin.token_file: cannot read token file {path}: [Errno 2] No such file or directory"),
    ],
)
async def test_wsgate_run_refuses_a_token_file_without_a_token(tmp_path, ws_backend, content, message):
    token_file = tmp_path / "admin-token"
    if content is not None:
        token_file.write_text(content)
    config = gateway_config([ws_backend.url], admin={"token_file": str(token_file), "bind": "127.0.0.1:0"})
    (tmp_path / "wsgate.yaml").write_text(yaml.safe_dump(config))
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "wsgate", "run", "-c", str(tmp_path / "wsgate.yaml"),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(STEP_TIMEOUT):
        _, stderr = await process.communicate()
    assert process.returncode == 2
    assert message.format(path=token_file) in stderr.decode()
