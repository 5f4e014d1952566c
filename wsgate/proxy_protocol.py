"""The PROXY protocol header that L4 balancers put before a connection's own bytes.

A sans-I/O core module: `parse_proxy_header` looks at the bytes received so
far and returns `NEED_MORE`, or a `ProxyHeader` whose `size` says where the
connection's own bytes (a TLS ClientHello, an HTTP request) begin, or raises
`ProxyHeaderError`, its one error. Both versions of the format are read:

- v1, one text line of at most 107 bytes, CRLF included:
  ``PROXY TCP4 192.0.2.7 198.51.100.1 51234 443`` (``TCP6`` with IPv6
  addresses, or ``PROXY UNKNOWN`` followed by anything);
- v2, binary: a 12-byte signature, version and command, address family and
  transport, the length of the rest, then the addresses and the TLVs (type,
  length, value), which are checked for length and otherwise skipped.

A v2 LOCAL header (a balancer's own health check), a v1 UNKNOWN one, and a v2
PROXY header without an IP address (unspecified family or transport, a unix
socket) carry no client address: their `source` is None, and the socket's
peer address stands.
"""

from __future__ import annotations

import enum
import ipaddress
import struct
from dataclasses import dataclass
from typing import Final, Literal

from .errors import ProxyHeaderError

__all__ = [
    "NEED_MORE",
    "V1_SIZE_LIMIT",
    "V2_SIGNATURE",
    "V2_SIZE_LIMIT",
    "NeedMore",
    "ProxyHeader",
    "Versions",
    "parse_proxy_header",
]

Versions = Literal["v1", "v2", "any"]

V1_SIGNATURE = b"PROXY "
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
# The longest v1 line the format allows: two IPv6 addresses, two ports, CRLF.
V1_SIZE_LIMIT = 107
# The v2 length field allows 64 KiB of TLVs; the balancers in use send tens of bytes,
# TLS details a few hundred. A header is held in memory until complete: keep it small.
V2_SIZE_LIMIT = 4096

_V2_HEAD = struct.Struct("!12sBBH")
_V2_INET = struct.Struct("!4s4sHH")
_V2_INET6 = struct.Struct("!16s16sHH")
_TLV_HEAD = struct.Struct("!BH")

_LOCAL, _PROXY = 0x0, 0x1
_UNSPEC, _INET, _INET6, _UNIX = 0x0, 0x1, 0x2, 0x3
_STREAM, _DGRAM = 0x1, 0x2
# The address block that each v2 family puts before the TLVs.
_V2_ADDRESS_SIZES = {_UNSPEC: 0, _INET: _V2_INET.size, _INET6: _V2_INET6.size, _UNIX: 216}


class NeedMore(enum.Enum):
    """The header is not complete yet: feed more bytes and parse again."""

    NEED_MORE = "NEED_MORE"


NEED_MORE: Final = NeedMore.NEED_MORE


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """A complete header: its version, its size in bytes, and the client's (address, port)."""

    version: int
    size: int
    source: tuple[str, int] | None  # None: no client address given, the socket's stands


def parse_proxy_header(data: bytes | bytearray, versions: Versions = "any") -> ProxyHeader | NeedMore:
    """The header at the start of `data`, `NEED_MORE`, or `ProxyHeaderError`.

    `versions` says which versions are accepted; with "any" the first bytes tell.
    Bytes after the header are not looked at, so `data` may hold them already.
    """
    if versions != "v2" and _starts_with(data, V1_SIGNATURE):
        return _parse_v1(data)
    if versions != "v1" and _starts_with(data, V2_SIGNATURE):
        return _parse_v2(data)
    expected = "v1 or v2" if versions == "any" else versions
    raise ProxyHeaderError("malformed", f"the connection does not start with a PROXY {expected} header")


def _starts_with(data: bytes | bytearray, signature: bytes) -> bool:
    """Whether `data` starts with `signature`, or with as much of it as has arrived."""
    size = min(len(data), len(signature))
    return data[:size] == signature[:size]


def _malformed(detail: str) -> ProxyHeaderError:
    return ProxyHeaderError("malformed", detail)


def _parse_v1(data: bytes | bytearray) -> ProxyHeader | NeedMore:
    end = data.find(b"\n", 0, V1_SIZE_LIMIT)
    if end < 0:
        if len(data) >= V1_SIZE_LIMIT:
            raise ProxyHeaderError("too_large", f"a v1 header is longer than {V1_SIZE_LIMIT} bytes")
        return NEED_MORE
    line = bytes(data[: end - 1])
    if data[end - 1] != 0x0D or b"\r" in line:
        raise _malformed("a v1 header must end in CRLF and hold no other CR or LF")
    fields = line.split(b" ")
    protocol = fields[1]
    if protocol == b"UNKNOWN":
        return ProxyHeader(1, end + 1, None)
    if protocol not in (b"TCP4", b"TCP6") or len(fields) != 6:
        raise _malformed(
            "expected PROXY TCP4|TCP6|UNKNOWN source destination source-port destination-port"
        )
    source = _v1_address(fields[2], protocol)
    _v1_address(fields[3], protocol)
    source_port = _v1_port(fields[4])
    _v1_port(fields[5])
    return ProxyHeader(1, end + 1, (source, source_port))


def _v1_address(text: bytes, protocol: bytes) -> str:
    kind = ipaddress.IPv4Address if protocol == b"TCP4" else ipaddress.IPv6Address
    try:
        if b"%" in text:  # a scope zone means nothing to another host
            raise ValueError(text)
        return str(kind(text.decode("ascii")))
    except ValueError:  # UnicodeDecodeError included
        raise _malformed(f"not a {protocol.decode()} address: {text[:45]!r}") from None


def _v1_port(text: bytes) -> int:
    # Plain decimal: no sign, no spaces, no leading zero (int() would take all three).
    if not (text.isdigit() and len(text) <= 5) or (len(text) > 1 and text[0] == 0x30) or int(text) > 65535:
        raise _malformed(f"not a port: {text[:8]!r}")
    return int(text)


def _parse_v2(data: bytes | bytearray) -> ProxyHeader | NeedMore:
    if len(data) < _V2_HEAD.size:
        return NEED_MORE
    _, version_command, family_transport, length = _V2_HEAD.unpack_from(data)
    version, command = version_command >> 4, version_command & 0x0F
    if version != 2 or command not in (_LOCAL, _PROXY):
        raise _malformed(f"unknown v2 version or command 0x{version_command:02x}")
    size = _V2_HEAD.size + length
    if size > V2_SIZE_LIMIT:
        raise ProxyHeaderError("too_large", f"a v2 header of {size} bytes is over {V2_SIZE_LIMIT}")
    if len(data) < size:
        return NEED_MORE
    if command == _LOCAL:
        # The balancer speaking for itself: whatever follows the head is to be skipped.
        return ProxyHeader(2, size, None)
    family, transport = family_transport >> 4, family_transport & 0x0F
    address_size = _V2_ADDRESS_SIZES.get(family)
    if address_size is None or transport > _DGRAM:
        raise _malformed(f"unknown v2 address family or transport 0x{family_transport:02x}")
    if transport == _DGRAM:
        raise _malformed("a v2 header for a datagram connection on a stream listener")
    if length < address_size:
        raise _malformed(f"a v2 address block of {length} bytes, its family needs {address_size}")
    _check_tlvs(data, _V2_HEAD.size + address_size, size)
    if transport != _STREAM or family not in (_INET, _INET6):
        return ProxyHeader(2, size, None)
    if family == _INET:
        source, _, source_port, _ = _V2_INET.unpack_from(data, _V2_HEAD.size)
        return ProxyHeader(2, size, (str(ipaddress.IPv4Address(source)), source_port))
    source, _, source_port, _ = _V2_INET6.unpack_from(data, _V2_HEAD.size)
    return ProxyHeader(2, size, (str(ipaddress.IPv6Address(source)), source_port))


def _check_tlvs(data: bytes | bytearray, offset: int, end: int) -> None:
    """The TLVs between `offset` and `end` must fill it exactly; their contents are not used."""
    # At most V2_SIZE_LIMIT / 3 steps, once per connection.
    while offset < end:
        if end - offset < _TLV_HEAD.size:
            raise _malformed("a v2 TLV is cut short")
        _, value_size = _TLV_HEAD.unpack_from(data, offset)
        offset += _TLV_HEAD.size + value_size
        if offset > end:
            raise _malformed("a v2 TLV runs past the end of the header")
