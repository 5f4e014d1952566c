"""Coverage-guided fuzzing of the client handshake's sans-I/O steps with atheris.

Not part of the test suite; see tests/fuzz/README.md. The steps are the ones a
connection goes through before anything is sent to a backend: the PROXY header
(on a listener that requires one), the head reader's limits, the head parsers,
and the upgrade rules. The input's first byte picks the listener kind, the rest is
cut into reads where the next bytes say. Only the documented errors may come out,
and h11 and httptools (where installed) must come to the same head or refusal.
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    from wsgate.errors import HandshakeError, ProxyHeaderError
    from wsgate.handshake import check_client_request
    from wsgate.heads import HeadReader, httptools, parse_request_head
    from wsgate.proxy_protocol import NEED_MORE, parse_proxy_header

_VERSIONS = (None, "v1", "v2", "any")


def _reads(stream: bytes) -> list[bytes]:
    reads, position = [], 0
    while position < len(stream):
        step = 1 + stream[position] % 61
        reads.append(stream[position + 1 : position + 1 + step])
        position += 1 + step
    return [read for read in reads if read]


def test_one_input(data: bytes) -> None:
    if not data:
        return
    versions = _VERSIONS[data[0] % len(_VERSIONS)]
    proxy = bytearray() if versions is not None else None
    head = HeadReader(16 * 1024, 100, 8 * 1024)
    try:
        for read in _reads(data[1:]):
            if proxy is not None:
                proxy += read
                header = parse_proxy_header(proxy, versions)
                if header is NEED_MORE:
                    continue
                read, proxy = bytes(proxy[header.size :]), None
            complete = head.receive_data(read)
            if complete is None:
                continue
            reference = _outcome(complete, "h11")
            if httptools is not None:
                assert _outcome(complete, "httptools") == reference, complete
            return
    except (ProxyHeaderError, HandshakeError):
        return


def _outcome(head: bytes, parser: str) -> object:
    try:
        request, after = parse_request_head(head, parser)  # type: ignore[arg-type]
        return request, after, check_client_request(request)
    except HandshakeError as exc:
        return exc.status, exc.reason


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
