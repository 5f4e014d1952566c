"""Table-driven tests of wsgate.routing (no event loop)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from wsgate.routing import host_matches, match_route


@dataclass(frozen=True)
class Match:
    host: str | None = None
    path_prefix: str = "/"


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
        pytest.param("chat.example.com", "/administrator", ADMIN, id="plain-string-prefix"),
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
