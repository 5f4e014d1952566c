"""The command line as a user runs it: real processes, exit codes, messages."""

from __future__ import annotations

import asyncio
import json
import os
import re
import resource
import signal
import socket
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
import websockets
from peers import STEP_TIMEOUT

import wsgate

REPO = Path(__file__).resolve().parent.parent


def wsgate_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "wsgate", *args], capture_output=True, text=True, timeout=60
    )


def test_version():
    result = wsgate_cli("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"wsgate {wsgate.__version__}"


def test_check_accepts_the_example_configs():
    for name in ("wsgate.yaml", "demo.yaml"):
        result = wsgate_cli("check", "-c", str(REPO / "config" / name))
        assert result.returncode == 0, result.stderr
        assert "OK" in result.stdout


VALID = """\
listeners: [{bind: "127.0.0.1:0"}]
admin: {bind: "127.0.0.1:0"}
routes:
  - name: chat
    backends: [{url: "ws://127.0.0.1:9"}]
"""

BROKEN = [
    pytest.param(None, "cannot read config file", id="missing-file"),
    pytest.param("listeners: [\n  bind: x\n", "invalid YAML at line", id="invalid-yaml"),
    pytest.param(VALID + "tiemouts: {}\n", "tiemouts: unknown key", id="unknown-key"),
    pytest.param(VALID + "timeouts: {connect: 5 seconds}\n", "timeouts.connect: expected a duration", id="bad-duration"),
    pytest.param(VALID.replace("ws://127.0.0.1:9", "http://x"), "routes[0].backends[0].url: expected a ws:// or wss:// URL", id="bad-url"),
    # YAML's "\0" is a NUL, which would split the request sent upstream.
    pytest.param(VALID + '    upstream_host: "chat\\0internal"\n', "routes[0].upstream_host: expected a Host header",
                 id="nul-in-upstream-host"),
]


def test_every_script_runs_on_its_own():
    """A script run directly (not through bash) needs its interpreter line."""
    for script in sorted((REPO / "scripts").glob("*.sh")):
        assert script.read_text().startswith("#!/usr/bin/env bash\n"), script.name
        assert os.access(script, os.X_OK), script.name


def test_help_lists_only_commands_for_people():
    result = wsgate_cli("--help")
    assert result.returncode == 0
    assert "_worker" not in result.stdout
    assert "SUPPRESS" not in result.stdout
    for command in ("run", "check", "explain", "demo", "echo-backend"):
        assert re.search(rf"^\s+{command}\s", result.stdout, re.MULTILINE), result.stdout


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([], "give at least one --key or a --keys file"),
        (["--keys", "/nonexistent/keys.txt"], "cannot read /nonexistent/keys.txt"),
        (["--route", "nope", "--key", "a"], "no route named 'nope'"),
    ],
    ids=["no-key", "unreadable-keys-file", "unknown-route"],
)
def test_explain_usage_errors_exit_2(tmp_path, extra, message):
    path = tmp_path / "wsgate.yaml"
    path.write_text(VALID)
    route = [] if "--route" in extra else ["--route", "chat"]
    result = wsgate_cli("explain", "-c", str(path), *route, *extra)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(("content", "message"), BROKEN)
@pytest.mark.parametrize("command", ["check", "run"])
def test_config_errors_exit_2_with_file_key_and_reason(tmp_path, command, content, message):
    path = tmp_path / "wsgate.yaml"
    if content is not None:
        path.write_text(content)
    result = wsgate_cli(command, "-c", str(path))
    assert result.returncode == 2
    assert str(path) in result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_check_substitutes_environment_variables_and_names_the_key_of_an_unset_one(tmp_path):
    path = tmp_path / "wsgate.yaml"
    path.write_text(VALID.replace("ws://127.0.0.1:9", "ws://${WSGATE_T_BACKEND_HOST}:9"))
    environment = {k: v for k, v in os.environ.items() if k != "WSGATE_T_BACKEND_HOST"}
    unset = subprocess.run(
        [sys.executable, "-m", "wsgate", "check", "-c", str(path)],
        capture_output=True, text=True, timeout=60, env=environment,
    )
    assert unset.returncode == 2, unset.stderr
    key = "routes[0].backends[0].url"
    assert f"{path}: {key}: environment variable WSGATE_T_BACKEND_HOST is not set" in unset.stderr
    assert "Traceback" not in unset.stderr
    resolved = subprocess.run(
        [sys.executable, "-m", "wsgate", "check", "-c", str(path)],
        capture_output=True, text=True, timeout=60, env={**environment, "WSGATE_T_BACKEND_HOST": "127.0.0.1"},
    )
    assert resolved.returncode == 0, resolved.stderr
    assert "OK" in resolved.stdout


def test_run_serves_until_sigterm(tmp_path):
    path = tmp_path / "wsgate.yaml"
    path.write_text(VALID)
    process = subprocess.Popen(
        [sys.executable, "-m", "wsgate", "run", "-c", str(path)],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = _read_until(process.stderr, "listening on")
        assert re.search(r"listening on 127\.0\.0\.1:\d+", line)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=STEP_TIMEOUT) == 0
    finally:
        process.kill()


def _soft_nofile(pid: int) -> int:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return int(line.split()[3])
    raise AssertionError("no open-file limit in /proc")


@pytest.mark.parametrize("max_connections", [100, None])
def test_run_raises_its_open_file_limit_and_warns_when_max_connections_cannot_fit(
    tmp_path, max_connections
):
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard < 2048:
        pytest.skip("needs a finite hard open-file limit above 2,048")
    # None: as many connections as the hard limit has descriptors, which cannot fit.
    wanted = max_connections or hard
    path = tmp_path / "wsgate.yaml"
    path.write_text(VALID + f"limits: {{max_connections: {wanted}}}\n")
    process = subprocess.Popen(
        [sys.executable, "-m", "wsgate", "run", "-c", str(path)],
        stderr=subprocess.PIPE,
        text=True,
        # Started with the soft limit many systems give: 1,024.
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard)),
    )
    try:
        stderr = []
        for _ in range(50):
            stderr.append(process.stderr.readline())
            if "listening on" in stderr[-1] or not stderr[-1]:
                break
        assert _soft_nofile(process.pid) == hard
        warned = [line for line in stderr if "open files" in line]
        if max_connections is None:
            assert len(warned) == 1, stderr
            assert f"limits.max_connections is {hard}" in warned[0]
            assert f"may open {hard}" in warned[0]
        else:
            assert warned == [], stderr
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=STEP_TIMEOUT) == 0
    finally:
        process.kill()


def _read_until(stream, marker: str) -> str:
    for _ in range(50):
        line = stream.readline()
        if marker in line or not line:
            return line
    raise AssertionError(f"{marker!r} never printed")


async def test_demo_serves_its_chat_page_and_a_room_through_the_gateway():
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "wsgate", "demo", "--port", "0", "--admin-port", "0",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        url = None
        async with asyncio.timeout(STEP_TIMEOUT):
            while url is None:
                line = (await process.stdout.readline()).decode()
                assert line, "the demo exited before printing its URL"
                if match := re.search(r"open (http://\S+/) in a browser", line):
                    url = match.group(1)
            async with aiohttp.ClientSession() as session:
                async with session.get(url) as response:
                    assert response.status == 200
                    assert response.content_type == "text/html"
                    assert "chat.js" in await response.text()
            async with websockets.connect(url.replace("http://", "ws://") + "chat?room=lobby") as ws:
                backend = ws.response.headers["X-Demo-Backend"]
                assert backend in ("chat-1", "chat-2", "chat-3")
                hello = json.loads(await ws.recv())
                assert (hello["type"], hello["backend"], hello["room"]) == ("hello", backend, "lobby")
                await ws.send("hello through the gateway")
                said = json.loads(await ws.recv())
                assert (said["type"], said["backend"]) == ("message", backend)
                assert said["data"] == "hello through the gateway"
            process.send_signal(signal.SIGINT)
            assert await process.wait() == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_echo_backend_echoes_under_its_name_and_stops_on_sigterm():
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "wsgate", "echo-backend", "--port", "0", "--name", "echo-a",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(STEP_TIMEOUT):
            line = (await process.stdout.readline()).decode()
            match = re.fullmatch(r"wsgate echo-backend echo-a: listening on (ws://127\.0\.0\.1:\d+)\n", line)
            assert match, line + (await process.stderr.read()).decode()
            async with websockets.connect(match.group(1) + "/any/path") as ws:
                assert ws.response.headers["X-Echo-Backend"] == "echo-a"
                for message in ("hello", b"\x00\xff" * 1000):
                    await ws.send(message)
                    assert await ws.recv() == message
            process.send_signal(signal.SIGTERM)
            assert await process.wait() == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


def test_echo_backend_on_a_port_in_use_fails_with_one_line():
    with _taken_port() as taken:
        port = taken.getsockname()[1]
        result = wsgate_cli("echo-backend", "--port", str(port))
    assert result.returncode == 1
    assert result.stderr == f"wsgate: --port: cannot listen on 127.0.0.1:{port}: address already in use\n"


# -- a port in use: one error naming the key, nothing announced, nothing left running ----------


def _taken_port() -> socket.socket:
    """A socket listening on 127.0.0.1 at an ephemeral port, so that binding the port fails."""
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    return taken


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("taken_key", ["listeners[1].bind", "admin.bind"])
def test_a_port_in_use_fails_the_start_with_one_error_naming_its_key(tmp_path, workers, taken_key):
    with _taken_port() as taken:
        port = taken.getsockname()[1]
        second = f"127.0.0.1:{port}" if taken_key == "listeners[1].bind" else "127.0.0.1:0"
        admin = f"127.0.0.1:{port}" if taken_key == "admin.bind" else "127.0.0.1:0"
        path = tmp_path / "wsgate.yaml"
        path.write_text(
            f"workers: {workers}\n"
            f'listeners: [{{name: one, bind: "127.0.0.1:0"}}, {{name: two, bind: "{second}"}}]\n'
            f'admin: {{bind: "{admin}"}}\n'
            'routes: [{name: chat, backends: [{url: "ws://127.0.0.1:9"}]}]\n'
        )
        result = wsgate_cli("run", "-c", str(path))
    assert result.returncode == 1, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("wsgate: ")]
    assert errors == [f"wsgate: {taken_key}: cannot listen on 127.0.0.1:{port}: address already in use"]
    assert "listening on" not in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(("flag", "hint"), [("--port", "WebSocket port"), ("--admin-port", "admin port")])
def test_the_demo_names_the_flag_of_a_port_in_use(flag, hint):
    with _taken_port() as taken:
        port = str(taken.getsockname()[1])
        ports = {"--port": "0", "--admin-port": "0", flag: port}
        result = wsgate_cli("demo", *(item for pair in ports.items() for item in pair))
    assert result.returncode == 1, result.stderr
    assert f"cannot listen on 127.0.0.1:{port}: address already in use" in result.stderr
    assert f"the demo's {hint}; choose another with {flag}" in result.stderr
    assert "listening on" not in result.stderr
