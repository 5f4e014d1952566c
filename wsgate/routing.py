"""Sans-I/O route matching: Host (exact or `*.suffix`) and path prefix, first match wins."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, TypeVar


class _Match(Protocol):
    host: str | None
    path_prefix: str
    path_prefix_raw: str | None


class _Route(Protocol):
    name: str
    match: _Match


R = TypeVar("R", bound=_Route)


def host_matches(pattern: str | None, host: str) -> bool:
    """`pattern` None matches every host; `*.example.com` matches any name below it."""
    if pattern is None:
        return True
    if pattern.startswith("*."):
        return host.endswith(pattern[1:]) and len(host) > len(pattern) - 1
    return host == pattern


def path_matches(prefix: str, path: str) -> bool:
    """Whole segments: `/chat` matches `/chat` and `/chat/x`, not `/chatroom`.

    A prefix ending in `/` already ends a segment: `/chat/` matches `/chat/x`, not `/chat`.
    """
    if not path.startswith(prefix):
        return False
    return len(path) == len(prefix) or prefix.endswith("/") or path[len(prefix)] == "/"


def match_route(routes: Sequence[R], host: str, path: str) -> R | None:
    """The first route whose host pattern and path prefix fit, or None."""
    for route in routes:
        match = route.match
        if not host_matches(match.host, host):
            continue
        if match.path_prefix_raw is not None:
            if path.startswith(match.path_prefix_raw):
                return route
        elif path_matches(match.path_prefix, path):
            return route
    return None
