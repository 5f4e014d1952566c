"""Validators and annotated types the schema is built from, one per kind of value.

Each takes the value pydantic has (before or after its own coercion) and
returns it, or raises ``ValueError`` with a sentence for the user; ``error_at``
points a problem below the value being validated.
"""

from __future__ import annotations

import os
import re
from typing import Annotated
from urllib.parse import urlsplit

from pydantic import AfterValidator, BeforeValidator, ValidationInfo
from pydantic_core import PydanticCustomError

from ..heads import is_field_value
from .units import (
    HOSTNAME_RE, format_duration, format_size, is_ipv6, parse_duration, parse_host_port, parse_network,
    parse_size, show_value,
)


def error_at(loc: tuple[str | int, ...], message: str) -> PydanticCustomError:
    """An error that points below the value being validated (e.g. at one list item's key).

    pydantic gives a validator no way to extend the location, so the suffix
    rides in the context and the ``validation`` module appends it.
    """
    return PydanticCustomError("wsgate", message, {"wsgate_loc": loc})


def check_int(value: object) -> object:
    # pydantic's lax mode reads `true` as 1 and 2.0 as 2; in a config both are mistakes.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"expected a whole number, got {show_value(value)}")
    return value


def at_least(low: int) -> AfterValidator:
    def check(value: int) -> int:
        if value < low:
            raise ValueError(f"must be at least {low}, got {value}")
        return value

    return AfterValidator(check)


def between(low: int, high: int) -> AfterValidator:
    def check(value: int) -> int:
        if not low <= value <= high:
            raise ValueError(f"must be between {low} and {high}, got {value}")
        return value

    return AfterValidator(check)


def size_between(low: int, high: int) -> AfterValidator:
    def check(value: int) -> int:
        if not low <= value <= high:
            raise ValueError(
                f"must be between {format_size(low)} and {format_size(high)}, "
                f"got {format_size(value)}"
            )
        return value

    return AfterValidator(check)


def positive(value: float) -> float:
    # 0 means "off" for some settings; where it would mean "never", refuse it.
    if value <= 0:
        raise ValueError("must be greater than zero")
    return value


def check_host_port(value: object) -> str:
    parse_host_port(value)  # type: ignore[arg-type]
    return value  # type: ignore[return-value]


def check_not_empty(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty")
    return value


def lowercase(value: object) -> object:
    return value.lower() if isinstance(value, str) else value


def none_as_empty(value: object) -> object:
    # `timeouts:` with every line under it commented out is YAML null; it means "defaults".
    return {} if value is None else value


Duration = Annotated[float, BeforeValidator(parse_duration)]
"""Seconds; YAML may hold a number of seconds or "250ms", "30s", "5m", "1h"."""

Size = Annotated[int, BeforeValidator(parse_size)]
"""Bytes; YAML may hold an integer or "512", "64KiB", "16MiB", "1GB"."""

WholeNumber = Annotated[int, BeforeValidator(check_int)]
PositiveDuration = Annotated[Duration, AfterValidator(positive)]
HostPort = Annotated[str, BeforeValidator(check_host_port)]
Network = Annotated[str, BeforeValidator(parse_network)]
NonEmpty = Annotated[str, AfterValidator(check_not_empty)]


def check_match_host(value: str) -> str:
    host = value.strip().lower()
    hint = "expected a host name such as chat.example.com"
    if host == "*":
        raise ValueError("'*' alone is not allowed; leave host out (or null) to match any host")
    for mark, what in (("://", "scheme"), ("/", "path"), (":", "port")):
        if mark in host:
            raise ValueError(f"{hint}, without a {what}, got {show_value(value)}")
    name = host.removeprefix("*.")
    if "*" in name or not HOSTNAME_RE.fullmatch(name):
        raise ValueError(
            f"expected a host name such as chat.example.com or *.example.com, got {show_value(value)}"
        )
    return host


def check_path_prefix(value: str) -> str:
    if not value.startswith("/"):
        raise ValueError(f"must start with '/', got {show_value(value)}")
    if "?" in value or "#" in value or any(c.isspace() for c in value):
        raise ValueError(
            f"expected a path such as /ws, without a query or spaces, got {show_value(value)}"
        )
    return value


def check_origin(value: str) -> str:
    example = "such as https://chat.example.com"
    if value == "null":  # what browsers send for file:// pages and sandboxed frames
        return value
    if "*" in value:
        raise ValueError(
            "wildcards are not supported in origins; leave allowed_origins out to accept"
            f" any origin, got {show_value(value)}"
        )
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError:
        raise ValueError(f"expected an origin {example}, got {show_value(value)}") from None
    if not parts.scheme or not parts.hostname or "@" in parts.netloc:
        raise ValueError(f"expected an origin {example}, got {show_value(value)}")
    if parts.path or parts.query or parts.fragment or value.endswith(("?", "#")):
        bare = f"{parts.scheme}://{parts.netloc}".lower()
        raise ValueError(
            f"an origin has no path or trailing slash (browsers send {bare!r}), got {show_value(value)}"
        )
    # Browsers serialize the scheme and host in lowercase; compare like with like.
    return value.lower()


def check_upstream_host(value: str) -> str:
    # ASCII printable only: a control character (a NUL too) would split the request sent upstream,
    # and a name beyond ASCII goes in the Host header as its punycode (xn--...) form.
    if not value or not (value.isascii() and value.isprintable()) or " " in value or "/" in value:
        raise ValueError(
            "expected a Host header value such as chat.internal or chat.internal:8000,"
            f" got {show_value(value)}"
        )
    return value


def tls_version(value: object) -> object:
    # YAML reads `min_version: 1.2` as a float; "1.2", 1.2 and "TLSv1.2" all mean the same.
    if isinstance(value, float):
        value = f"{value:.1f}"
    if isinstance(value, str):
        value = value.strip().lower().removeprefix("tlsv")
    return value


_URL_HINT = "expected a ws:// or wss:// URL such as ws://10.0.0.11:8000"


def check_backend_url(value: object) -> str:
    if not isinstance(value, str) or any(c.isspace() for c in value):
        raise ValueError(f"{_URL_HINT}, got {show_value(value)}")
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError:
        raise ValueError(f"{_URL_HINT}, got {show_value(value)}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("ws", "wss") or not value[len(scheme) :].startswith("://") or not parts.hostname:
        raise ValueError(f"{_URL_HINT}, got {show_value(value)}")
    if "@" in parts.netloc:
        raise ValueError(
            f"a backend URL must not contain a user name or password, got {show_value(value)}"
        )
    if parts.query or parts.fragment or "?" in value or "#" in value:
        raise ValueError(f"a backend URL must not have a query or fragment, got {show_value(value)}")
    if parts.path not in ("", "/"):
        raise ValueError(
            "a backend URL has no path (the client's request path is forwarded as is),"
            f" got {show_value(value)}"
        )
    bracketed = parts.netloc.startswith("[")
    if not (is_ipv6(parts.hostname) if bracketed else HOSTNAME_RE.fullmatch(parts.hostname)):
        raise ValueError(f"{_URL_HINT}, got {show_value(value)}")
    if port == 0:
        raise ValueError(f"the port must be a number from 1 to 65535, got {show_value(value)}")
    return value


_DNS_HINT = "expected name:port such as chat-backend.default.svc.cluster.local:8000"


def check_dns_target(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{_DNS_HINT}, got {show_value(value)}")
    name, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"{_DNS_HINT}, got {show_value(value)}")
    if not HOSTNAME_RE.fullmatch(name.lower()):
        raise ValueError(f"{_DNS_HINT}, got {show_value(value)}")
    return value.lower()


_HASH_KEY_HINT = "expected ip, path, header:NAME, cookie:NAME or query:NAME"


def check_hash_key(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{_HASH_KEY_HINT}, got {show_value(value)}")
    kind, sep, name = value.partition(":")
    if value in ("ip", "path") or (kind in ("header", "cookie", "query") and sep and name.strip()):
        return value
    raise ValueError(f"{_HASH_KEY_HINT}, got {show_value(value)}")


def duration_not_below(value: float, info: ValidationInfo, other: str) -> float:
    """`value` unless it is shorter than the (valid) duration in field `other`."""
    floor = info.data.get(other)  # absent when that field itself was invalid
    if floor is not None and value < floor:
        raise ValueError(
            f"must be at least {other} ({format_duration(floor)}), got {format_duration(value)}"
        )
    return value


def installed_parser(value: str) -> str:
    """`httptools` chosen by name must be importable; `auto` falls back to h11 by itself."""
    if value == "httptools":
        try:
            import httptools  # noqa: F401
        except ImportError:
            raise ValueError(
                "httptools is not installed (pip install httptools); choose auto or h11"
            ) from None
    return value


def worker_count(value: object) -> object:
    if value == "auto":
        return os.cpu_count() or 1
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"expected a whole number or auto, got {show_value(value)}")
    return value


# RFC 9110 5.6.2: a header name, or a subprotocol name, is a token.
_TOKEN_RE = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


def check_header_spelling(value: str) -> str:
    """A header name as it is to be sent: case kept."""
    if not _TOKEN_RE.fullmatch(value):
        raise ValueError(f"expected a header name such as X-User, got {show_value(value)}")
    return value


def check_header_name(value: str) -> str:
    """A header name to compare with: lower-cased, as names ignore case."""
    return check_header_spelling(value).lower()


def check_token(value: str) -> str:
    if not _TOKEN_RE.fullmatch(value):
        raise ValueError(f"expected a token (letters, digits, -._~ and such), got {show_value(value)}")
    return value


def check_field_value(value: str) -> str:
    """A header value the gateway sends as written: the same grammar as the clients' heads."""
    try:
        encoded = value.encode("latin-1")
    except UnicodeEncodeError:
        raise ValueError(f"a header value must be Latin-1 text, got {show_value(value)}") from None
    if not is_field_value(encoded):
        raise ValueError(
            f"not a valid header value (no control characters, no leading or trailing space),"
            f" got {show_value(value)}"
        )
    return value


def compile_regex(value: object) -> re.Pattern[str]:
    if not isinstance(value, str):
        raise ValueError(f"expected a regular expression as a string, got {show_value(value)}")
    try:
        return re.compile(value)
    except re.error as exc:
        raise ValueError(f"invalid regular expression {value!r}: {exc}") from None


def value_match(value: object) -> str | re.Pattern[str]:
    """A match's expected value: a string compared exactly, or `{regex: ...}` matched whole."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)  # `room: 1` in YAML means the text "1"
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and set(value) == {"regex"}:
        return compile_regex(value["regex"])
    raise ValueError(f"expected a string or {{regex: ...}}, got {show_value(value)}")


def check_replacement(pattern: re.Pattern[str], replacement: str) -> None:
    """Refuse a replacement naming a group the pattern lacks, at load rather than per request."""
    # The template compiler is private; where a Python lacks it, re.sub reports it at run time.
    compile_template = getattr(re, "_compile_template", None) or getattr(re, "_compile_repl", None)
    if compile_template is None:
        return
    try:
        if compile_template is getattr(re, "_compile_template", None):
            compile_template(pattern, replacement)
        else:
            compile_template(replacement, pattern)
    except (re.error, IndexError) as exc:
        raise error_at(("replacement",), f"invalid replacement {replacement!r}: {exc}") from None
