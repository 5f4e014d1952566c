"""Routes end to end: matching, request shaping and per-route settings through a running gateway.

Each backend is a real `websockets` server that records what it received (the
path, every header line, the subprotocols offered); which backend saw a request
tells which route matched it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import websockets
import yaml
from conftest import gateway_config
from peers import STEP_TIMEOUT, accept_upgrade, client_frame, raw_exchange, read_frame, read_response_head
from peers import upgrade_request
from websockets.exceptions import ConnectionClosed

from wsgate.config import parse_config
from wsgate.errors import ConfigError

# Every test runs with each parser of the handshakes' heads.
pytestmark = pytest.mark.usefixtures("http_parser")


@dataclass
class Recorder:
    """A backend and what each request it accepted carried."""

    url: str = ""
    paths: list[str] = field(default_factory=list)
    headers: list[list[tuple[str, str]]] = field(default_factory=list)  # names as sent, in order

    def last(self, name: str) -> list[str]:
        """The values of header `name` (any case) in the last request, one per line."""
        return [value for key, value in self.headers[-1] if key.lower() == name]


@pytest.fixture
async def backends() -> AsyncIterator[Callable[..., Awaitable[Recorder]]]:
    """`await backends()` starts an echo backend; `response_headers` go on its 101."""
    servers: list[Any] = []

    async def start(response_headers: dict[str, str] | None = None) -> Recorder:
        recorder = Recorder()

        def process_request(connection: Any, request: Any) -> None:
            recorder.paths.append(request.path)
            recorder.headers.append(list(request.headers.raw_items()))

        def process_response(connection: Any, request: Any, response: Any) -> None:
            for name, value in (response_headers or {}).items():
                response.headers[name] = value

        async def echo(connection: Any) -> None:
            async for message in connection:
                await connection.send(message)

        def first_offered(connection: Any, offered: list[str]) -> str | None:
            return offered[0] if offered else None

        server = await websockets.serve(
            echo, "127.0.0.1", 0, process_request=process_request, process_response=process_response,
            select_subprotocol=first_offered, max_size=None,
        )
        servers.append(server)
        recorder.url = f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        return recorder

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()


def routes_config(*routes: tuple[Recorder, dict[str, Any]], **sections: Any) -> dict[str, Any]:
    """A gateway config whose routes, in order, send to their recorders."""
    config = gateway_config(["ws://127.0.0.1:9"], **sections)
    config["routes"] = [
        {"name": f"r{i}", "backends": [{"url": recorder.url}], **route}
        for i, (recorder, route) in enumerate(routes)
    ]
    return config


async def exchange(url: str, **connect: Any) -> websockets.ClientConnection:
    """Connect, echo one message, and return the (closed) connection for its handshake."""
    async with asyncio.timeout(STEP_TIMEOUT):
        async with websockets.connect(url, **connect) as ws:
            await ws.send("ping")
            assert await ws.recv() == "ping"
    return ws


async def chosen(url: str, recorders: list[Recorder], **connect: Any) -> int:
    """The index of the recorder (so the route) that took one connection."""
    before = [len(r.paths) for r in recorders]
    await exchange(url, **connect)
    took = [i for i, r in enumerate(recorders) if len(r.paths) > before[i]]
    assert len(took) == 1, took
    return took[0]


# -- matching --------------------------------------------------------------------------


async def test_subprotocol_match_sends_each_protocol_to_its_pool(start_gateway, backends):
    mqtt, graphql, rest = [await backends() for _ in range(3)]
    url = await start_gateway(routes_config(
        (mqtt, {"match": {"subprotocol": "mqtt"}}),
        (graphql, {"match": {"subprotocol": "graphql-transport-ws"}}),
        (rest, {}),
    ))
    every = [mqtt, graphql, rest]
    assert await chosen(url, every, subprotocols=["chat", "mqtt"]) == 0
    assert await chosen(url, every, subprotocols=["graphql-transport-ws"]) == 1
    assert await chosen(url, every, subprotocols=["MQTT"]) == 2  # subprotocols are case-sensitive
    assert await chosen(url, every) == 2


async def test_header_exact_match_ignores_the_name_s_case_not_the_value_s(start_gateway, backends):
    gold, rest = await backends(), await backends()
    url = await start_gateway(routes_config((gold, {"match": {"headers": {"X-Tier": "gold"}}}), (rest, {})))
    assert await chosen(url, [gold, rest], additional_headers={"x-TIER": "gold"}) == 0
    assert await chosen(url, [gold, rest], additional_headers={"X-Tier": "Gold"}) == 1
    assert await chosen(url, [gold, rest], additional_headers={"X-Tier": "golden"}) == 1
    assert await chosen(url, [gold, rest]) == 1


async def test_header_regex_match_is_anchored(start_gateway, backends):
    users, rest = await backends(), await backends()
    url = await start_gateway(routes_config(
        (users, {"match": {"headers": {"x-user": {"regex": "u[0-9]+"}}}}), (rest, {})
    ))
    assert await chosen(url, [users, rest], additional_headers={"X-User": "u42"}) == 0
    assert await chosen(url, [users, rest], additional_headers={"X-User": "u42x"}) == 1
    assert await chosen(url, [users, rest], additional_headers={"X-User": "xu42"}) == 1


async def test_query_match_exact_and_regex_on_percent_decoded_values(start_gateway, backends):
    lobby, numbered, rest = [await backends() for _ in range(3)]
    url = await start_gateway(routes_config(
        (lobby, {"match": {"query": {"room": "lobby"}}}),
        (numbered, {"match": {"query": {"room": {"regex": "[0-9]+"}}}}),
        (rest, {}),
    ))
    every = [lobby, numbered, rest]
    assert await chosen(url + "/?room=lobby", every) == 0
    assert await chosen(url + "/?x=1&room=lob%62y", every) == 0
    assert await chosen(url + "/?room=42", every) == 1
    assert await chosen(url + "/?room=42x", every) == 2
    assert await chosen(url + "/?rooms=42", every) == 2
    assert lobby.paths[1] == "/?x=1&room=lob%62y"  # the query goes upstream as the client sent it


async def test_a_route_matches_only_when_all_its_conditions_hold(start_gateway, backends):
    strict, rest = await backends(), await backends()
    url = await start_gateway(routes_config(
        (strict, {"match": {
            "path_prefix": "/ws", "subprotocol": "mqtt", "headers": {"x-tier": "gold"}, "query": {"room": "1"}
        }}),
        (rest, {}),
    ))
    every = [strict, rest]
    full = {"subprotocols": ["mqtt"], "additional_headers": {"X-Tier": "gold"}}
    assert await chosen(url + "/ws?room=1", every, **full) == 0
    assert await chosen(url + "/other?room=1", every, **full) == 1
    assert await chosen(url + "/ws?room=2", every, **full) == 1
    assert await chosen(url + "/ws?room=1", every, additional_headers={"X-Tier": "gold"}) == 1
    assert await chosen(url + "/ws?room=1", every, subprotocols=["mqtt"]) == 1


@pytest.mark.parametrize("header_route_first", [True, False])
async def test_the_first_route_that_matches_wins(start_gateway, backends, header_route_first):
    by_header, by_query = await backends(), await backends()
    header_route = (by_header, {"match": {"headers": {"x-tier": "gold"}}})
    query_route = (by_query, {"match": {"query": {"room": "1"}}})
    order = [header_route, query_route] if header_route_first else [query_route, header_route]
    url = await start_gateway(routes_config(*order))
    recorders = [recorder for recorder, _ in order]
    assert await chosen(url + "/?room=1", recorders, additional_headers={"X-Tier": "gold"}) == 0


# -- shaping -----------------------------------------------------------------------------


async def test_strip_prefix_leaves_the_rest_of_the_path_and_the_query(start_gateway, backends):
    backend = await backends()
    url = await start_gateway(routes_config(
        (backend, {"match": {"path_prefix": "/chat"}, "strip_prefix": "/chat"})
    ))
    for sent, received in [("/chat/room/1?x=1", "/room/1?x=1"), ("/chat?x=1", "/?x=1"), ("/chat", "/")]:
        await exchange(url + sent)
        assert backend.paths[-1] == received


async def test_rewrite_after_strip_prefix_keeps_the_query(start_gateway, backends):
    backend = await backends()
    url = await start_gateway(routes_config((backend, {
        "strip_prefix": "/api", "rewrite": {"regex": "^/old/(.*)$", "replacement": "/new/\\1"},
    })))
    await exchange(url + "/api/old/a/b?room=1&x=%2F")
    await exchange(url + "/old/c")
    await exchange(url + "/api/other?q")
    assert backend.paths == ["/new/a/b?room=1&x=%2F", "/new/c", "/other?q"]


async def test_a_rewrite_to_an_invalid_path_is_answered_500_without_a_backend(start_gateway_object, backends):
    backend = await backends()
    gateway = await start_gateway_object(routes_config(
        (backend, {"rewrite": {"regex": "^/(.*)$", "replacement": "\\1"}})
    ))
    host, port = gateway.addresses[0]
    status, _, _ = await raw_exchange(f"ws://{host}:{port}", upgrade_request("/x?room=1"))
    assert status == 500
    assert backend.paths == []
    count = gateway.registry.get_sample_value("wsgate_handshake_rejections_total", {"reason": "rewrite"})
    assert count == 1


async def test_request_headers_set_and_remove_then_forwarding_headers_last(start_gateway, backends):
    backend = await backends()
    url = await start_gateway(routes_config((backend, {
        "request_headers": {"set": {"X-Route": "chat", "X-Tenant": "a b"}, "remove": ["X-Debug", "Cookie"]},
    })))
    await exchange(url, additional_headers={
        "X-Route": "from-client", "X-Debug": "1", "Cookie": "s=1", "X-Kept": "yes",
        "X-Forwarded-For": "203.0.113.9", "X-Forwarded-Proto": "https",
    })
    assert backend.last("x-route") == ["chat"]  # set replaces the client's value
    assert backend.last("x-tenant") == ["a b"]
    assert backend.last("x-debug") == [] and backend.last("cookie") == []
    assert backend.last("x-kept") == ["yes"]
    # The gateway's own forwarding headers: the client's are not believed, and come after the route's.
    assert backend.last("x-forwarded-for") == ["127.0.0.1"]
    assert backend.last("x-forwarded-proto") == ["http"]
    names = [name for name, _ in backend.headers[-1]]
    assert "X-Route" in names  # spelled as the config writes it
    assert names.index("X-Route") < names.index("X-Forwarded-For")


async def test_response_headers_edit_the_101_the_client_sees(start_gateway, backends):
    backend = await backends(response_headers={"X-Backend": "internal", "X-Version": "7"})
    url = await start_gateway(routes_config((backend, {
        "response_headers": {"set": {"X-Served-By": "wsgate", "X-Version": "8"}, "remove": ["X-Backend"]},
    })))
    ws = await exchange(url, subprotocols=["chat"])
    headers = ws.response.headers
    assert headers["X-Served-By"] == "wsgate"
    assert headers.get_all("X-Version") == ["8"]
    assert "X-Backend" not in headers
    assert headers["Sec-WebSocket-Protocol"] == "chat"  # the handshake's own headers are untouched
    assert headers["Upgrade"] == "websocket"


async def test_subprotocols_offered_upstream_are_filtered_and_may_be_none(start_gateway, backends):
    backend = await backends()
    url = await start_gateway(routes_config((backend, {"subprotocols": ["mqtt", "chat.v2"]})))
    ws = await exchange(url, subprotocols=["chat.v1", "chat.v2", "mqtt"])
    assert backend.last("sec-websocket-protocol") == ["chat.v2, mqtt"]  # the client's order
    assert ws.subprotocol == "chat.v2"
    ws = await exchange(url, subprotocols=["chat.v1"])
    assert backend.last("sec-websocket-protocol") == []  # none left: none offered, the backend decides
    assert ws.subprotocol is None


async def test_a_backend_choosing_a_filtered_out_subprotocol_gives_502(start_gateway, raw_backend):
    async def choose_stripped(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await accept_upgrade(reader, writer, b"Sec-WebSocket-Protocol: chat.v1\r\n")

    backend = await raw_backend(choose_stripped)
    config = gateway_config([backend.url], route={"subprotocols": ["mqtt"]})
    url = await start_gateway(config)
    status, _, _ = await raw_exchange(url, upgrade_request(extra="Sec-WebSocket-Protocol: chat.v1, mqtt\r\n"))
    assert status == 502


# -- per-route settings ------------------------------------------------------------------


async def test_a_route_s_max_message_size_closes_1009_while_another_route_passes(start_gateway, backends):
    small, large = await backends(), await backends()
    url = await start_gateway(routes_config(
        (small, {"match": {"path_prefix": "/small"}, "limits": {"max_message_size": "1KiB"}}),
        (large, {}),
    ))
    message = "x" * 4096
    # Uncompressed: with permessage-deflate the limit bounds the compressed bytes on the wire.
    async with asyncio.timeout(STEP_TIMEOUT):
        async with websockets.connect(url + "/other", compression=None) as ws:
            await ws.send(message)
            assert await ws.recv() == message
        async with websockets.connect(url + "/small", compression=None) as ws:
            await ws.send("x" * 1024)  # at the limit
            assert await ws.recv() == "x" * 1024
            await ws.send(message)
            with pytest.raises(ConnectionClosed):
                await ws.recv()
    assert ws.close_code == 1009


async def test_a_route_s_idle_timeout_closes_while_the_global_one_does_not(start_gateway, backends):
    quick, slow = await backends(), await backends()
    url = await start_gateway(routes_config(
        (quick, {"match": {"path_prefix": "/quick"}, "timeouts": {"idle": "150ms"}}),
        (slow, {}),
        timeouts={"idle": "300s"},
    ))
    async with asyncio.timeout(STEP_TIMEOUT):
        async with websockets.connect(url + "/other") as kept, websockets.connect(url + "/quick") as idle:
            await idle.wait_closed()
            assert idle.close_code == 1001
            # The other route's connection, as quiet as the closed one, is still open.
            await kept.send("still here")
            assert await kept.recv() == "still here"


async def _raw_upgrade(url: str, path: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = url.removeprefix("ws://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(upgrade_request(path))
    status, _, _ = await read_response_head(reader)
    assert status == 101
    return reader, writer


async def test_a_route_s_heartbeat_pings_its_clients_only(start_gateway, backends):
    beating, quiet = await backends(), await backends()
    url = await start_gateway(routes_config(
        (beating, {"match": {"path_prefix": "/beat"}, "heartbeat": {"interval": "100ms", "timeout": "5s"}}),
        (quiet, {}),
        heartbeat={"interval": "300s"},
    ))
    beat_reader, beat_writer = await _raw_upgrade(url, "/beat")
    other_reader, other_writer = await _raw_upgrade(url, "/other")
    try:
        for _ in range(2):
            ping = await read_frame(beat_reader)
            assert ping.opcode == 0x9 and not ping.masked
            beat_writer.write(client_frame(0xA, ping.payload))
        # Two intervals have passed: the other route's client got no ping, its first frame is the echo.
        other_writer.write(client_frame(0x1, b"echo me"))
        frame = await read_frame(other_reader)
        assert (frame.opcode, frame.payload) == (0x1, b"echo me")
    finally:
        beat_writer.close()
        other_writer.close()


# -- config errors, with their key paths --------------------------------------------------


def _route_error(route: dict[str, Any]) -> ConfigError:
    config = gateway_config(["ws://127.0.0.1:9"], extra_routes=[{"name": "two", "backends": [
        {"url": "ws://127.0.0.1:9"}], **route}])
    with pytest.raises(ConfigError) as caught:
        parse_config(config)
    return caught.value


@pytest.mark.parametrize(
    ("route", "path", "says"),
    [
        pytest.param({"match": {"headers": {"X-User": {"regex": "u[0-9"}}}},
                     "routes[1].match.headers.X-User", "invalid regular expression", id="header-regex"),
        pytest.param({"match": {"query": {"room": {"regex": "(?P<"}}}}, "routes[1].match.query.room",
                     "invalid regular expression", id="query-regex"),
        pytest.param({"rewrite": {"regex": "(", "replacement": "/"}}, "routes[1].rewrite.regex",
                     "invalid regular expression", id="rewrite-regex"),
        pytest.param({"rewrite": {"regex": "^/(.*)$", "replacement": "/\\2"}},
                     "routes[1].rewrite.replacement", "invalid replacement", id="rewrite-missing-group"),
        pytest.param({"timeouts": {"handshake": "1s"}}, "routes[1].timeouts.handshake",
                     "whole gateway only", id="route-handshake-timeout"),
        pytest.param({"request_headers": {"set": {"Upgrade": "h2c"}}},
                     "routes[1].request_headers.set.Upgrade", "cannot be set by a route", id="set-upgrade"),
        pytest.param({"request_headers": {"set": {"X-Forwarded-For": "1.2.3.4"}}},
                     "routes[1].request_headers.set.X-Forwarded-For", "cannot be set by a route",
                     id="set-xff"),
        pytest.param({"request_headers": {"remove": ["Sec-WebSocket-Key"]}},
                     "routes[1].request_headers.remove[0]", "cannot be removed by a route", id="remove-key"),
        pytest.param({"request_headers": {"set": {"x-a": "1"}, "remove": ["X-A"]}},
                     "routes[1].request_headers.remove[0]", "also under set", id="set-and-remove"),
        pytest.param({"request_headers": {"set": {"X-A": "1", "x-a": "2"}}},
                     "routes[1].request_headers.set.x-a", "the same header as 'X-A'", id="set-twice"),
        pytest.param({"request_headers": {"set": {"X-Route": "a\nb"}}},
                     "routes[1].request_headers.set.X-Route", "not a valid header value", id="bad-value"),
        pytest.param({"response_headers": {"set": {"Sec-WebSocket-Accept": "x"}}},
                     "routes[1].response_headers.set.Sec-WebSocket-Accept", "cannot be set by a route",
                     id="set-accept"),
        pytest.param({"response_headers": {"remove": ["Connection"]}}, "routes[1].response_headers.remove[0]",
                     "cannot be removed by a route", id="remove-connection"),
    ],
)
def test_route_config_errors_name_their_key(route, path, says):
    error = _route_error(route)
    assert (error.path, says in error.message) == (path, True), str(error)


async def test_a_reload_changes_a_route_s_settings_for_new_connections_only(
    start_gateway_object, backends, tmp_path
):
    backend = await backends()

    def config(size: str) -> dict[str, Any]:
        return routes_config((backend, {"limits": {"max_message_size": size}}))

    gateway = await start_gateway_object(config("1KiB"))
    host, port = gateway.addresses[0]
    url = f"ws://{host}:{port}"
    path = tmp_path / "wsgate.yaml"
    path.write_text(yaml.safe_dump(config("8KiB")))
    gateway.config_path = str(path)
    message = "x" * 4096
    async with asyncio.timeout(STEP_TIMEOUT):
        async with websockets.connect(url, compression=None) as held:
            assert await gateway.reload() is None
            async with websockets.connect(url, compression=None) as fresh:
                await fresh.send(message)
                assert await fresh.recv() == message
            await held.send(message)  # opened before the reload: keeps the old limit
            with pytest.raises(ConnectionClosed):
                await held.recv()
    assert held.close_code == 1009
