"""The processes under test: the echo backend and each proxy, started and stopped on 127.0.0.1.

Our Python servers bind port 0 and print the port; nginx, HAProxy and Caddy
get a port found free by binding 0 and closing, and are ready once they accept
TCP. Every process runs in its own session, so stopping it kills its whole
process group (nginx's worker with its master).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from . import procstat
from .wire import raise_nofile

HOST = "127.0.0.1"
REPO = Path(__file__).resolve().parent.parent
START_TIMEOUT = 20.0


class StartError(Exception):
    """A target could not be started: a one-line reason, and the end of its log in `log`."""

    def __init__(self, reason: str, log: str) -> None:
        last = next((line.strip() for line in reversed(log.splitlines()) if line.strip()), "")
        super().__init__(f"{reason}: {last}" if last else reason)
        self.log = log


def find_binary(name: str) -> str | None:
    """`name` on PATH, or in the sbin directories a non-root PATH often lacks."""
    found = shutil.which(name)
    if found:
        return found
    for folder in ("/usr/sbin", "/usr/local/sbin", "/sbin"):
        if os.access(f"{folder}/{name}", os.X_OK):
            return f"{folder}/{name}"
    return None


def free_port() -> int:
    """A port that was free a moment ago (for servers that cannot report a port-0 bind)."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def _child_setup() -> None:
    # Runs in the child before exec: 10,000 idle connections need 20,000+ descriptors.
    raise_nofile()


class Proc:
    """A child process in its own session, with its output in a log file."""

    def __init__(self, name: str, argv: list[str], workdir: Path, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.log_path = workdir / f"{name}.log"
        with open(self.log_path, "wb") as log:
            self.popen = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                cwd=REPO, env=env, start_new_session=True, preexec_fn=_child_setup,
            )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def _check_alive(self) -> None:
        if self.popen.poll() is not None:
            raise StartError(f"{self.name} exited with status {self.popen.returncode}", self.log_tail())

    def wait_for_port(self, timeout: float = START_TIMEOUT) -> int:
        """The port from the `listening on HOST:PORT` line the process prints."""
        deadline = time.monotonic() + timeout
        pattern = re.compile(r"listening on [\d.]+:(\d+)")
        while time.monotonic() < deadline:
            match = pattern.search(self.log_path.read_text(errors="replace"))
            if match:
                return int(match.group(1))
            self._check_alive()
            time.sleep(0.05)
        raise StartError(f"{self.name} did not report its port within {timeout:.0f}s", self.log_tail())

    def wait_for_tcp(self, port: int, timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                socket.create_connection((HOST, port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        raise StartError(f"{self.name} did not accept TCP on port {port} within {timeout:.0f}s", self.log_tail())

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM to the process group, SIGKILL to whatever is left after `timeout`."""
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 2.0)):
            try:
                os.killpg(self.popen.pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                self.popen.wait(wait)
            except subprocess.TimeoutExpired:
                continue
        # The leader is gone; kill stragglers of the group (an orphaned worker).
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def _version(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown ({exc})"
    text = (done.stdout + done.stderr).strip()
    return text.splitlines()[0] if text else "unknown"


class Target:
    """A way to reach the backend: a proxy process, or nothing (direct)."""

    name = "?"
    binary: str | None = None  # an external program it needs

    def __init__(self, fd_limit: int = 1 << 20) -> None:
        self.port = 0
        self.proc: Proc | None = None
        # Descriptors a child may open (RLIMIT_NOFILE after raising it): the
        # nginx and HAProxy connection caps are sized to fit, or they refuse to start.
        self.fd_limit = fd_limit
        self.backend_port = 0
        self.workdir: Path | None = None

    def missing(self) -> str | None:
        """Why this target cannot run here, or None."""
        if self.binary and find_binary(self.binary) is None:
            return f"{self.binary} is not installed"
        return None

    def version(self) -> str:
        return ""

    def start(self, backend_port: int, workdir: Path) -> None:
        raise NotImplementedError

    def restart(self) -> None:
        """A fresh process on the same backend (ports may change)."""
        assert self.workdir is not None
        self.stop()
        self.start(self.backend_port, self.workdir)

    def launch(self, backend_port: int, workdir: Path) -> None:
        """`start`, remembering its arguments for `restart`."""
        self.backend_port, self.workdir = backend_port, workdir
        self.start(backend_port, workdir)

    def pids(self) -> list[int]:
        """The proxy's processes now (empty for direct connections)."""
        return procstat.tree(self.proc.pid) if self.proc else []

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()


class Backend(Target):
    name = "backend"

    def start(self, backend_port: int, workdir: Path) -> None:
        self.proc = Proc("backend", [sys.executable, "-m", "bench.echo_backend", "--port", "0"], workdir)
        self.port = self.proc.wait_for_port()


class Direct(Target):
    name = "direct"

    def version(self) -> str:
        return "no proxy: the generator talks to the backend"

    def start(self, backend_port: int, workdir: Path) -> None:
        self.port = backend_port


class Wsgate(Target):
    name = "wsgate"

    def version(self) -> str:
        return _version([sys.executable, "-m", "wsgate", "--version"])

    def start(self, backend_port: int, workdir: Path) -> None:
        config = workdir / "wsgate.yaml"
        config.write_text(
            "# Written by the benchmark: one listener, one route, limits out of the way.\n"
            "listeners:\n  - name: bench\n    bind: 127.0.0.1:0\n"
            "admin:\n  enabled: false\n"
            f"routes:\n  - name: bench\n    backends:\n      - url: ws://{HOST}:{backend_port}\n"
            "timeouts: {handshake: 10s, connect: 5s, idle: 0, close: 5s}\n"
            "heartbeat: {interval: 30s, timeout: 10s}\n"
            "limits: {max_connections: 100000, max_connections_per_ip: 100000, max_message_size: 0}\n"
            "shutdown: {drain_period: 1s, grace_period: 2s}\n"
            "log: {level: info, format: text}\n"
        )
        self.proc = Proc("wsgate", [sys.executable, "-m", "wsgate", "run", "-c", str(config)], workdir)
        self.port = self.proc.wait_for_port()


class Naive(Target):
    name = "aiohttp-naive"

    def version(self) -> str:
        from importlib.metadata import version

        return f"aiohttp {version('aiohttp')} (bench/naive_proxy.py)"

    def start(self, backend_port: int, workdir: Path) -> None:
        argv = [sys.executable, "-m", "bench.naive_proxy", "--port", "0", "--backend", f"{HOST}:{backend_port}"]
        self.proc = Proc("aiohttp-naive", argv, workdir)
        self.port = self.proc.wait_for_port()


class Nginx(Target):
    name = "nginx"
    binary = "nginx"

    def version(self) -> str:
        return _version([find_binary("nginx") or "nginx", "-v"])

    def start(self, backend_port: int, workdir: Path) -> None:
        prefix = workdir / "nginx"
        prefix.mkdir(exist_ok=True)
        self.port = free_port()
        # nginx only honours `user` when started as root; elsewhere it would just warn.
        user = "user root;\n" if os.geteuid() == 0 else ""
        (prefix / "nginx.conf").write_text(
            f"{user}worker_processes 1;\ndaemon off;\nmaster_process on;\n"
            f"pid {prefix}/nginx.pid;\nerror_log {prefix}/error.log warn;\n"
            f"worker_rlimit_nofile {self.fd_limit};\n"
            # Not capped by fd_limit: nginx needs connection slots beyond its
            # descriptors, and a cap of 19,900 ran out at 9,300 proxied connections.
            "events { worker_connections 30000; }\n"
            "http {\n"
            "    access_log off;\n"
            f"    client_body_temp_path {prefix}/body;\n    proxy_temp_path {prefix}/proxy;\n"
            f"    server {{\n        listen {HOST}:{self.port};\n"
            "        location / {\n"
            f"            proxy_pass http://{HOST}:{backend_port};\n"
            "            proxy_http_version 1.1;\n"
            "            proxy_set_header Upgrade $http_upgrade;\n"
            '            proxy_set_header Connection "upgrade";\n'
            "            proxy_read_timeout 1h;\n"
            "        }\n    }\n}\n"
        )
        binary = find_binary("nginx") or "nginx"
        argv = [binary, "-p", f"{prefix}/", "-c", str(prefix / "nginx.conf"), "-e", str(prefix / "error.log")]
        self.proc = Proc("nginx", argv, workdir)
        self.proc.wait_for_tcp(self.port)


class Haproxy(Target):
    name = "haproxy"
    binary = "haproxy"

    def version(self) -> str:
        return _version([find_binary("haproxy") or "haproxy", "-v"])

    def start(self, backend_port: int, workdir: Path) -> None:
        self.port = free_port()
        config = workdir / "haproxy.cfg"
        # HAProxy needs about two descriptors per connection and refuses to start without them.
        maxconn = min(30000, (self.fd_limit - 200) // 2)
        config.write_text(
            f"global\n    nbthread 1\n    maxconn {maxconn}\n"
            f"defaults\n    mode http\n    maxconn {maxconn}\n"
            "    timeout connect 5s\n    timeout client 1h\n    timeout server 1h\n    timeout tunnel 1h\n"
            f"frontend bench\n    bind {HOST}:{self.port}\n    default_backend echo\n"
            f"backend echo\n    server echo1 {HOST}:{backend_port}\n"
        )
        binary = find_binary("haproxy") or "haproxy"
        self.proc = Proc("haproxy", [binary, "-db", "-f", str(config)], workdir)
        self.proc.wait_for_tcp(self.port)


class Caddy(Target):
    name = "caddy"
    binary = "caddy"

    def version(self) -> str:
        return "caddy " + _version([find_binary("caddy") or "caddy", "version"])

    def start(self, backend_port: int, workdir: Path) -> None:
        self.port = free_port()
        home = workdir / "caddy"
        home.mkdir(exist_ok=True)
        config = workdir / "Caddyfile"
        # `bind` keeps Caddy on loopback: a site address alone names the Host to
        # match, while the listener would be on every interface.
        config.write_text(
            "{\n\tadmin off\n\tauto_https off\n}\n"
            f"http://{HOST}:{self.port} {{\n\tbind {HOST}\n\treverse_proxy {HOST}:{backend_port}\n}}\n"
        )
        env = dict(os.environ, GOMAXPROCS="1", HOME=str(home),
                   XDG_DATA_HOME=str(home / "data"), XDG_CONFIG_HOME=str(home / "config"))
        binary = find_binary("caddy") or "caddy"
        self.proc = Proc("caddy", [binary, "run", "--config", str(config), "--adapter", "caddyfile"], workdir, env)
        self.proc.wait_for_tcp(self.port)


ALL_TARGETS: dict[str, type[Target]] = {
    cls.name: cls for cls in (Wsgate, Nginx, Haproxy, Caddy, Naive, Direct)
}
# The proxies wsgate is compared with ("best peer" picks among these).
PEERS = ("nginx", "haproxy", "caddy", "aiohttp-naive")
