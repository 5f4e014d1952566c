"""Each route's effective settings, as `wsgate check --effective` prints them (like `nginx -T`).

The values are those a new connection on the route gets: the route's own
overrides over the global sections, key by key. `from_route` names the keys the
route sets itself; every other value is the global one.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

from .schema import Config, Match, Route
from .units import format_duration, format_size


def _size(size: int) -> str | int:
    shown = format_size(size)
    return size if shown.endswith("bytes") or shown.endswith("byte") else shown


def _expected(value: str | re.Pattern[str]) -> Any:
    return {"regex": value.pattern} if isinstance(value, re.Pattern) else value


def _match(match: Match) -> dict[str, Any]:
    shown: dict[str, Any] = {"host": match.host}
    if match.path_prefix_raw is not None:
        shown["path_prefix_raw"] = match.path_prefix_raw
    else:
        shown["path_prefix"] = match.path_prefix
    shown["subprotocol"] = match.subprotocol
    shown["headers"] = {name: _expected(value) for name, value in match.headers.items()}
    shown["query"] = {name: _expected(value) for name, value in match.query.items()}
    return shown


def _overrides(route: Route) -> list[str]:
    keys = []
    for section in ("timeouts", "heartbeat", "limits", "flow_control"):
        override = getattr(route, section)
        if override is not None:
            keys += [f"{section}.{key}" for key, value in override if value is not None]
    return keys


def _shaping(route: Route) -> dict[str, Any]:
    def edits(section: Any) -> dict[str, Any]:
        if section is None:
            return {"set": {}, "remove": []}
        return {"set": dict(section.set), "remove": section.remove}

    rewrite = route.rewrite
    return {
        "strip_prefix": route.strip_prefix,
        "rewrite": None
        if rewrite is None
        else {"regex": rewrite.regex.pattern, "replacement": rewrite.replacement},
        "request_headers": edits(route.request_headers),
        "response_headers": edits(route.response_headers),
        "subprotocols": route.subprotocols,
    }


def effective_routes(config: Config) -> list[dict[str, Any]]:
    """Per route, in match order: its match, its effective settings and its shaping."""
    routes = []
    for route in config.routes:
        settings = config.route_settings(route)
        timeouts, heartbeat, flow = settings.timeouts, settings.heartbeat, settings.flow_control
        routes.append({
            "name": route.name,
            "match": _match(route.match),
            "timeouts": {
                "connect": format_duration(timeouts.connect),
                "idle": format_duration(timeouts.idle),
                "close": format_duration(timeouts.close),
            },
            "heartbeat": {
                "interval": format_duration(heartbeat.interval),
                "timeout": format_duration(heartbeat.timeout),
            },
            "limits": {"max_message_size": _size(settings.max_message_size)},
            "flow_control": {"high_water": _size(flow.high_water), "low_water": _size(flow.low_water)},
            "compression": route.compression,
            "shaping": _shaping(route),
            "from_route": _overrides(route),
        })
    return routes


def dump_effective(config: Config) -> str:
    """The effective routes as YAML, in the order above (not sorted)."""
    return yaml.safe_dump({"routes": effective_routes(config)}, sort_keys=False, default_flow_style=None)
