"""Coverage-guided fuzzing of the frame scanner with atheris (not part of the test suite).

The input's first byte picks the direction, compression and limit; the rest is the
stream, cut where the next bytes say. Only ProtocolError may come out, and after one
the scanner stays dead. See tests/fuzz/README.md.
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    from wsgate.errors import ProtocolError
    from wsgate.frames import FrameScanner

_LIMITS = (0, 1, 125, 126, 65_536, 1 << 20)


def test_one_input(data: bytes) -> None:
    if not data:
        return
    settings, stream = data[0], data[1:]
    scanner = FrameScanner(
        masked=bool(settings & 1),
        max_message_size=_LIMITS[(settings >> 2) % len(_LIMITS)],
        allow_rsv1=bool(settings & 2),
    )
    position = 0
    while position < len(stream):
        step = 1 + stream[position] % 97
        chunk = stream[position : position + step]
        position += step
        try:
            scanner.receive_data(chunk)
        except ProtocolError:
            try:
                scanner.receive_data(b"\x81")
            except ProtocolError:
                return
            raise AssertionError("a scanner that raised accepted more data") from None


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
