"""Sans-I/O: the address a request comes from, given its peer and the trusted proxies.

Rules:
- A peer outside `trusted_proxies` is the client. Whatever it says in
  X-Forwarded-For or Forwarded is not believed.
- From a trusted peer, the chain is read from X-Forwarded-For, or from Forwarded
  (RFC 7239) when the request has no X-Forwarded-For. Walking it from the right
  (the hop nearest the gateway), the client is the first address not in the
  list; when every address is trusted, the leftmost one.
- An entry met on that walk that is not an address (`unknown`, an obfuscated
  `_name`, garbage), or a Forwarded header that does not parse, makes the chain
  unusable: the client is then the peer, as when the headers are absent.
- The X-Forwarded-For chain sent on starts at the client and ends at the peer.
  Entries left of the client are dropped: the client wrote them.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass

Headers = list[tuple[bytes, bytes]]
Address = ipaddress.IPv4Address | ipaddress.IPv6Address

__all__ = ["ClientAddress", "TrustedProxies"]


@dataclass(frozen=True, slots=True)
class ClientAddress:
    """Who the client is, and the X-Forwarded-For chain to send on (client first, peer last)."""

    ip: str
    forwarded_for: list[str]


class TrustedProxies:
    """The networks whose forwarding headers are believed; built once per config."""

    __slots__ = ("_networks",)

    def __init__(self, networks: Iterable[str]) -> None:
        self._networks = tuple(ipaddress.ip_network(network) for network in networks)

    def includes(self, ip: str) -> bool:
        """True when `ip` (as a socket reports it) is in one of the trusted networks."""
        if not self._networks:
            return False  # the default, asked of every connection: no address to parse
        address = _address(ip)
        return address is not None and self._trusts(address)

    def resolve(self, peer_ip: str, headers: Headers) -> ClientAddress:
        """The client of a request that arrived from `peer_ip` with `headers`."""
        alone = ClientAddress(peer_ip, [peer_ip])
        if not self.includes(peer_ip):
            return alone
        chain = _x_forwarded_for(headers)
        if chain is None:
            chain = _forwarded(headers)
        if not chain:
            return alone
        hops = [peer_ip]
        for entry in reversed(chain):
            if entry is None:
                return alone
            hops.append(str(entry))
            if not self._trusts(entry):
                break
        return ClientAddress(hops[-1], hops[::-1])

    def _trusts(self, address: Address) -> bool:
        return any(address in network for network in self._networks)


def _address(text: str) -> Address | None:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped  # a dual-stack socket's view of an IPv4 peer
    return address


def _values(headers: Headers, name: bytes) -> list[str]:
    return [value.decode("latin-1") for key, value in headers if key.lower() == name]


def _x_forwarded_for(headers: Headers) -> list[Address | None] | None:
    """Each X-Forwarded-For entry as an address (None where it is not one); None without the header."""
    values = _values(headers, b"x-forwarded-for")
    if not values:
        return None
    entries = [entry.strip() for value in values for entry in value.split(",")]
    return [_node(entry, bare_ipv6=True) for entry in entries if entry]


def _node(text: str, *, bare_ipv6: bool) -> Address | None:
    """An address from `1.2.3.4`, `1.2.3.4:80`, `[v6]` or `[v6]:80`; bare v6 where allowed."""
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or ":" not in host or (rest and not _PORT.fullmatch(rest)):
            return None
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
        if not _PORT.fullmatch(":" + port):
            return None
    elif ":" in text and not bare_ipv6:
        return None  # RFC 7239 puts IPv6 in brackets; without them a port cannot be told apart
    else:
        host = text
    address = _address(host)
    if isinstance(address, ipaddress.IPv6Address) and address.scope_id:
        return None  # a zone means something only on the host that wrote it
    return address


# A node port: digits, or an obfuscated `_name` (RFC 7239 6.3).
_PORT = re.compile(r":(?:[0-9]{1,5}|_[A-Za-z0-9._-]+)")
_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
# One parameter of a forwarded-element and the separator after it; a quoted value may
# hold commas and semicolons, and backslash-escapes any character.
_PAIR = re.compile(
    rf'[ \t]*({_TOKEN})=({_TOKEN}|"(?:[^"\\]|\\.)*")[ \t]*([;,]|$)'
)
_ESCAPE = re.compile(r"\\(.)")


def _forwarded(headers: Headers) -> list[Address | None] | None:
    """The `for` of each Forwarded element, in order; None when absent or malformed."""
    values = _values(headers, b"forwarded")
    if not values:
        return None
    chain: list[Address | None] = []
    for value in values:
        elements = _forwarded_elements(value)
        if elements is None:
            return None
        for element in elements:
            node = element.get("for")
            chain.append(None if node is None else _node(node, bare_ipv6=False))
    return chain


def _forwarded_elements(value: str) -> list[dict[str, str]] | None:
    """A Forwarded value's elements as {parameter: value}; None when it does not parse."""
    elements: list[dict[str, str]] = []
    element: dict[str, str] = {}
    position, end = 0, len(value)
    # Empty list elements (", ,") are allowed by the list syntax; skip them.
    while position < end and value[position] in " \t,":
        position += 1
    while position < end:
        match = _PAIR.match(value, position)
        if match is None:
            return None
        name, raw, separator = match[1].lower(), match[2], match[3]
        if name in element:
            return None  # a parameter occurs at most once per element
        element[name] = _ESCAPE.sub(r"\1", raw[1:-1]) if raw.startswith('"') else raw
        position = match.end()
        if separator != ";":
            elements.append(element)
            element = {}
            while position < end and value[position] in " \t,":
                position += 1
    if element:
        return None  # a trailing ';' with no parameter after it
    return elements
