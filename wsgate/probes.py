"""Active health probes (tcp, http, websocket) of one address, and DNS resolution of backends' names.

Probes know addresses, not pool members: the pool asks, and records the answer
in the member's `RiseFall`. The http and websocket probes share one aiohttp
session, made when first needed.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import ssl
from typing import Any

from .config import Discovery, HealthCheck

# Probes are the pool's work: their log lines keep the pool's logger name.
log = logging.getLogger("wsgate.balancer")


def ws_url(host: str, port: int, scheme: str = "ws") -> str:
    """The ws:// (or wss://) URL of an address; IPv6 literals in brackets."""
    try:
        if ipaddress.ip_address(host).version == 6:
            return f"{scheme}://[{host}]:{port}"
    except ValueError:
        pass
    return f"{scheme}://{host}:{port}"


class Prober:
    """Runs a route's health check against addresses; owns the session the HTTP probes share."""

    def __init__(self) -> None:
        self._http: Any = None  # an aiohttp ClientSession, made when a probe needs one

    async def probe(
        self,
        check: HealthCheck,
        host: str,
        port: int,
        tls: ssl.SSLContext | None = None,
        server_name: str | None = None,
        label: str = "",
    ) -> bool:
        """True when the backend at `host`:`port` passes `check` within its timeout.

        `label` names the backend in the debug line of a failure (its ws:// URL by default).
        """
        try:
            async with asyncio.timeout(check.timeout):
                if check.type == "tcp":
                    _, writer = await asyncio.open_connection(host, port)
                    writer.close()
                    return True
                session = await self._session()
                base = ws_url(host, port, "wss" if tls else "ws")
                options = {"ssl": tls, "server_hostname": server_name} if tls else {}
                if check.type == "http":
                    url = base.replace("ws", "http", 1) + check.path
                    async with session.get(url, allow_redirects=False, **options) as response:
                        return 200 <= response.status < 300
                async with session.ws_connect(base + check.path, autoping=False, **options) as ws:
                    await ws.close()
                    return True
        except Exception as exc:  # a probe failure of any kind means unhealthy
            log.debug("probe of %s failed: %r", label or ws_url(host, port, "wss" if tls else "ws"), exc)
            return False

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()

    async def _session(self) -> Any:
        if self._http is None:
            import aiohttp

            self._http = aiohttp.ClientSession(
                headers={"User-Agent": "wsgate-health-check"},
                connector=aiohttp.TCPConnector(force_close=True),
            )
        return self._http


async def resolve(name: str, discovery: Discovery) -> list[str]:
    """The A and AAAA addresses of `name`, from the configured DNS servers or the system's."""
    if not discovery.nameservers:
        infos = await asyncio.get_running_loop().getaddrinfo(name, None, type=socket.SOCK_STREAM)
        return sorted({info[4][0] for info in infos})
    import dns.asyncresolver
    import dns.exception
    import dns.resolver

    resolver = dns.asyncresolver.Resolver(configure=False)
    hosts = [server.rsplit(":", 1) for server in discovery.nameservers]
    resolver.nameservers = [host.strip("[]") for host, _ in hosts]
    resolver.nameserver_ports = {host.strip("[]"): int(port) for host, port in hosts}
    resolver.lifetime = max(1.0, discovery.resolve_interval / 2)
    addresses: set[str] = set()
    failures: list[str] = []
    for rdtype in ("A", "AAAA"):
        try:
            answer = await resolver.resolve(name, rdtype)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            continue
        except dns.exception.DNSException as exc:
            # Some servers refuse AAAA (or A) queries outright; the other family still counts.
            failures.append(f"{rdtype}: {exc}")
            continue
        addresses.update(record.address for record in answer)
    if len(failures) == 2:
        raise OSError(f"DNS queries for {name} failed ({'; '.join(failures)})")
    return sorted(addresses)
