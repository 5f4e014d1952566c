"""Tests of wsgate.proxy_protocol: v1 and v2 headers, whole, cut short, split and mangled.

Headers are built by the test-only builders in peers.py, never by wsgate.
HYPOTHESIS_PROFILE picks the depth of the property tests.
"""

from __future__ import annotations

import ipaddress
import os
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from peers import PROXY_V2_SIGNATURE, proxy_v1_header, proxy_v2_header

from wsgate.errors import ProxyHeaderError
from wsgate.forwarding import TrustedProxies
from wsgate.proxy_protocol import (
    NEED_MORE,
    V1_SIZE_LIMIT,
    V2_SIZE_LIMIT,
    ProxyHeader,
    parse_proxy_header,
)

PROFILE = settings(settings.get_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev")))

REQUEST = b"GET / HTTP/1.1\r\nHost: gateway.test\r\n\r\n"
WIDEST_IPV6 = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
WIDEST_TCP6 = proxy_v1_header((WIDEST_IPV6, 65535), (WIDEST_IPV6, 65535))
# The format's own worst case, which its 107-byte bound is made for.
LONGEST_V1 = WIDEST_TCP6.replace(b"TCP6", b"UNKNOWN")


def v2_raw(command: int, family: int, body: bytes) -> bytes:
    return PROXY_V2_SIGNATURE + struct.pack("!BBH", command, family, len(body)) + body


# -- valid headers -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "version", "source"),
    [
        pytest.param(proxy_v1_header(("203.0.113.7", 51234)), 1, ("203.0.113.7", 51234), id="v1-tcp4"),
        pytest.param(proxy_v1_header(("2001:db8::7", 1)), 1, ("2001:db8::7", 1), id="v1-tcp6"),
        pytest.param(
            proxy_v1_header(("2001:DB8:0:0:0:0:0:7", 0)), 1, ("2001:db8::7", 0), id="v1-tcp6-normalized"
        ),
        pytest.param(proxy_v1_header(None), 1, None, id="v1-unknown"),
        pytest.param(b"PROXY UNKNOWN anything at all\r\n", 1, None, id="v1-unknown-with-rest"),
        pytest.param(WIDEST_TCP6, 1, (WIDEST_IPV6, 65535), id="v1-widest-tcp6"),
        pytest.param(LONGEST_V1, 1, None, id="v1-longest"),
        pytest.param(proxy_v2_header(("203.0.113.7", 51234)), 2, ("203.0.113.7", 51234), id="v2-inet"),
        pytest.param(proxy_v2_header(("2001:db8::7", 443)), 2, ("2001:db8::7", 443), id="v2-inet6"),
        pytest.param(
            proxy_v2_header(("203.0.113.7", 9), tlvs=((0x05, b"\x01" * 16), (0xEA, b"vpce-1"), (0x04, b""))),
            2, ("203.0.113.7", 9), id="v2-tlvs",
        ),
        pytest.param(proxy_v2_header(None), 2, None, id="v2-unspec"),
        pytest.param(proxy_v2_header(("203.0.113.7", 9), local=True), 2, None, id="v2-local-with-addresses"),
        pytest.param(proxy_v2_header(None, local=True), 2, None, id="v2-local"),
        pytest.param(v2_raw(0x20, 0x00, b"\xff" * 7), 2, None, id="v2-local-skips-anything"),
        pytest.param(v2_raw(0x21, 0x31, b"/tmp/a".ljust(108, b"\0") * 2), 2, None, id="v2-unix"),
        pytest.param(v2_raw(0x21, 0x10, bytes(12)), 2, None, id="v2-inet-unspecified-transport"),
    ],
)
def test_valid_header_is_parsed_and_what_follows_is_left(header, version, source):
    for versions in ("any", f"v{version}"):
        result = parse_proxy_header(header + REQUEST, versions)
        assert result == ProxyHeader(version, len(header), source)


def test_v1_line_of_the_largest_allowed_size():
    assert len(LONGEST_V1) == V1_SIZE_LIMIT
    assert parse_proxy_header(LONGEST_V1) != NEED_MORE


@pytest.mark.parametrize(
    "header",
    [
        proxy_v1_header(("203.0.113.7", 51234)),
        proxy_v2_header(("2001:db8::7", 443), tlvs=((0x01, b"h2"),)),
        proxy_v2_header(None, local=True),
    ],
    ids=["v1", "v2", "v2-local"],
)
def test_every_prefix_of_a_header_needs_more(header):
    for end in range(len(header)):
        assert parse_proxy_header(header[:end]) is NEED_MORE, end


# -- refused headers -----------------------------------------------------------------

BAD_HEADERS = [
    pytest.param(REQUEST, "any", "malformed", id="no-header"),
    pytest.param(b"\x16\x03\x01\x02\x00\x01", "any", "malformed", id="tls-hello"),
    pytest.param(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", "any", "malformed", id="v1-bare-lf"),
    pytest.param(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\r\n", "any", "malformed", id="v1-extra-cr"),
    pytest.param(b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", "any", "malformed", id="v1-missing-port"),
    pytest.param(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n", "any", "malformed", id="v1-extra-field"),
    pytest.param(b"PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n", "any", "malformed", id="v1-double-space"),
    pytest.param(b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n", "any", "malformed", id="v1-protocol"),
    pytest.param(b"PROXY tcp4 1.2.3.4 5.6.7.8 1 2\r\n", "any", "malformed", id="v1-lowercase"),
    pytest.param(b"PROXY TCP4 1.2.3.256 5.6.7.8 1 2\r\n", "any", "malformed", id="v1-bad-ipv4"),
    pytest.param(b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n", "any", "malformed", id="v1-leading-zero-ip"),
    pytest.param(b"PROXY TCP4 ::1 5.6.7.8 1 2\r\n", "any", "malformed", id="v1-ipv6-as-tcp4"),
    pytest.param(b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n", "any", "malformed", id="v1-ipv4-as-tcp6"),
    pytest.param(b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n", "any", "malformed", id="v1-scope-zone"),
    pytest.param(b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n", "any", "malformed", id="v1-port-too-big"),
    pytest.param(b"PROXY TCP4 1.2.3.4 5.6.7.8 080 2\r\n", "any", "malformed", id="v1-port-leading-zero"),
    pytest.param(b"PROXY TCP4 1.2.3.4 5.6.7.8 +80 2\r\n", "any", "malformed", id="v1-port-sign"),
    pytest.param(b"PROXY TCP4 1.2.3.4 5.6.7.8 \xd9\xa1 2\r\n", "any", "malformed", id="v1-port-non-ascii"),
    pytest.param(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n", "v2", "malformed", id="v1-on-v2"),
    pytest.param(b"PROXY UNKNOWN " + b"x" * 200, "any", "too_large", id="v1-no-end"),
    pytest.param(LONGEST_V1[:-2] + b" \r\n", "any", "too_large", id="v1-one-byte-too-long"),
    pytest.param(proxy_v2_header(("1.2.3.4", 1)), "v1", "malformed", id="v2-on-v1"),
    pytest.param(v2_raw(0x11, 0x11, bytes(12)), "any", "malformed", id="v2-version-1"),
    pytest.param(v2_raw(0x22, 0x11, bytes(12)), "any", "malformed", id="v2-command"),
    pytest.param(v2_raw(0x21, 0x41, bytes(12)), "any", "malformed", id="v2-family"),
    pytest.param(v2_raw(0x21, 0x13, bytes(12)), "any", "malformed", id="v2-transport"),
    pytest.param(v2_raw(0x21, 0x12, bytes(12)), "any", "malformed", id="v2-datagram"),
    pytest.param(v2_raw(0x21, 0x11, bytes(11)), "any", "malformed", id="v2-inet-short"),
    pytest.param(v2_raw(0x21, 0x21, bytes(35)), "any", "malformed", id="v2-inet6-short"),
    pytest.param(v2_raw(0x21, 0x11, bytes(12) + b"\x01\x00"), "any", "malformed", id="v2-tlv-head-cut"),
    pytest.param(
        v2_raw(0x21, 0x11, bytes(12) + b"\x01\x00\x05abcd"), "any", "malformed", id="v2-tlv-overrun"
    ),
    pytest.param(
        PROXY_V2_SIGNATURE + struct.pack("!BBH", 0x21, 0x11, V2_SIZE_LIMIT - 15), "any", "too_large",
        id="v2-over-the-limit",
    ),
    pytest.param(PROXY_V2_SIGNATURE[:5] + b"X", "any", "malformed", id="v2-signature-mangled"),
]


@pytest.mark.parametrize(("data", "versions", "reason"), BAD_HEADERS)
def test_bad_header_is_refused_with_its_reason(data, versions, reason):
    with pytest.raises(ProxyHeaderError) as info:
        parse_proxy_header(data, versions)
    assert info.value.reason == reason
    assert info.value.detail


def test_oversized_v2_is_refused_from_its_length_alone():
    # The 16 bytes that declare the length are enough: nothing more is waited for.
    head = PROXY_V2_SIGNATURE + struct.pack("!BBH", 0x21, 0x11, 0xFFFF)
    with pytest.raises(ProxyHeaderError, match="too_large"):
        parse_proxy_header(head)


def test_v2_at_the_size_limit_is_accepted():
    tlv_size = V2_SIZE_LIMIT - 16 - 12 - 3
    header = proxy_v2_header(("203.0.113.7", 1), tlvs=((0xE0, bytes(tlv_size)),))
    assert len(header) == V2_SIZE_LIMIT
    assert parse_proxy_header(header) == ProxyHeader(2, V2_SIZE_LIMIT, ("203.0.113.7", 1))


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("10.1.2.3", True),
        ("::ffff:10.1.2.3", True),  # an IPv4 peer on a dual-stack socket
        ("2001:db8::1", True),
        ("10.2.0.1", False),
        ("::ffff:10.2.0.1", False),
        ("unknown", False),
    ],
)
def test_proxy_protocol_from_takes_the_peer_as_a_socket_reports_it(address, expected):
    senders = TrustedProxies(["10.1.0.0/16", "2001:db8::/32"])
    assert senders.includes(address) is expected


# -- properties ----------------------------------------------------------------------

IPV4 = st.builds(lambda n: str(ipaddress.IPv4Address(n)), st.integers(0, 2**32 - 1))
IPV6 = st.builds(lambda n: str(ipaddress.IPv6Address(n)), st.integers(0, 2**128 - 1))
PORTS = st.integers(0, 65535)
TLVS = st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=40)), max_size=5).map(tuple)


@st.composite
def valid_headers(draw: st.DrawFn) -> tuple[bytes, tuple[str, int] | None]:
    """A valid header of either version and the source it must yield."""
    ips = draw(st.sampled_from([IPV4, IPV6]))
    source = (draw(ips), draw(PORTS))
    destination = (draw(ips), draw(PORTS))
    kind = draw(st.sampled_from(["v1", "v1-unknown", "v2", "v2-unspec", "v2-local"]))
    if kind == "v1":
        return proxy_v1_header(source, destination), source
    if kind == "v1-unknown":
        return proxy_v1_header(None), None
    tlvs = draw(TLVS)
    if kind == "v2":
        return proxy_v2_header(source, destination, tlvs), source
    if kind == "v2-unspec":
        return proxy_v2_header(None, tlvs=tlvs), None
    return proxy_v2_header(source, destination, tlvs, local=True), None


@st.composite
def split(draw: st.DrawFn, data: bytes) -> list[bytes]:
    cuts = draw(st.lists(st.integers(0, len(data)), max_size=12))
    points = sorted({0, len(data), *cuts})
    return [data[a:b] for a, b in zip(points, points[1:])]


def feed(chunks: list[bytes]) -> tuple[object, int]:
    """Parse after each chunk, as the gateway does: the first verdict and the bytes it took."""
    received = bytearray()
    for chunk in chunks:
        received += chunk
        try:
            result = parse_proxy_header(received)
        except ProxyHeaderError as exc:
            return exc.reason, len(received)
        if result is not NEED_MORE:
            return result, len(received)
    return NEED_MORE, len(received)


@PROFILE
@given(st.data(), valid_headers(), st.binary(max_size=64))
def test_any_valid_header_round_trips_however_it_is_split(data, case, rest):
    header, source = case
    chunks = data.draw(split(header + rest))
    result, _ = feed(chunks)
    assert result == ProxyHeader(2 if header.startswith(PROXY_V2_SIGNATURE) else 1, len(header), source)


@st.composite
def mangled(draw: st.DrawFn) -> bytes:
    """Arbitrary bytes, or a valid header with some bytes changed, dropped or added."""
    if draw(st.booleans()):
        prefix = draw(st.sampled_from([b"", b"PROXY ", b"PROXY TCP4 ", b"PROXY TCP6 ", PROXY_V2_SIGNATURE]))
        return prefix + draw(st.binary(max_size=300))
    data = bytearray(draw(valid_headers())[0])
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(data)))
        action = draw(st.sampled_from(["set", "drop", "insert"]))
        if action == "set" and at < len(data):
            data[at] = draw(st.integers(0, 255))
        elif action == "drop":
            del data[at : at + draw(st.integers(1, 4))]
        else:
            data[at:at] = draw(st.binary(min_size=1, max_size=4))
    return bytes(data)


@PROFILE
@given(st.data(), mangled())
def test_any_bytes_split_anyhow_give_a_header_need_more_or_the_one_error(data, garbage):
    chunks = data.draw(split(garbage))
    verdict, taken = feed(chunks)  # anything but ProxyHeaderError escapes and fails the test
    # The verdict stands whatever follows: parsing everything at once gives the same one.
    try:
        whole: object = parse_proxy_header(garbage)
    except ProxyHeaderError as exc:
        whole = exc.reason
    assert whole == verdict
    if isinstance(verdict, ProxyHeader):
        assert verdict.size <= taken
        assert verdict.size <= max(V1_SIZE_LIMIT, V2_SIZE_LIMIT)
