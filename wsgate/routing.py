"""Sans-I/O route matching: Host (exact or `*.suffix`) and path prefix, first match wins."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, TypeVar


class _Match(Protocol):
    host: str | None
    path_prefix: str


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


def match_route(routes: Sequence[R], host: str, path: str) -> R | None:
    """The first route whose host pattern and path prefix fit, or None."""
    for route in routes:
        if host_matches(route.match.host, host) and path.startswith(route.match.path_prefix):
            return route
    return None
