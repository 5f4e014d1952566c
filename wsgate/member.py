"""One backend server of a pool, with its live state, and what the pool sees of a relay.

The facts about a member have one owner each: its health verdict is its
`RiseFall`'s (healthy when it has no active checks), the length of its next
ejection is its `Backoff`'s, and the end of its current ejection is its own.
"""

from __future__ import annotations

import ssl
from typing import Protocol

from .health import Backoff, RiseFall


class PooledRelay(Protocol):
    """What a pool needs of an open connection: its key, whether it is closing, and a way to close it."""

    key: bytes
    closing: bool

    def close(self, code: int, reason: str) -> None: ...


class Member:
    """One backend server of a pool, with its live state."""

    __slots__ = (
        "identity",
        "host",
        "port",
        "weight",
        "active",
        "connecting",
        "checks",
        "backoff",
        "failures",
        "ejected_until",
        "probation",
        "relays",
        "tls",
        "server_name",
    )

    def __init__(
        self,
        identity: str,
        host: str,
        port: int,
        weight: int,
        tls: ssl.SSLContext | None = None,
        server_name: str | None = None,
    ) -> None:
        self.identity = identity
        self.host = host
        self.port = port
        self.weight = weight
        self.tls = tls  # the client context for wss:// backends
        self.server_name = server_name  # what the backend's certificate must name
        self.active = 0  # open WebSocket connections: the load bounded loads bound
        self.connecting = 0  # handshakes under way to this member, counted as load too
        self.checks: RiseFall | None = None  # active checks; a backend starts healthy
        self.backoff: Backoff | None = None
        self.failures = 0  # consecutive connect or handshake failures
        self.ejected_until = 0.0
        self.probation = False  # back from an ejection: one more failure ejects again
        self.relays: set[PooledRelay] = set()

    @property
    def healthy(self) -> bool:
        """The active checks' verdict; True for a member without checks."""
        return self.checks is None or self.checks.healthy

    def available(self, now: float) -> bool:
        return self.healthy and now >= self.ejected_until

    def __repr__(self) -> str:
        return f"<Member {self.identity} active={self.active} healthy={self.healthy}>"
