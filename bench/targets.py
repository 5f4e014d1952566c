"""The processes under test: the echo backend and each proxy, started and stopped on 127.0.0.1.

Our Python servers bind port 0 and print the port; nginx, HAProxy and Caddy
get a port found free by binding 0 and closing, and are ready once they accept
TCP. Every process runs in its own session, so stopping it kills its whole
process group (nginx's worker with its master).

The `-tls` targets terminate TLS toward the clients (the backend leg stays
plain ws://) with a certificate made by trustme when the benchmark starts.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass
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

    def __init__(
        self, name: str, argv: list[str], workdir: Path, env: dict[str, str] | None = None,
        cwd: Path = REPO,
    ) -> None:
        self.name = name
        self.log_path = workdir / f"{name}.log"
        with open(self.log_path, "wb") as log:
            self.popen = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                cwd=cwd, env=env, start_new_session=True, preexec_fn=_child_setup,
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


# -- TLS --------------------------------------------------------------------------

SERVER_NAME = "localhost"  # the name clients ask for (SNI) and check the certificate against


@dataclass(frozen=True)
class TestCerts:
    """A throwaway CA and a server certificate it signed, as files for the proxies."""

    ca_pem: str  # the CA certificate, which the clients trust
    cert: Path  # the server certificate and its chain, PEM
    key: Path
    description: str
    server_name: str = SERVER_NAME


def make_test_certs(workdir: Path) -> TestCerts:
    """A new CA and a certificate for localhost and 127.0.0.1 (ECDSA P-256, trustme's default)."""
    import trustme

    ca = trustme.CA(organization_name="wsgate bench")
    leaf = ca.issue_cert(SERVER_NAME, HOST)
    folder = workdir / "tls"
    folder.mkdir(exist_ok=True)
    cert, key = folder / "server.pem", folder / "server.key"
    leaf.private_key_pem.write_to_path(str(key))
    with open(cert, "wb") as f:
        for blob in leaf.cert_chain_pems:
            f.write(blob.bytes())
    return TestCerts(ca_pem=ca.cert_pem.bytes().decode(), cert=cert, key=key,
                     description="ECDSA P-256 certificate from a test CA (trustme)")


def client_context(ca_pem: str) -> ssl.SSLContext:
    """What the benchmark's clients use: TLS 1.2+, the chain and host name checked against the test CA.

    Every connection makes a full handshake: nothing hands a session back for resumption.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_verify_locations(cadata=ca_pem)
    context.set_alpn_protocols(["http/1.1"])
    return context


def _negotiated(port: int, certs: TestCerts) -> str:
    """The protocol and cipher a client gets from the listener on `port`."""
    try:
        with socket.create_connection((HOST, port), timeout=5) as raw, \
                client_context(certs.ca_pem).wrap_socket(raw, server_hostname=certs.server_name) as sock:
            cipher = sock.cipher()
            return f"{sock.version()} {cipher[0] if cipher else '?'}"
    except (OSError, ssl.SSLError) as exc:
        return f"no TLS handshake ({exc})"


class Target:
    """A way to reach the backend: a proxy process, or nothing (direct)."""

    name = "?"
    binary: str | None = None  # an external program it needs
    tls = False  # clients connect with TLS, using `certs`

    def __init__(self, fd_limit: int = 1 << 20) -> None:
        self.port = 0
        self.proc: Proc | None = None
        # Descriptors a child may open (RLIMIT_NOFILE after raising it): the
        # nginx and HAProxy connection caps are sized to fit, or they refuse to start.
        self.fd_limit = fd_limit
        self.backend_port = 0
        self.workdir: Path | None = None
        self.certs: TestCerts | None = None  # set before `launch` for TLS targets

    def missing(self) -> str | None:
        """Why this target cannot run here, or None."""
        if self.binary and find_binary(self.binary) is None:
            return f"{self.binary} is not installed"
        if self.tls:
            try:
                import trustme  # noqa: F401
            except ImportError:
                return "trustme is not installed (pip install -e '.[bench]')"
        return None

    def version(self) -> str:
        return ""

    def tls_version(self, base: str) -> str:
        """`base` plus what a client negotiates with this TLS listener."""
        if self.certs is None or not self.port:
            return base
        return f"{base}; TLS: {_negotiated(self.port, self.certs)}, {self.certs.description}"

    def _certs(self) -> TestCerts:
        if self.certs is None:
            raise StartError(f"{self.name} needs the test certificates", "")
        return self.certs

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
    # The checkout whose wsgate runs: this one, or another for a same-run before/after.
    tree = REPO
    # None leaves the config's default (auto: httptools where installed), which an older
    # checkout, without the setting, also runs with.
    http_parser: str | None = None

    def version(self) -> str:
        return _version([sys.executable, "-m", "wsgate", "--version"])

    def listener(self) -> str:
        return "listeners:\n  - name: bench\n    bind: 127.0.0.1:0\n"

    def start(self, backend_port: int, workdir: Path) -> None:
        config = workdir / f"{self.name}.yaml"
        config.write_text(
            "# Written by the benchmark: one listener, one route, limits out of the way.\n"
            + self.listener() +
            "admin:\n  enabled: false\n"
            f"routes:\n  - name: bench\n    backends:\n      - url: ws://{HOST}:{backend_port}\n"
            "timeouts: {handshake: 10s, connect: 5s, idle: 0, close: 5s}\n"
            "heartbeat: {interval: 30s, timeout: 10s}\n"
            "limits: {max_connections: 100000, max_connections_per_ip: 100000, max_message_size: 0}\n"
            "shutdown: {drain_period: 1s, grace_period: 2s}\n"
            "log: {level: info, format: text}\n"
            + (f"http_parser: {self.http_parser}\n" if self.http_parser else "")
        )
        argv = [sys.executable, "-m", "wsgate", "run", "-c", str(config)]
        env = None
        if self.tree != REPO:
            env = {**os.environ, "PYTHONPATH": str(self.tree)}
        self.proc = Proc(self.name, argv, workdir, env=env, cwd=self.tree)
        self.port = self.proc.wait_for_port()


class WsgateBase(Wsgate):
    """wsgate from the checkout named by WSGATE_BENCH_BASE (a `git worktree` of an older
    commit, its `_speedups` built): the code before a change, measured in the same run."""

    name = "wsgate-base"
    tree = Path(os.environ.get("WSGATE_BENCH_BASE", REPO))

    def missing(self) -> str | None:
        if "WSGATE_BENCH_BASE" not in os.environ:
            return "WSGATE_BENCH_BASE names no checkout"
        return super().missing()


class WsgateTls(Wsgate):
    """wsgate with a TLS listener (wss://), TLS 1.2 at least, as its README describes."""

    name = "wsgate-tls"
    tls = True

    def version(self) -> str:
        return self.tls_version(super().version())

    def listener(self) -> str:
        certs = self._certs()
        return (f"{super().listener()}    tls:\n"
                f"      cert: {json.dumps(str(certs.cert))}\n      key: {json.dumps(str(certs.key))}\n")


class WsgateH11(Wsgate):
    """wsgate parsing the handshakes' heads with h11, the reference, to set beside httptools."""

    name = "wsgate-h11"
    http_parser = "h11"

    def version(self) -> str:
        return f"{super().version()} (http_parser: h11)"


class Naive(Target):
    name = "aiohttp-naive"

    def version(self) -> str:
        from importlib.metadata import version

        return f"aiohttp {version('aiohttp')} (bench/naive_proxy.py)"

    def start(self, backend_port: int, workdir: Path) -> None:
        argv = [sys.executable, "-m", "bench.naive_proxy", "--port", "0", "--backend", f"{HOST}:{backend_port}"]
        self.proc = Proc("aiohttp-naive", argv, workdir)
        self.port = self.proc.wait_for_port()


class BareRelay(Target):
    name = "bare-relay"

    def version(self) -> str:
        return "bench/bare_relay.py: two Protocols on uvloop, bytes passed as read"

    def start(self, backend_port: int, workdir: Path) -> None:
        backend = f"{HOST}:{backend_port}"
        argv = [sys.executable, "-m", "bench.bare_relay", "--port", "0", "--backend", backend]
        self.proc = Proc(self.name, argv, workdir)
        self.port = self.proc.wait_for_port()


class Nginx(Target):
    name = "nginx"
    binary = "nginx"

    def version(self) -> str:
        return _version([find_binary("nginx") or "nginx", "-v"])

    def listen(self) -> str:
        return f"        listen {HOST}:{self.port};\n"

    def start(self, backend_port: int, workdir: Path) -> None:
        prefix = workdir / self.name
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
            "    server {\n" + self.listen() +
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
        self.proc = Proc(self.name, argv, workdir)
        self.proc.wait_for_tcp(self.port)


class NginxTls(Nginx):
    """nginx terminating TLS with the same certificate, TLS 1.2 and 1.3 as wsgate-tls offers."""

    name = "nginx-tls"
    tls = True

    def version(self) -> str:
        return self.tls_version(super().version())

    def listen(self) -> str:
        certs = self._certs()
        return (f"        listen {HOST}:{self.port} ssl;\n"
                f"        ssl_certificate {certs.cert};\n        ssl_certificate_key {certs.key};\n"
                "        ssl_protocols TLSv1.2 TLSv1.3;\n")


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
    cls.name: cls for cls in (
        Wsgate, WsgateBase, WsgateTls, WsgateH11, Nginx, NginxTls, Haproxy, Caddy, Naive, BareRelay, Direct
    )
}
# What runs without --targets: all but nginx-tls, the TLS peer; wsgate-base, an older wsgate;
# wsgate-h11, the other head parser; and bare-relay, the floor. Those are opt-in (each
# target adds about a sixth to the run's length).
OPT_IN_TARGETS = ("nginx-tls", "wsgate-base", "wsgate-h11", "bare-relay")
DEFAULT_TARGETS = tuple(name for name in ALL_TARGETS if name not in OPT_IN_TARGETS)
# The proxies wsgate is compared with ("best peer" picks among these).
PEERS = ("nginx", "haproxy", "caddy", "aiohttp-naive")
