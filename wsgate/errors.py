"""Error types, one per failure domain; each carries what its handler needs."""

from __future__ import annotations


class WsgateError(Exception):
    """Base class of every error wsgate raises on purpose."""


class ConfigError(WsgateError):
    """The configuration is unusable; `path` is the key path, e.g. ``routes[0].backends[1].url``."""

    def __init__(self, path: str, message: str, file: str | None = None) -> None:
        self.path = path
        self.message = message
        self.file = file
        super().__init__(str(self))

    def __str__(self) -> str:
        parts = [p for p in (self.file, self.path) if p]
        return ": ".join([*parts, self.message])


class HandshakeError(WsgateError):
    """An HTTP handshake that is refused; `status`, `reason` and `headers` are the reply."""

    def __init__(
        self, status: int, reason: str, headers: list[tuple[str, str]] | None = None
    ) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers or []
        super().__init__(f"{status} {reason}")


class ProtocolError(WsgateError):
    """A peer broke RFC 6455; `close_code` is what it gets told."""

    def __init__(self, close_code: int, reason: str) -> None:
        self.close_code = close_code
        self.reason = reason
        super().__init__(f"{close_code} {reason}")


class BackendUnavailable(WsgateError):
    """No backend answered the upgrade correctly; `status` is the reply to the client (502 or 504)."""

    def __init__(self, status: int, reason: str) -> None:
        self.status = status
        self.reason = reason
        super().__init__(f"{status} {reason}")
