"""Coverage-guided fuzzing of the client handshake's sans-I/O steps with atheris.

Not part of the test suite; see tests/fuzz/README.md. The steps are the ones a
connection goes through before anything is sent to a backend: the PROXY header
(on a listener that requires one), the head reader's limits, h11, and the upgrade
rules. The input's first byte picks the listener kind, the rest is cut into reads
where the next bytes say. Only the documented errors may come out.
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    import h11

    from wsgate.errors import HandshakeError, ProxyHeaderError
    from wsgate.handshake import HeadReader, check_client_request
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
    parser = h11.Connection(h11.SERVER, max_incomplete_event_size=16 * 1024)
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
            parser.receive_data(complete)
            event = parser.next_event()
            if isinstance(event, h11.Request):
                check_client_request(event)
            return
    except (ProxyHeaderError, HandshakeError, h11.RemoteProtocolError):
        return


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
