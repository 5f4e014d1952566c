"""Units and addresses: durations ("30s"), sizes ("16MiB"), rates ("20/s"), networks, host:port.

Each parser takes what YAML gave and returns the value in base units (seconds,
bytes, events per second), or raises ``ValueError`` with a sentence that shows
the value the way the user wrote it.
"""

from __future__ import annotations

import ipaddress
import math
import re
from fractions import Fraction

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB


# --------------------------------------------------------------------------
# Showing values in messages
# --------------------------------------------------------------------------


def show_value(value: object) -> str:
    """Render a config value the way the user wrote it, for 'got ...' clauses."""
    if value is None:
        return "an empty value"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return repr(value if len(value) <= 60 else value[:57] + "...")
    if isinstance(value, (int, float)):
        return f"{value:g}" if isinstance(value, float) else str(value)
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        return "a list"
    return f"a {type(value).__name__}"


def format_duration(seconds: float) -> str:
    """250ms, 30s, 5m, 1h: the shortest unit that shows the value exactly."""
    if seconds == 0:
        return "0s"
    if seconds < 1:
        return f"{seconds * 1000:g}ms"
    for unit, size in (("h", 3600), ("m", 60)):
        if seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"


def format_size(size: int) -> str:
    """16MiB, 64KiB or '1000 bytes': binary units only where they are exact."""
    for unit, factor in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if size and size % factor == 0:
            return f"{size // factor}{unit}"
    return "1 byte" if size == 1 else f"{size} bytes"


# --------------------------------------------------------------------------
# Units and addresses
# --------------------------------------------------------------------------

_DURATION_HINT = "expected a duration such as 250ms, 30s, 5m or 1h"
_DURATION_RE = re.compile(r"(?P<num>[0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*(?P<unit>ms|s|m|h)?")
_DURATION_DIVISORS = {"ms": 1000, "s": 1, "m": Fraction(1, 60), "h": Fraction(1, 3600), None: 1}


def parse_duration(value: object) -> float:
    """Seconds from a number of seconds or a string like "250ms", "30s", "5m", "1h"."""
    if isinstance(value, bool):
        raise ValueError(f"{_DURATION_HINT}, got {show_value(value)}")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip()
        match = _DURATION_RE.fullmatch(text.removeprefix("-"))
        if match is None:
            raise ValueError(f"{_DURATION_HINT}, got {show_value(value)}")
        # Fraction keeps "1.1h" exact until the final conversion to float.
        seconds = float(Fraction(match["num"]) / _DURATION_DIVISORS[match["unit"]])
        if text.startswith("-"):
            seconds = -seconds
    else:
        raise ValueError(f"{_DURATION_HINT}, got {show_value(value)}")
    if not math.isfinite(seconds):
        raise ValueError(f"{_DURATION_HINT}, got {show_value(value)}")
    if seconds < 0:
        raise ValueError(f"a duration cannot be negative, got {show_value(value)}")
    return seconds


_SIZE_HINT = "expected a size such as 64KiB or 16MiB"
_SIZE_RE = re.compile(r"(?P<num>[0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*(?P<unit>[A-Za-z]*)")
# Matched case-insensitively: nobody means megabits in a proxy config.
_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "kib": KiB,
    "mib": MiB,
    "gib": GiB,
    "tib": 1024 * GiB,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
}


def parse_size(value: object) -> int:
    """Bytes from an integer or a string like "512", "64KiB", "16MiB", "1GB"."""
    if isinstance(value, bool):
        raise ValueError(f"{_SIZE_HINT}, got {show_value(value)}")
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer()):
        size = int(value)
    elif isinstance(value, str):
        text = value.strip()
        match = _SIZE_RE.fullmatch(text.removeprefix("-"))
        unit = match["unit"].lower() if match else None
        if match is None or unit not in _SIZE_UNITS:
            raise ValueError(f"{_SIZE_HINT}, got {show_value(value)}")
        exact = Fraction(match["num"]) * _SIZE_UNITS[unit]
        if exact.denominator != 1:
            raise ValueError(f"a size must be a whole number of bytes, got {show_value(value)}")
        size = -int(exact) if text.startswith("-") else int(exact)
    else:
        raise ValueError(f"{_SIZE_HINT}, got {show_value(value)}")
    if size < 0:
        raise ValueError(f"a size cannot be negative, got {show_value(value)}")
    return size


_RATE_HINT = "expected a rate such as 20/s or 600/m, or a number per second"
_RATE_RE = re.compile(r"(?P<num>[0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*(?:/\s*(?P<unit>s|m|h))?")
_RATE_PERIODS = {"s": 1, "m": 60, "h": 3600, None: 1}


def parse_rate(value: object) -> float:
    """Events per second from a number or a string like "20/s", "600/m", "1000/h"."""
    if isinstance(value, bool):
        raise ValueError(f"{_RATE_HINT}, got {show_value(value)}")
    if isinstance(value, (int, float)):
        rate = float(value)
    elif isinstance(value, str):
        match = _RATE_RE.fullmatch(value.strip())
        if match is None:
            raise ValueError(f"{_RATE_HINT}, got {show_value(value)}")
        rate = float(Fraction(match["num"]) / _RATE_PERIODS[match["unit"]])
    else:
        raise ValueError(f"{_RATE_HINT}, got {show_value(value)}")
    if not math.isfinite(rate):
        raise ValueError(f"{_RATE_HINT}, got {show_value(value)}")
    if rate <= 0:
        raise ValueError(f"a rate must be greater than zero, got {show_value(value)}")
    return rate


_NETWORK_HINT = "expected an address or network such as 10.0.0.0/8 or 2001:db8::/32"


def parse_network(value: object) -> str:
    """A network in CIDR form ("10.0.0.0/8"; a bare address is a /32 or /128), normalized."""
    if not isinstance(value, str):
        raise ValueError(f"{_NETWORK_HINT}, got {show_value(value)}")
    try:
        return str(ipaddress.ip_network(value.strip()))
    except ValueError:
        pass
    try:
        loose = ipaddress.ip_network(value.strip(), strict=False)
    except ValueError:
        raise ValueError(f"{_NETWORK_HINT}, got {show_value(value)}") from None
    raise ValueError(f"{show_value(value)} has bits set beyond its prefix; did you mean {str(loose)!r}?")


_HOST_PORT_HINT = "expected host:port such as 127.0.0.1:8080"
_PORT_RE = re.compile(r"[0-9]{1,5}")
# DNS names and IPv4 literals; underscores appear in real service names.
HOSTNAME_RE = re.compile(
    r"(?=.{1,253}\Z)[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
    r"(?:\.[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)*"
)


def is_ipv6(text: str) -> bool:
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


def format_host_port(host: str, port: int) -> str:
    """ "host:port", with an IPv6 address in brackets so the port stays readable."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_host_port(value: str) -> tuple[str, int]:
    """Split "host:port", "[v6]:port" or ":port" (all interfaces) into (host, port)."""
    if not isinstance(value, str):
        raise ValueError(f"{_HOST_PORT_HINT}, got {show_value(value)}")
    if value.startswith("["):
        host, bracket, rest = value[1:].partition("]")
        if not bracket or not is_ipv6(host):
            raise ValueError(f"{_HOST_PORT_HINT} or [::1]:8080, got {show_value(value)}")
        if not rest.startswith(":"):
            raise ValueError(f"{_HOST_PORT_HINT}; the port is missing in {show_value(value)}")
        port_text = rest[1:]
    else:
        host, colon, port_text = value.rpartition(":")
        if not colon:
            raise ValueError(f"{_HOST_PORT_HINT}; the port is missing in {show_value(value)}")
        if is_ipv6(host) or is_ipv6(value):
            raise ValueError(
                f"put an IPv6 address in brackets, as in [::1]:8080, got {show_value(value)}"
            )
        if host == "":
            host = "0.0.0.0"
        elif not HOSTNAME_RE.fullmatch(host):
            raise ValueError(f"{_HOST_PORT_HINT}, got {show_value(value)}")
    if not _PORT_RE.fullmatch(port_text) or int(port_text) > 65535:
        raise ValueError(f"the port must be a number from 0 to 65535, got {show_value(value)}")
    return host.lower(), int(port_text)
