"""The client address of a request: forwarding headers, believed only from trusted proxies."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from wsgate.forwarding import ClientAddress, TrustedProxies

TRUSTED = TrustedProxies(["10.0.0.0/8", "2001:db8:ffff::/48", "192.0.2.1/32"])
PROXY = "10.0.0.1"  # the peer, a trusted proxy


def xff(*values: str) -> list[tuple[bytes, bytes]]:
    return [(b"X-Forwarded-For", value.encode()) for value in values]


def forwarded(*values: str) -> list[tuple[bytes, bytes]]:
    return [(b"Forwarded", value.encode()) for value in values]


@pytest.mark.parametrize(
    ("ip", "trusted"),
    [
        ("10.1.2.3", True),
        ("192.0.2.1", True),
        ("192.0.2.2", False),
        ("2001:db8:ffff::7", True),
        ("2001:db8:fffe::7", False),
        ("::ffff:10.0.0.9", True),  # an IPv4 peer as a dual-stack socket reports it
        ("unknown", False),
        ("", False),
    ],
)
def test_includes(ip: str, trusted: bool) -> None:
    assert TRUSTED.includes(ip) is trusted


def test_nothing_is_trusted_by_default() -> None:
    assert not TrustedProxies([]).includes("127.0.0.1")
    assert TrustedProxies([]).resolve("127.0.0.1", xff("203.0.113.7")) == ClientAddress(
        "127.0.0.1", ["127.0.0.1"]
    )


RESOLVED = [
    # X-Forwarded-For: the rightmost address not trusted, and the chain from it to the peer.
    pytest.param(xff("203.0.113.7"), "203.0.113.7", ["203.0.113.7", PROXY], id="one-hop"),
    pytest.param(
        xff("198.51.100.1, 203.0.113.7, 10.9.9.9"),
        "203.0.113.7", ["203.0.113.7", "10.9.9.9", PROXY], id="client-wrote-its-own-entries",
    ),
    pytest.param(
        xff("198.51.100.1", "203.0.113.7", "10.9.9.9"),
        "203.0.113.7", ["203.0.113.7", "10.9.9.9", PROXY], id="several-headers",
    ),
    pytest.param(xff("10.2.2.2, 10.9.9.9"), "10.2.2.2", ["10.2.2.2", "10.9.9.9", PROXY], id="all-trusted"),
    pytest.param(xff("203.0.113.7:4711"), "203.0.113.7", ["203.0.113.7", PROXY], id="v4-with-port"),
    pytest.param(xff("[2001:DB8::7]:4711"), "2001:db8::7", ["2001:db8::7", PROXY], id="v6-with-port"),
    pytest.param(xff("2001:db8::7"), "2001:db8::7", ["2001:db8::7", PROXY], id="bare-v6"),
    pytest.param(xff("::ffff:203.0.113.7"), "203.0.113.7", ["203.0.113.7", PROXY], id="v4-mapped"),
    pytest.param(xff("[::ffff:203.0.113.7]"), "203.0.113.7", ["203.0.113.7", PROXY], id="v4-mapped-brackets"),
    pytest.param(xff(" , 203.0.113.7,"), "203.0.113.7", ["203.0.113.7", PROXY], id="empty-entries"),
    pytest.param(
        xff("garbage, 203.0.113.7"), "203.0.113.7", ["203.0.113.7", PROXY], id="garbage-left-of-client"
    ),
    # What the walk meets before the client that is not an address: the peer is the client.
    pytest.param(xff("203.0.113.7, unknown"), PROXY, [PROXY], id="unknown"),
    pytest.param(xff("203.0.113.7, 10.0.0.300"), PROXY, [PROXY], id="not-an-address"),
    pytest.param(xff("1.2.3.4:99999999"), PROXY, [PROXY], id="bad-port"),
    pytest.param(xff("fe80::1%eth0"), PROXY, [PROXY], id="v6-with-zone"),
    pytest.param(xff("[203.0.113.7]"), PROXY, [PROXY], id="v4-in-brackets"),
    pytest.param(xff(""), PROXY, [PROXY], id="empty"),
    pytest.param([], PROXY, [PROXY], id="absent"),
    # Forwarded (RFC 7239), read when there is no X-Forwarded-For.
    pytest.param(forwarded("for=203.0.113.7"), "203.0.113.7", ["203.0.113.7", PROXY], id="fwd-token"),
    pytest.param(
        forwarded('for="[2001:db8:cafe::17]:4711";proto=https;by=10.0.0.1'),
        "2001:db8:cafe::17", ["2001:db8:cafe::17", PROXY], id="fwd-quoted-v6-port",
    ),
    pytest.param(
        forwarded('For="203.0.113.7:47011", for=10.2.2.2'),
        "203.0.113.7", ["203.0.113.7", "10.2.2.2", PROXY], id="fwd-two-elements",
    ),
    pytest.param(
        forwarded("for=198.51.100.1", "for=203.0.113.7 ; proto=http ,for=10.2.2.2"),
        "203.0.113.7", ["203.0.113.7", "10.2.2.2", PROXY], id="fwd-several-headers",
    ),
    pytest.param(
        forwarded('for=203.0.113.7;host="a,b;c", for=10.2.2.2'),
        "203.0.113.7", ["203.0.113.7", "10.2.2.2", PROXY], id="fwd-separators-in-quotes",
    ),
    pytest.param(
        forwarded(r'for="\[2001:db8::9\]"'), "2001:db8::9", ["2001:db8::9", PROXY], id="fwd-quoted-pairs"
    ),
    pytest.param(
        forwarded('for="203.0.113.7:_p1"'), "203.0.113.7", ["203.0.113.7", PROXY], id="fwd-obf-port"
    ),
    pytest.param(forwarded("for=_hidden"), PROXY, [PROXY], id="fwd-obfuscated"),
    pytest.param(forwarded("for=unknown"), PROXY, [PROXY], id="fwd-unknown"),
    pytest.param(forwarded("for=203.0.113.7, proto=https"), PROXY, [PROXY], id="fwd-element-without-for"),
    pytest.param(forwarded('for="2001:db8::9"'), PROXY, [PROXY], id="fwd-v6-without-brackets"),
    pytest.param(forwarded("for=203.0.113.7:80"), PROXY, [PROXY], id="fwd-port-unquoted"),
    pytest.param(forwarded('for="203.0.113.7'), PROXY, [PROXY], id="fwd-unterminated-quote"),
    pytest.param(forwarded("for=203.0.113.7;for=198.51.100.1"), PROXY, [PROXY], id="fwd-repeated-parameter"),
    pytest.param(forwarded("for=203.0.113.7;"), PROXY, [PROXY], id="fwd-trailing-semicolon"),
    pytest.param(forwarded("203.0.113.7"), PROXY, [PROXY], id="fwd-not-a-pair"),
    # Both: X-Forwarded-For, which nearly every proxy writes, is the one read.
    pytest.param(
        [*forwarded("for=198.51.100.1"), *xff("203.0.113.7")],
        "203.0.113.7", ["203.0.113.7", PROXY], id="both",
    ),
]


@pytest.mark.parametrize(("headers", "ip", "chain"), RESOLVED)
def test_trusted_peer(headers: list[tuple[bytes, bytes]], ip: str, chain: list[str]) -> None:
    assert TRUSTED.resolve(PROXY, headers) == ClientAddress(ip, chain)


@pytest.mark.parametrize(("headers", "ip", "chain"), RESOLVED)
def test_untrusted_peer_is_the_client_whatever_it_says(
    headers: list[tuple[bytes, bytes]], ip: str, chain: list[str]
) -> None:
    assert TRUSTED.resolve("203.0.113.50", headers) == ClientAddress("203.0.113.50", ["203.0.113.50"])


_ENTRY = st.one_of(
    st.ip_addresses().map(str),
    st.sampled_from(["unknown", "_hidden", "", "[::1]:80", "10.0.0.5", '"', ";", "for="]),
    st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=12),
)
_ELEMENT = st.one_of(_ENTRY, _ENTRY.map(lambda e: f"for={e}"), _ENTRY.map(lambda e: f'for="{e}"'))
_HEADERS = st.lists(
    st.tuples(
        st.sampled_from([b"X-Forwarded-For", b"Forwarded"]),
        st.lists(_ELEMENT, max_size=5).map(lambda parts: ", ".join(parts).encode("latin-1")),
    ),
    max_size=3,
)


@given(headers=_HEADERS, peer=st.sampled_from([PROXY, "192.0.2.1", "203.0.113.50"]))
def test_property_the_client_is_an_address_and_the_chain_ends_at_the_peer(
    headers: list[tuple[bytes, bytes]], peer: str
) -> None:
    client = TRUSTED.resolve(peer, headers)
    assert client.forwarded_for[0] == client.ip and client.forwarded_for[-1] == peer
    # Every hop between the client and the peer is trusted; the client is, only if all are.
    assert all(TRUSTED.includes(hop) for hop in client.forwarded_for[1:])
    if not TRUSTED.includes(peer):
        assert client == ClientAddress(peer, [peer])
