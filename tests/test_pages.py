"""A route's `static` files: what a plain GET on a listener gets, and what it never gets.

Raw HTTP/1.1 requests over real sockets to a gateway on 127.0.0.1:0 (so that
targets such as `/../x` reach it as written), and a websockets client for the
upgrade that shares the route. Every read is bounded.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import websockets
from conftest import gateway_config
from peers import STEP_TIMEOUT, upgrade_request

SECRET = "not for the web"


async def http(url: str, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send `request` as is; the reply's status, headers (lowercased names) and body."""
    host, port = url.removeprefix("ws://").rsplit(":", 1)
    async with asyncio.timeout(STEP_TIMEOUT):
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(request)
        reply = await reader.read()  # the gateway closes after its answer
        writer.close()
    head, _, body = reply.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value for name, _, value in (line.partition(": ") for line in lines)}
    return int(status_line.split()[1]), headers, body


def get(target: str, host: str = "gateway.test") -> bytes:
    return f"GET {target} HTTP/1.1\r\nHost: {host}\r\nAccept: text/html\r\n\r\n".encode()


@pytest.fixture
def site(tmp_path: Path) -> Path:
    """A directory of files, with a secret beside it and links that lead out of it."""
    (tmp_path / "secret.txt").write_text(SECRET)
    root = tmp_path / "site"
    root.mkdir()
    (root / "index.html").write_text("<h1>the page</h1>")
    (root / "app.js").write_text("console.log('app')")
    (root / ".env").write_text(SECRET)
    (root / "out.txt").symlink_to(tmp_path / "secret.txt")
    (root / "sub").mkdir()
    (root / "sub" / "index.html").write_text("<h1>sub</h1>")
    return root


async def test_a_plain_get_gets_the_routes_file_and_an_upgrade_still_reaches_the_backend(
    start_gateway, ws_backend, site
):
    url = await start_gateway(gateway_config([ws_backend.url], route={"static": str(site)}))
    for target, content_type, body in [
        ("/", "text/html; charset=utf-8", b"<h1>the page</h1>"),
        ("/?room=alpha", "text/html; charset=utf-8", b"<h1>the page</h1>"),
        ("/app.js", "text/javascript; charset=utf-8", b"console.log('app')"),
        ("/sub/", "text/html; charset=utf-8", b"<h1>sub</h1>"),
    ]:
        status, headers, got = await http(url, get(target))
        assert (status, headers["content-type"], got) == (200, content_type, body), target
        assert headers["content-length"] == str(len(body))
        assert headers["x-content-type-options"] == "nosniff"
    async with websockets.connect(url + "/app.js") as ws:
        await ws.send("still a WebSocket")
        assert await asyncio.wait_for(ws.recv(), STEP_TIMEOUT) == "still a WebSocket"


async def test_the_files_sit_below_the_routes_prefix(start_gateway, ws_backend, site):
    url = await start_gateway(gateway_config(
        [ws_backend.url], route={"match": {"path_prefix": "/app"}, "static": str(site)}
    ))
    status, _, body = await http(url, get("/app/app.js"))
    assert (status, body) == (200, b"console.log('app')")
    status, _, body = await http(url, get("/app/"))
    assert (status, body) == (200, b"<h1>the page</h1>")


async def test_without_static_a_plain_get_still_gets_426(start_gateway, ws_backend):
    url = await start_gateway(gateway_config([ws_backend.url]))
    status, headers, _ = await http(url, get("/"))
    assert status == 426
    assert headers["upgrade"] == "websocket"


@pytest.mark.parametrize(
    "target",
    ["/../secret.txt", "/%2e%2e/secret.txt", "/..%2fsecret.txt", "/.env", "/out.txt", "/missing.js",
     "/sub/../../secret.txt", "//etc/passwd"],
)
async def test_nothing_outside_the_directory_is_served(start_gateway, ws_backend, site, target):
    url = await start_gateway(gateway_config([ws_backend.url], route={"static": str(site)}))
    status, _, body = await http(url, get(target))
    assert status in (404, 426), (target, status)
    assert SECRET.encode() not in body


async def test_an_upgrade_refused_for_its_version_gets_426_not_the_page(start_gateway, ws_backend, site):
    url = await start_gateway(gateway_config([ws_backend.url], route={"static": str(site)}))
    request = upgrade_request("/").replace(b"Sec-WebSocket-Version: 13", b"Sec-WebSocket-Version: 8")
    status, headers, body = await http(url, request)
    assert status == 426
    assert headers["sec-websocket-version"] == "13"
    assert b"the page" not in body


async def test_only_get_is_answered_with_a_file(start_gateway, ws_backend, site):
    url = await start_gateway(gateway_config([ws_backend.url], route={"static": str(site)}))
    status, _, body = await http(url, b"POST / HTTP/1.1\r\nHost: gateway.test\r\nContent-Length: 0\r\n\r\n")
    assert status == 405
    assert b"the page" not in body
