"""Sans-I/O routing: which route a handshake takes, and how the route shapes its request.

A route matches when all of its conditions hold: Host (exact or `*.suffix`),
path prefix, and optionally a subprotocol the client offers, headers and query
parameters. Routes are tried in config order; the first match wins. `Router`
compiles the routes once per config, so a route that matches on host and path
alone costs what it did before the other conditions existed.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar
from urllib.parse import parse_qs

from .errors import HandshakeError
from .handshake import is_sendable_path

ByName = Mapping[bytes, list[bytes]]
Expected = str | re.Pattern[str]


class _Match(Protocol):
    host: str | None
    path_prefix: str
    path_prefix_raw: str | None


class _Route(Protocol):
    name: str
    match: _Match


class RequestFacts(Protocol):
    """What the conditions look at: an `UpgradeRequest`, or a plain GET's `PlainGet`."""

    @property
    def by_name(self) -> ByName: ...

    @property
    def protocols(self) -> Sequence[bytes]: ...

    @property
    def target(self) -> bytes: ...


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


def _prefix_matches(match: _Match, path: str) -> bool:
    if match.path_prefix_raw is not None:
        return path.startswith(match.path_prefix_raw)
    return path_matches(match.path_prefix, path)


def match_route(routes: Sequence[R], host: str, path: str) -> R | None:
    """The first route whose host pattern and path prefix fit, or None (other conditions ignored)."""
    for route in routes:
        if host_matches(route.match.host, host) and _prefix_matches(route.match, path):
            return route
    return None


# -- conditions beyond host and path -------------------------------------------------


def query_values(target: bytes) -> dict[str, list[str]]:
    """The target's query parameters, percent-decoded (UTF-8, `+` as space), blank ones kept."""
    return parse_qs(target.partition(b"?")[2].decode("latin-1"), keep_blank_values=True)


def _fits(expected: Expected, value: str) -> bool:
    if isinstance(expected, str):
        return value == expected
    return expected.fullmatch(value) is not None


def _shown(expected: Expected) -> str:
    return f"regex {expected.pattern!r}" if isinstance(expected, re.Pattern) else repr(expected)


@dataclass(frozen=True, slots=True)
class Condition:
    """One of a route's conditions beyond host and path."""

    kind: str  # "subprotocol", "header" or "query"
    name: str  # the subprotocol, the lower-case header name or the query parameter
    expected: Expected = ""

    def holds(self, request: RequestFacts, query: dict[str, list[str]] | None) -> bool:
        """Whether `request` satisfies it; `query` is the parsed query for kind "query"."""
        if self.kind == "subprotocol":
            return self.name.encode("latin-1") in request.protocols
        if self.kind == "header":
            values = request.by_name.get(self.name.encode("latin-1"), [])
            return any(_fits(self.expected, value.decode("latin-1").strip()) for value in values)
        assert query is not None
        return any(_fits(self.expected, value) for value in query.get(self.name, []))

    def failure(self, request: RequestFacts, query: dict[str, list[str]] | None) -> str:
        """Why `request` does not satisfy it, for `wsgate explain`."""
        if self.kind == "subprotocol":
            offered = b", ".join(request.protocols).decode("latin-1") or "none"
            return f"subprotocol {self.name} not offered (offered: {offered})"
        if self.kind == "header":
            values = request.by_name.get(self.name.encode("latin-1"))
            if not values:
                return f"header {self.name} missing"
            got = ", ".join(repr(v.decode("latin-1").strip()) for v in values)
            return f"header {self.name} {got} does not match {_shown(self.expected)}"
        assert query is not None
        if self.name not in query:
            return f"query parameter {self.name} missing"
        got = ", ".join(repr(value) for value in query[self.name])
        return f"query parameter {self.name} {got} does not match {_shown(self.expected)}"


def conditions_of(match: object) -> tuple[Condition, ...]:
    """A config `Match`'s conditions beyond host and path, in the order they are checked."""
    found: list[Condition] = []
    subprotocol = getattr(match, "subprotocol", None)
    if subprotocol is not None:
        found.append(Condition("subprotocol", subprotocol))
    for name, expected in getattr(match, "headers", {}).items():
        found.append(Condition("header", name, expected))
    for name, expected in getattr(match, "query", {}).items():
        found.append(Condition("query", name, expected))
    return tuple(found)


# -- shaping ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Shaping:
    """What a route changes in the request toward its backend and in the 101 toward the client."""

    strip_prefix: str | None = None
    rewrite: tuple[re.Pattern[str], str] | None = None
    # The client's headers dropped: those removed and those set (set replaces).
    request_drop: frozenset[bytes] = frozenset()
    request_set: tuple[tuple[bytes, bytes], ...] = ()
    response_drop: frozenset[bytes] = frozenset()
    response_set: tuple[tuple[bytes, bytes], ...] = ()
    # The subprotocols the backend may be offered; None: the client's, unfiltered.
    subprotocols: frozenset[bytes] | None = None

    @property
    def changes_target(self) -> bool:
        return self.strip_prefix is not None or self.rewrite is not None

    def target(self, target: bytes) -> bytes:
        """`target` with the path stripped, then rewritten; the query kept as it was.

        Raises `HandshakeError` (500) when the rewrite made a path that may not be sent.
        """
        path, mark, query = target.partition(b"?")
        text = path.decode("latin-1")
        if self.strip_prefix is not None and path_matches(self.strip_prefix, text):
            text = text[len(self.strip_prefix) :]
            if not text.startswith("/"):
                text = "/" + text
        if self.rewrite is not None:
            pattern, replacement = self.rewrite
            try:
                text = pattern.sub(replacement, text, count=1)
            except (re.error, IndexError):
                raise HandshakeError(500, "the route's rewrite failed") from None
            if not is_sendable_path(text):
                raise HandshakeError(500, "the route's rewrite made an invalid path")
        return text.encode("latin-1") + mark + query

    def offered(self, protocols: Sequence[bytes]) -> list[bytes] | None:
        """The client's subprotocols that go upstream, in its order; None when not filtered."""
        if self.subprotocols is None:
            return None
        return [protocol for protocol in protocols if protocol in self.subprotocols]

    def response_headers(self, headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        """The 101's relayed headers with the route's removed and set, before Upgrade/Connection."""
        kept = [(name, value) for name, value in headers if name.lower() not in self.response_drop]
        # The relayed list ends with Upgrade and Connection; the route's go before them.
        return kept[:-2] + list(self.response_set) + kept[-2:]


NO_SHAPING = Shaping()


def _edits(edits: object) -> tuple[frozenset[bytes], tuple[tuple[bytes, bytes], ...]]:
    if edits is None:
        return frozenset(), ()
    set_: dict[str, str] = getattr(edits, "set", {})
    remove: list[str] = getattr(edits, "remove", [])
    pairs = tuple((name.encode("latin-1"), value.encode("latin-1")) for name, value in set_.items())
    return frozenset(name.lower().encode("latin-1") for name in [*remove, *set_]), pairs


def shaping_of(route: object) -> Shaping:
    """A config `Route`'s shaping, compiled; `NO_SHAPING` when it has none."""
    request_drop, request_set = _edits(getattr(route, "request_headers", None))
    response_drop, response_set = _edits(getattr(route, "response_headers", None))
    rewrite = getattr(route, "rewrite", None)
    subprotocols = getattr(route, "subprotocols", None)
    shaping = Shaping(
        strip_prefix=getattr(route, "strip_prefix", None),
        rewrite=None if rewrite is None else (rewrite.regex, rewrite.replacement),
        request_drop=request_drop,
        request_set=request_set,
        response_drop=response_drop,
        response_set=response_set,
        subprotocols=None if subprotocols is None else frozenset(p.encode("latin-1") for p in subprotocols),
    )
    return NO_SHAPING if shaping == NO_SHAPING else shaping


# -- the router ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Verdict(Generic[R]):
    """One route's answer to a request, for `wsgate explain`: None when it matched."""

    route: R
    failed: str | None


class Router(Generic[R]):
    """A config's routes compiled for matching, first match wins."""

    def __init__(self, routes: Sequence[R]) -> None:
        self.routes = list(routes)
        self._entries = [(route, route.match, conditions_of(route.match)) for route in self.routes]
        self._needs_query = [any(c.kind == "query" for c in entry[2]) for entry in self._entries]
        self.shaping = {route.name: shaping_of(route) for route in self.routes}

    def route_for(self, host: str, path: str, request: RequestFacts) -> R | None:
        """The first route whose every condition holds for this request, or None."""
        query: dict[str, list[str]] | None = None
        for (route, match, conditions), needs_query in zip(self._entries, self._needs_query):
            if not host_matches(match.host, host) or not _prefix_matches(match, path):
                continue
            if not conditions:
                return route
            if needs_query and query is None:
                query = query_values(request.target)
            if all(condition.holds(request, query) for condition in conditions):
                return route
        return None

    def verdicts(self, host: str, path: str, request: RequestFacts) -> list[Verdict[R]]:
        """Each route's answer in order, up to and including the one that matches."""
        query = query_values(request.target)
        verdicts: list[Verdict[R]] = []
        for route, match, conditions in self._entries:
            failed = None
            if not host_matches(match.host, host):
                failed = f"host {host} != {match.host}"
            elif not _prefix_matches(match, path):
                if match.path_prefix_raw is not None:
                    failed = f"path {path} does not start with {match.path_prefix_raw}"
                else:
                    failed = f"path {path} is not under {match.path_prefix}"
            else:
                unmet = [c for c in conditions if not c.holds(request, query)]
                failed = unmet[0].failure(request, query) if unmet else None
            verdicts.append(Verdict(route, failed))
            if failed is None:
                break
        return verdicts
