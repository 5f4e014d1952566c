"""Error types, one per failure domain; each carries what its handler needs."""

from __future__ import annotations

import os


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


class ProxyHeaderError(WsgateError):
    """A PROXY protocol header that cannot be accepted; `reason` is a short label for metrics
    (``malformed`` or ``too_large``), `detail` says what was wrong, for the log."""

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}")


class ProtocolError(WsgateError):
    """A peer broke RFC 6455; `close_code` is what it gets told."""

    def __init__(self, close_code: int, reason: str) -> None:
        self.close_code = close_code
        self.reason = reason
        super().__init__(f"{close_code} {reason}")


class BackendUnavailable(WsgateError):
    """No backend answered the upgrade correctly; `status` is the reply to the client: 502 (unreachable
    or a wrong answer), 503 (no backend to try) or 504 (no answer in time)."""

    def __init__(self, status: int, reason: str) -> None:
        self.status = status
        self.reason = reason
        super().__init__(f"{status} {reason}")


class CloseStateError(WsgateError):
    """A relay leg was moved where its close state allows no move: a bug in the relay, not a peer's."""

    def __init__(self, state: str, event: str) -> None:
        self.state = state
        self.event = event
        super().__init__(f"no close-state move from {state} on {event}")


class ListenError(WsgateError):
    """A socket the config asks for cannot be bound; `path` is its key, e.g. ``listeners[1].bind``."""

    def __init__(self, path: str, address: str, reason: str, hint: str = "") -> None:
        self.path = path
        self.address = address
        self.reason = reason
        self.hint = hint
        super().__init__(str(self))

    def __str__(self) -> str:
        text = f"{self.path}: cannot listen on {self.address}: {self.reason}"
        return f"{text} ({self.hint})" if self.hint else text

    @classmethod
    def from_os_error(cls, path: str, address: str, exc: OSError) -> ListenError:
        # asyncio's servers re-raise with a long strerror; the errno's own words are enough.
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        return cls(path, address, reason.lower())


class WorkerError(WsgateError):
    """A worker process under the supervisor failed; `index` says which."""

    def __init__(self, index: int, message: str) -> None:
        self.index = index
        self.message = message
        super().__init__(f"worker {index} {message}")
