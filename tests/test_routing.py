"""Table-driven tests of wsgate.routing (no event loop)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from wsgate.routing import host_matches, match_route, path_matches


@dataclass(frozen=True)
class Match:
    host: str | None = None
    path_prefix: str = "/"
    path_prefix_raw: str | None = None


@dataclass(frozen=True)
class Route:
    name: str
    match: Match


@pytest.mark.parametrize(
    ("pattern", "host", "expected"),
    [
        pytest.param(None, "chat.example.com", True, id="none-any-name"),
        pytest.param(None, "127.0.0.1", True, id="none-address"),
        pytest.param(None, "", True, id="none-empty"),
        pytest.param("chat.example.com", "chat.example.com", True, id="exact"),
        pytest.param("chat.example.com", "example.com", False, id="exact-not-parent"),
        pytest.param("example.com", "chat.example.com", False, id="exact-not-child"),
        pytest.param("example.com", "example.org", False, id="exact-other-tld"),
        pytest.param("example.com", "example.com.evil.net", False, id="exact-not-prefix"),
        pytest.param("example.com", "badexample.com", False, id="exact-not-suffix"),
        pytest.param("*.example.com", "chat.example.com", True, id="wildcard-one-label"),
        pytest.param("*.example.com", "a.b.c.example.com", True, id="wildcard-several-labels"),
        pytest.param("*.example.com", "example.com", False, id="wildcard-not-bare-domain"),
        pytest.param("*.example.com", "badexample.com", False, id="wildcard-no-dot"),
        pytest.param("*.example.com", ".example.com", False, id="wildcard-empty-label"),
        pytest.param("*.example.com", "chat.example.org", False, id="wildcard-other-tld"),
        pytest.param("*.example.com", "chat.example.com.evil.net", False, id="wildcard-not-prefix"),
        pytest.param("*.example.com", "example.com.chat", False, id="wildcard-reversed"),
    ],
)
def test_host_matches(pattern: str | None, host: str, expected: bool) -> None:
    assert host_matches(pattern, host) is expected


@pytest.mark.parametrize(
    ("prefix", "path", "expected"),
    [
        pytest.param("/", "/", True, id="root-root"),
        pytest.param("/", "/anything/below", True, id="root-any"),
        pytest.param("/chat", "/chat", True, id="same"),
        pytest.param("/chat", "/chat/", True, id="trailing-slash"),
        pytest.param("/chat", "/chat/x/y", True, id="below"),
        pytest.param("/chat", "/chatroom", False, id="longer-segment"),
        pytest.param("/chat", "/chat.json", False, id="segment-with-suffix"),
        pytest.param("/chat", "/cha", False, id="shorter"),
        pytest.param("/chat", "/Chat", False, id="case-sensitive"),
        pytest.param("/chat/", "/chat/", True, id="slash-prefix-same"),
        pytest.param("/chat/", "/chat/x", True, id="slash-prefix-below"),
        pytest.param("/chat/", "/chat", False, id="slash-prefix-not-parent"),
        pytest.param("/chat/", "/chatroom", False, id="slash-prefix-longer-segment"),
        pytest.param("/a/b", "/a/b/c", True, id="two-segments-below"),
        pytest.param("/a/b", "/a/bc", False, id="two-segments-longer"),
    ],
)
def test_path_matches_whole_segments(prefix: str, path: str, expected: bool) -> None:
    assert path_matches(prefix, path) is expected


def test_path_prefix_raw_is_a_plain_string_prefix() -> None:
    raw = Route("raw", Match(None, path_prefix_raw="/chat"))
    assert match_route([raw], "h", "/chatroom") is raw
    assert match_route([raw], "h", "/chat/x") is raw
    assert match_route([raw], "h", "/cha") is None


ADMIN = Route("admin", Match("chat.example.com", "/admin"))
CHAT_WS = Route("chat-ws", Match("chat.example.com", "/ws"))
ANY_SUB_WS = Route("any-sub-ws", Match("*.example.com", "/ws"))
SPECIAL = Route("special", Match(None, "/ws/special"))
CATCH_ALL = Route("catch-all", Match(None, "/"))
ROUTES = [ADMIN, CHAT_WS, ANY_SUB_WS, SPECIAL, CATCH_ALL]


@pytest.mark.parametrize(
    ("host", "path", "expected"),
    [
        pytest.param("chat.example.com", "/admin", ADMIN, id="exact-host-prefix"),
        pytest.param("chat.example.com", "/admin/users", ADMIN, id="path-below-prefix"),
        pytest.param("chat.example.com", "/administrator", CATCH_ALL, id="whole-segments-only"),
        pytest.param("chat.example.com", "/ws", CHAT_WS, id="first-of-two-matching"),
        pytest.param("chat.example.com", "/ws/special", CHAT_WS, id="earlier-shorter-prefix-wins"),
        pytest.param("news.example.com", "/ws", ANY_SUB_WS, id="wildcard-route"),
        pytest.param("news.example.com", "/admin", CATCH_ALL, id="wildcard-path-miss"),
        pytest.param("example.com", "/ws/special", SPECIAL, id="bare-domain-skips-wildcard"),
        pytest.param("other.net", "/ws/special/x", SPECIAL, id="any-host-prefix"),
        pytest.param("other.net", "/", CATCH_ALL, id="catch-all-root"),
        pytest.param("other.net", "/admin", CATCH_ALL, id="catch-all-other-host"),
    ],
)
def test_match_route_first_match_wins(host: str, path: str, expected: Route) -> None:
    assert match_route(ROUTES, host, path) is expected


@pytest.mark.parametrize(
    ("host", "path"),
    [
        pytest.param("chat.example.com", "/", id="no-prefix-fits"),
        pytest.param("chat.example.com", "/Admin", id="prefix-is-case-sensitive"),
        pytest.param("chat.example.com", "/ad", id="path-shorter-than-prefix"),
        pytest.param("example.com", "/ws", id="bare-domain-not-wildcard"),
        pytest.param("other.net", "/ws", id="unknown-host"),
    ],
)
def test_match_route_none_without_catch_all(host: str, path: str) -> None:
    assert match_route(ROUTES[:-2], host, path) is None


def test_match_route_empty_table() -> None:
    assert match_route([], "chat.example.com", "/") is None


def test_match_route_same_rules_first_listed_wins() -> None:
    first = Route("first", Match("*.example.com", "/ws"))
    second = Route("second", Match("*.example.com", "/ws"))
    assert match_route([first, second], "a.example.com", "/ws") is first
    assert match_route([second, first], "a.example.com", "/ws") is second


# -- conditions beyond host and path, and shaping (config routes, no event loop) ------

from wsgate.config import parse_config  # noqa: E402
from wsgate.errors import HandshakeError  # noqa: E402
from wsgate.handshake import PlainGet  # noqa: E402
from wsgate.routing import Router  # noqa: E402


def _routes(*routes: dict) -> list:
    backends = [{"url": "ws://127.0.0.1:9"}]
    config = parse_config(
        {"listeners": [{"bind": "127.0.0.1:0"}], "routes": [{"backends": backends, **r} for r in routes]}
    )
    return config.routes


def _request(target: bytes = b"/", headers: dict | None = None, protocols: tuple = ()) -> PlainGet:
    by_name = {name.encode(): [value.encode()] for name, value in (headers or {}).items()}
    return PlainGet("a", target.split(b"?")[0].decode(), target, by_name, protocols)


def test_every_condition_must_hold_and_the_first_matching_route_wins() -> None:
    router = Router(_routes(
        {"name": "mqtt", "match": {"subprotocol": "mqtt"}},
        {"name": "user", "match": {"headers": {"X-User": {"regex": "a[0-9]+"}}}},
        {"name": "room", "match": {"query": {"room": "1"}, "headers": {"x-tier": "gold"}}},
        {"name": "rest"},
    ))
    def chosen(request: PlainGet) -> str:
        route = router.route_for("a", request.path, request)
        assert route is not None
        return route.name

    assert chosen(_request(protocols=(b"graphql-transport-ws", b"mqtt"))) == "mqtt"
    assert chosen(_request(headers={"x-user": "a12"})) == "user"
    assert chosen(_request(headers={"x-user": "a12x"})) == "rest"  # anchored: the whole value
    assert chosen(_request(b"/?room=1", {"x-tier": "gold"})) == "room"
    assert chosen(_request(b"/?room=1")) == "rest"  # one condition of two is not enough
    assert chosen(_request(b"/?room=%31", {"x-tier": "gold"})) == "room"  # percent-decoded


def test_verdicts_say_why_each_earlier_route_did_not_match() -> None:
    router = Router(_routes(
        {"name": "b", "match": {"host": "b.example"}},
        {"name": "mqtt", "match": {"subprotocol": "mqtt"}},
        {"name": "user", "match": {"headers": {"x-user": "x"}}},
        {"name": "rest"},
    ))
    verdicts = router.verdicts("a", "/", _request())
    assert [(v.route.name, v.failed) for v in verdicts] == [
        ("b", "host a != b.example"),
        ("mqtt", "subprotocol mqtt not offered (offered: none)"),
        ("user", "header x-user missing"),
        ("rest", None),
    ]


def test_shaping_strips_then_rewrites_the_path_and_keeps_the_query() -> None:
    (route,) = _routes({
        "name": "r", "strip_prefix": "/api",
        "rewrite": {"regex": "^/old/(.*)$", "replacement": "/new/\\1"},
    })
    shaping = Router([route]).shaping["r"]
    assert shaping.target(b"/api/old/x?room=1") == b"/new/x?room=1"
    assert shaping.target(b"/api?q") == b"/?q"  # an empty path becomes /
    assert shaping.target(b"/other") == b"/other"


def test_a_rewrite_that_makes_an_invalid_path_is_a_500() -> None:
    (route,) = _routes({"name": "r", "rewrite": {"regex": "^/(.*)$", "replacement": "\\1"}})
    with pytest.raises(HandshakeError) as caught:
        Router([route]).shaping["r"].target(b"/x")
    assert caught.value.status == 500


def test_subprotocols_are_filtered_in_the_clients_order() -> None:
    (route,) = _routes({"name": "r", "subprotocols": ["b", "a"]})
    shaping = Router([route]).shaping["r"]
    assert shaping.offered([b"a", b"c", b"b"]) == [b"a", b"b"]
    assert shaping.offered([b"c"]) == []
