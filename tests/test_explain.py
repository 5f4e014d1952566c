"""Tests of wsgate.explain, the reasoning of `wsgate explain --request` (no event loop)."""

from __future__ import annotations

from typing import Any

import pytest

from wsgate.config import Config, parse_config
from wsgate.errors import HandshakeError
from wsgate.explain import SAMPLE_KEY, explain_request, parse_request, render_explanation

BACKENDS = [{"url": f"ws://10.0.0.{i}:8000"} for i in range(1, 5)]


def config(*routes: dict[str, Any], **sections: Any) -> Config:
    return parse_config({
        "listeners": [{"bind": "127.0.0.1:0"}],
        "routes": [{"backends": BACKENDS, **route} for route in routes],
        **sections,
    })


def head_lines(upstream: bytes) -> list[str]:
    return upstream.decode("latin-1").rstrip("\r\n").split("\r\n")


@pytest.mark.parametrize(
    ("line", "headers", "says"),
    [
        pytest.param("GET", ["Host: a"], "--request: expected 'METHOD TARGET", id="no-target"),
        pytest.param("GET /x extra words", ["Host: a"], "--request: expected", id="too-many-parts"),
        pytest.param("GET /x\x01", ["Host: a"], "--request: expected", id="control-in-target"),
        pytest.param("GET /x", ["Host a"], "-H: expected 'Name: value'", id="no-colon"),
        pytest.param("GET /x", ["Bad Name: a"], "-H: expected 'Name: value'", id="bad-name"),
        pytest.param("GET /x", ["X-A: a\x00b"], "-H: expected 'Name: value'", id="bad-value"),
        pytest.param("GET /x", [], "give the Host header", id="no-host"),
    ],
)
def test_parse_request_refuses_bad_input_saying_what_is_wrong(line, headers, says):
    with pytest.raises(ValueError) as caught:
        parse_request(line, headers)
    assert says in str(caught.value)


def test_parse_request_adds_the_upgrade_headers_a_client_must_send():
    head = parse_request("GET /x?room=1 HTTP/1.1", ["Host: a", "Sec-WebSocket-Protocol: mqtt"])
    assert (head.method, head.target, head.http_version) == (b"GET", b"/x?room=1", b"1.1")
    assert dict(head.headers) == {
        b"Host": b"a", b"Sec-WebSocket-Protocol": b"mqtt", b"Upgrade": b"websocket",
        b"Connection": b"Upgrade", b"Sec-WebSocket-Key": SAMPLE_KEY, b"Sec-WebSocket-Version": b"13",
    }


def test_explains_the_earlier_routes_the_shaped_request_the_key_and_the_order():
    cfg = config(
        {"name": "other-host", "match": {"host": "b.example"}},
        {"name": "mqtt", "match": {"subprotocol": "mqtt"}},
        {"name": "users", "match": {"headers": {"x-user": {"regex": "u[0-9]+"}}}},
        {
            "name": "chat", "match": {"path_prefix": "/chat", "query": {"room": "1"}},
            "hash_key": "query:room", "retries": 1, "strip_prefix": "/chat",
            "request_headers": {"set": {"X-Route": "chat"}, "remove": ["Cookie"]},
            "response_headers": {"set": {"X-Served-By": "wsgate"}},
        },
    )
    head = parse_request("GET /chat/a?room=1", ["Host: a", "X-User: bob", "Cookie: s=1"])
    explanation = explain_request(cfg, head, "203.0.113.5")
    assert [(v.route.name, v.failed) for v in explanation.verdicts] == [
        ("other-host", "host a != b.example"),
        ("mqtt", "subprotocol mqtt not offered (offered: none)"),
        ("users", "header x-user 'bob' does not match regex 'u[0-9]+'"),
        ("chat", None),
    ]
    assert explanation.route is cfg.routes[3]
    lines = head_lines(explanation.upstream)
    assert lines[0] == "GET /a?room=1 HTTP/1.1"
    assert "X-Route: chat" in lines and not any(line.startswith("Cookie") for line in lines)
    assert "X-Forwarded-For: 203.0.113.5" in lines
    assert lines.index("X-Route: chat") < lines.index("X-Forwarded-For: 203.0.113.5")
    assert explanation.response_edits == ("X-Served-By: wsgate",)
    assert explanation.key == b"1"
    # The order is the one the gateway's pool tries for that key, all healthy.
    balancer = pytest.importorskip("wsgate.balancer")  # the shell: absent where only the core installs
    pool = balancer.Pool(cfg.routes[3], cfg.discovery)
    assert explanation.order[: explanation.tried] == tuple(m.identity for m in pool.candidates(b"1", 0.0))
    assert explanation.tried == 2 and sorted(explanation.order) == [b["url"] for b in BACKENDS]
    text = render_explanation(explanation)
    assert "  users: no: header x-user 'bob' does not match regex 'u[0-9]+'\n" in text
    assert f"  1. {explanation.order[0]}  chosen\n" in text
    assert f"  3. {explanation.order[2]}  not tried (retries)\n" in text


def test_no_route_says_404_and_why_each_route_failed():
    cfg = config({"name": "chat", "match": {"path_prefix": "/chat"}})
    explanation = explain_request(cfg, parse_request("GET /other", ["Host: a"]), "127.0.0.1")
    assert explanation.route is None
    assert render_explanation(explanation).endswith(
        "  chat: no: path /other is not under /chat\nno route matched: the gateway answers 404\n"
    )


def test_a_trusted_proxy_s_client_is_the_key_and_the_forwarded_chain():
    cfg = config({"name": "r"}, trusted_proxies=["10.0.0.0/8"])
    head = parse_request("GET /", ["Host: a", "X-Forwarded-For: 198.51.100.7"])
    explanation = explain_request(cfg, head, "10.1.1.1")
    assert explanation.client_ip == "198.51.100.7" and explanation.key == b"198.51.100.7"
    assert "X-Forwarded-For: 198.51.100.7, 10.1.1.1" in head_lines(explanation.upstream)


def test_an_absent_key_falls_back_to_the_address_or_to_random():
    by_ip = config({"name": "r", "hash_key": "header:x-user"})
    explanation = explain_request(by_ip, parse_request("GET /", ["Host: a"]), "192.0.2.9")
    assert (explanation.key, explanation.key_fell_back) == (b"192.0.2.9", True)
    assert "(header:x-user is absent: the client address)" in render_explanation(explanation)
    random = config({"name": "r", "hash_key": "header:x-user", "hash_fallback": "random"})
    explanation = explain_request(random, parse_request("GET /", ["Host: a"]), "192.0.2.9")
    assert explanation.key is None and explanation.order == ()
    assert "a random key per connection" in render_explanation(explanation)


def test_dns_backends_are_resolved_at_run_time():
    cfg = parse_config({
        "listeners": [{"bind": "127.0.0.1:0"}],
        "routes": [{"name": "r", "backends": [{"url": "ws://10.0.0.1:8000"}, {"dns": "chat.svc:8000"}]}],
    })
    explanation = explain_request(cfg, parse_request("GET /", ["Host: a"]), "127.0.0.1")
    assert explanation.order == ("ws://10.0.0.1:8000",)
    assert "  dns chat.svc:8000: resolved at run time" in render_explanation(explanation)


@pytest.mark.parametrize(
    ("route", "status"),
    [
        pytest.param({"rewrite": {"regex": "^/(.*)$", "replacement": "\\1"}}, 500, id="rewrite-invalid"),
        pytest.param({"allowed_origins": ["https://a.example"]}, 403, id="origin"),
    ],
)
def test_a_matched_route_that_refuses_the_request_says_so(route, status):
    cfg = config({"name": "r", **route})
    head = parse_request("GET /x", ["Host: a", "Origin: https://evil.example"])
    explanation = explain_request(cfg, head, "127.0.0.1")
    assert explanation.route is cfg.routes[0] and explanation.refusal is not None
    assert explanation.refusal.status == status
    assert f"route r refuses it: the gateway answers {status}" in render_explanation(explanation)


def test_a_request_refused_before_routing_raises_its_handshake_error():
    with pytest.raises(HandshakeError) as caught:
        explain_request(config({"name": "r"}), parse_request("POST /x", ["Host: a"]), "127.0.0.1")
    assert caught.value.status == 405
