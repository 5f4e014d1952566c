"""TLS contexts: listeners (default certificate, SNI, mTLS, rotation) and backends.

A listener is served by one "front" `SSLContext` for its whole life, because the
asyncio server holds on to it. Its SNI callback hands each new handshake the
context of the certificate currently loaded for the requested name, so
`ListenerTls.reload()` changes what new clients see while open connections,
which keep the context they started with, are not touched.
"""

from __future__ import annotations

import logging
import os
import ssl
from collections.abc import Callable

from .config import BackendTls, Config, Tls
from .errors import ConfigError

log = logging.getLogger("wsgate.tls")

_ALPN = ["http/1.1"]
# A listener with `http2: true` prefers HTTP/2, for WebSockets over it (RFC 8441; see http2.py).
_ALPN_HTTP2 = ["h2", "http/1.1"]
_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}
# RFC 4514 short names for the subject attributes certificates commonly carry.
_SUBJECT_NAMES = {
    "commonName": "CN",
    "organizationName": "O",
    "organizationalUnitName": "OU",
    "countryName": "C",
    "localityName": "L",
    "stateOrProvinceName": "ST",
    "domainComponent": "DC",
}


def _load_chain(context: ssl.SSLContext, cert: str, key: str, path: str) -> None:
    """Load `cert` and `key`; `path` is the cert's key path, e.g. ``listeners[0].tls.cert``."""
    key_path = path.removesuffix(".cert") + ".key"
    try:
        context.load_cert_chain(cert, key)
    except FileNotFoundError as exc:
        missing = exc.filename or (cert if not os.path.exists(cert) else key)
        raise ConfigError(path if missing == cert else key_path, f"file not found: {missing}") from None
    except ssl.SSLError as exc:
        raise ConfigError(
            path, f"cannot use certificate {cert} with key {key}: {exc.reason or exc}"
        ) from None
    except OSError as exc:
        # PermissionError, IsADirectoryError, ...: which file is not always said.
        culprit = exc.filename or (key if os.access(cert, os.R_OK) and not os.path.isdir(cert) else cert)
        reason = exc.strerror or str(exc)
        raise ConfigError(path if culprit == cert else key_path, f"cannot read {culprit}: {reason}") from None


def _load_ca(context: ssl.SSLContext, cafile: str, path: str) -> None:
    try:
        context.load_verify_locations(cafile=cafile)
    except FileNotFoundError:
        raise ConfigError(path, f"file not found: {cafile}") from None
    except ssl.SSLError as exc:
        raise ConfigError(path, f"not a PEM file of CA certificates: {cafile} ({exc.reason or exc})") from None
    except OSError as exc:  # PermissionError, IsADirectoryError, ...
        raise ConfigError(path, f"cannot read {cafile}: {exc.strerror or exc}") from None


class ListenerTls:
    """The TLS side of one listener; `context` is what the server is created with."""

    def __init__(self, config: Tls, path: str, http2: bool = False) -> None:
        self.config = config
        self.path = path
        self.alpn = _ALPN_HTTP2 if http2 else _ALPN
        self._default: ssl.SSLContext | None = None
        self._exact: dict[str, ssl.SSLContext] = {}
        self._wildcards: list[tuple[str, ssl.SSLContext]] = []
        self._mtimes: dict[str, float] = {}
        self.context = self._new_context()
        self.context.sni_callback = self._on_sni
        self.reload()

    def _new_context(self) -> ssl.SSLContext:
        config = self.config
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = _VERSIONS[config.min_version]
        # Compression invites CRIME; renegotiation invites a CPU denial of service.
        context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
        context.set_alpn_protocols(self.alpn)
        if config.client_ca is not None:
            _load_ca(context, config.client_ca, f"{self.path}.client_ca")
            context.verify_mode = (
                ssl.CERT_REQUIRED if config.client_auth == "required" else ssl.CERT_OPTIONAL
            )
        return context

    def _files(self) -> list[str]:
        config = self.config
        files = [config.cert, config.key, *(f for s in config.sni for f in (s.cert, s.key))]
        return files + ([config.client_ca] if config.client_ca else [])

    def reload(self) -> None:
        """Load every file again; on any error raise `ConfigError` and keep serving the old ones.

        The files' timestamps are noted either way, so a watcher retries only after
        the next change rather than on every tick.
        """
        self._mtimes = self._snapshot()
        config = self.config
        default = self._new_context()
        _load_chain(default, config.cert, config.key, f"{self.path}.cert")
        exact: dict[str, ssl.SSLContext] = {}
        wildcards: list[tuple[str, ssl.SSLContext]] = []
        for i, entry in enumerate(config.sni):
            context = self._new_context()
            _load_chain(context, entry.cert, entry.key, f"{self.path}.sni[{i}].cert")
            for name in entry.names:
                if name.startswith("*."):
                    wildcards.append((name[1:], context))
                else:
                    exact.setdefault(name, context)
        # Clients that send no SNI are served by the front context itself.
        _load_chain(self.context, config.cert, config.key, f"{self.path}.cert")
        self._default, self._exact, self._wildcards = default, exact, wildcards

    def _snapshot(self) -> dict[str, float]:
        mtimes = {}
        for name in self._files():
            try:
                mtimes[name] = os.stat(name).st_mtime
            except OSError:
                mtimes[name] = -1.0
        return mtimes

    def files_changed(self) -> bool:
        """Whether any certificate, key or CA file changed since the last load."""
        return self._snapshot() != self._mtimes

    def context_for(self, server_name: str | None) -> ssl.SSLContext:
        """The context whose certificate answers `server_name` (None: no SNI)."""
        if server_name:
            name = server_name.lower().rstrip(".")
            found = self._exact.get(name)
            if found is not None:
                return found
            for suffix, context in self._wildcards:
                if name.endswith(suffix) and len(name) > len(suffix):
                    return context
        assert self._default is not None
        return self._default

    def _on_sni(self, connection: ssl.SSLObject, server_name: str | None, _: ssl.SSLContext) -> None:
        connection.context = self.context_for(server_name)


def backend_context(config: BackendTls | None, path: str) -> ssl.SSLContext:
    """The client context for a wss:// backend."""
    config = config or BackendTls()
    context = ssl.create_default_context()
    if config.ca is not None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        _load_ca(context, config.ca, f"{path}.ca")
    if not config.verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if config.cert is not None and config.key is not None:
        _load_chain(context, config.cert, config.key, f"{path}.cert")
    context.set_alpn_protocols(_ALPN)
    return context


def listener_contexts(config: Config) -> dict[str, ListenerTls]:
    """Every TLS listener's context, by listener name; raises `ConfigError` for a bad file."""
    return {
        listener.name: ListenerTls(listener.tls, f"listeners[{i}].tls", listener.http2)
        for i, listener in enumerate(config.listeners)
        if listener.tls is not None
    }


def check_files(config: Config) -> None:
    """Load every certificate, key and CA file the config names, as `run` would."""
    listener_contexts(config)
    for r, route in enumerate(config.routes):
        for b, backend in enumerate(route.backends):
            if backend.scheme == "wss":
                backend_context(backend.tls, f"routes[{r}].backends[{b}].tls")


def peer_subject(transport_extra: Callable[[str], object]) -> str | None:
    """The verified client certificate's subject as `CN=...,O=...`, or None."""
    cert = transport_extra("peercert")
    if not isinstance(cert, dict) or not cert.get("subject"):
        return None
    parts = []
    for rdn in cert["subject"]:
        for name, value in rdn:
            parts.append(f"{_SUBJECT_NAMES.get(name, name)}={value}")
    return ",".join(parts)
