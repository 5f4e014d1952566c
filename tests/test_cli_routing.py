"""`wsgate check --effective` and `wsgate explain --request` as a user runs them: real processes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent

CONFIG = """\
listeners: [{bind: "127.0.0.1:0"}]
timeouts: {idle: 120s}
routes:
  - name: mqtt
    match: {host: a, subprotocol: mqtt}
    backends: [{url: "ws://10.0.0.1:8000"}]
    timeouts: {idle: 30s}
    heartbeat: {interval: 5s}
    limits: {max_message_size: 1000}
    flow_control: {high_water: 1MiB}
    compression: strip
    subprotocols: [mqtt]
  - name: chat
    match: {path_prefix: /x, query: {room: {regex: "[0-9]+"}}, headers: {X-Tier: gold}}
    hash_key: query:room
    retries: 1
    backends: [{url: "ws://10.0.0.1:8000"}, {url: "ws://10.0.0.2:8000"}, {url: "ws://10.0.0.3:8000"}]
    strip_prefix: /x
    rewrite: {regex: "^/old/(.*)$", replacement: "/new/\\\\1"}
    request_headers: {set: {X-Route: chat}, remove: [Cookie]}
    response_headers: {set: {X-Served-By: wsgate}}
  - name: rest
    backends: [{dns: "rest.svc:8000"}]
"""


def wsgate_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "wsgate", *args], capture_output=True, text=True, timeout=60)


@pytest.fixture
def config_path(tmp_path: Path) -> str:
    path = tmp_path / "wsgate.yaml"
    path.write_text(CONFIG)
    return str(path)


# -- check --effective ------------------------------------------------------------------


def test_check_effective_prints_each_route_s_settings_match_and_shaping(config_path):
    result = wsgate_cli("check", "-c", config_path, "--effective")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"# {config_path}: OK")
    routes = {route["name"]: route for route in yaml.safe_load(result.stdout)["routes"]}
    assert list(routes) == ["mqtt", "chat", "rest"]  # match order
    mqtt, chat, rest = routes["mqtt"], routes["chat"], routes["rest"]
    # Partial overrides: what the route leaves out is the global value.
    assert mqtt["timeouts"] == {"connect": "5s", "idle": "30s", "close": "5s"}
    assert mqtt["heartbeat"] == {"interval": "5s", "timeout": "10s"}
    assert mqtt["limits"] == {"max_message_size": 1000}
    assert mqtt["flow_control"] == {"high_water": "1MiB", "low_water": "64KiB"}
    assert mqtt["compression"] == "strip"
    assert mqtt["from_route"] == [
        "timeouts.idle", "heartbeat.interval", "limits.max_message_size", "flow_control.high_water"
    ]
    assert mqtt["match"] == {
        "host": "a", "path_prefix": "/", "subprotocol": "mqtt", "headers": {}, "query": {}
    }
    assert mqtt["shaping"]["subprotocols"] == ["mqtt"]
    assert rest["timeouts"]["idle"] == "2m" and rest["from_route"] == []
    assert rest["limits"] == {"max_message_size": "16MiB"}
    assert chat["match"]["headers"] == {"x-tier": "gold"}
    assert chat["match"]["query"] == {"room": {"regex": "[0-9]+"}}
    assert chat["shaping"] == {
        "strip_prefix": "/x",
        "rewrite": {"regex": "^/old/(.*)$", "replacement": "/new/\\1"},
        "request_headers": {"set": {"X-Route": "chat"}, "remove": ["cookie"]},
        "response_headers": {"set": {"X-Served-By": "wsgate"}, "remove": []},
        "subprotocols": None,
    }


def test_check_without_effective_is_unchanged(config_path):
    result = wsgate_cli("check", "-c", config_path)
    assert result.returncode == 0, result.stderr
    routes = "mqtt (1 backends), chat (3 backends), rest (1 backends)"
    assert result.stdout == f"{config_path}: OK; routes: {routes}\n"


def test_check_effective_on_a_bad_config_exits_2_with_the_key(tmp_path):
    path = tmp_path / "wsgate.yaml"
    path.write_text(CONFIG.replace("timeouts: {idle: 30s}", "timeouts: {handshake: 30s}"))
    result = wsgate_cli("check", "-c", str(path), "--effective")
    assert result.returncode == 2
    assert "routes[0].timeouts.handshake: applies to the whole gateway only" in result.stderr
    assert result.stdout == ""


# -- explain --request ---------------------------------------------------------------------


def test_explain_request_shows_the_route_why_not_the_others_the_shaped_request_and_the_order(config_path):
    result = wsgate_cli(
        "explain", "-c", config_path, "--request", "GET /x/old/y?room=42", "-H", "Host: a",
        "-H", "X-Tier: gold", "-H", "Cookie: s=1", "--client-ip", "198.51.100.4",
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[:4] == [
        "request: GET /x/old/y?room=42 (host a, client 198.51.100.4)",
        "routes, in order (the first that matches wins):",
        "  mqtt: no: subprotocol mqtt not offered (offered: none)",
        "  chat: matched",
    ]
    assert "  GET /new/y?room=42 HTTP/1.1" in lines
    assert "  X-Route: chat" in lines and not any(line.startswith("  Cookie") for line in lines)
    assert "  X-Forwarded-For: 198.51.100.4" in lines
    assert "the 101 toward the client also gets: X-Served-By: wsgate" in lines
    assert "hash key: query:room = '42'" in lines
    order = [line.split()[1] for line in lines if line.startswith(("  1. ", "  2. ", "  3. "))]
    assert sorted(order) == ["ws://10.0.0.1:8000", "ws://10.0.0.2:8000", "ws://10.0.0.3:8000"]
    assert lines[-3:] == [f"  1. {order[0]}  chosen", f"  2. {order[1]}  fallback",
                          f"  3. {order[2]}  not tried (retries)"]
    # The same key gives the same order in every run, as in every gateway process.
    again = wsgate_cli(
        "explain", "-c", config_path, "--request", "GET /x?room=42", "-H", "Host: a", "-H", "X-Tier: gold"
    )
    assert again.stdout.splitlines()[-3:] == lines[-3:]


def test_explain_request_on_a_dns_route_says_resolved_at_run_time(config_path):
    result = wsgate_cli("explain", "-c", config_path, "--request", "GET /elsewhere", "-H", "Host: b")
    assert result.returncode == 0, result.stderr
    assert "  rest: matched" in result.stdout
    assert "  dns rest.svc:8000: resolved at run time" in result.stdout


def test_explain_request_matching_no_route_exits_1(tmp_path):
    path = tmp_path / "wsgate.yaml"
    path.write_text(CONFIG.split("  - name: rest")[0])
    result = wsgate_cli("explain", "-c", str(path), "--request", "GET /elsewhere", "-H", "Host: b")
    assert result.returncode == 1, result.stderr
    assert result.stdout.splitlines()[-3:] == [
        "  mqtt: no: host b != a",
        "  chat: no: path /elsewhere is not under /x",
        "no route matched: the gateway answers 404",
    ]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        pytest.param(["--request", "GET"], "--request: expected 'METHOD TARGET", id="bad-request"),
        pytest.param(["--request", "GET /", "-H", "Host"], "-H: expected 'Name: value'", id="bad-header"),
        pytest.param(["--request", "GET /"], "give the Host header", id="no-host"),
        pytest.param(["--request", "GET /", "-H", "Host: a", "--client-ip", "nope"], "does not appear to be",
                     id="bad-client-ip"),
        pytest.param(["--request", "GET /a/../b", "-H", "Host: a"],
                     "refuses this request before routing: 400", id="refused-before-routing"),
        pytest.param(["--request", "GET /", "-H", "Host: a", "--route", "chat"], "--request takes no --route",
                     id="request-and-route"),
        pytest.param([], "give --request", id="neither"),
    ],
)
def test_explain_request_bad_input_exits_2_with_a_clear_message(config_path, args, message):
    result = wsgate_cli("explain", "-c", config_path, *args)
    assert result.returncode == 2, result.stdout
    assert message in result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_explain_request_with_a_bad_config_exits_2(tmp_path):
    path = tmp_path / "wsgate.yaml"
    path.write_text(CONFIG.replace('{regex: "[0-9]+"}', '{regex: "[0-9"}'))
    result = wsgate_cli("explain", "-c", str(path), "--request", "GET /", "-H", "Host: a")
    assert result.returncode == 2
    assert "routes[1].match.query.room: invalid regular expression" in result.stderr
