"""The core's tests are collected where the shell's dependencies are not installed.

Each test runs pytest in a child process whose imports of websockets, aiohttp,
uvloop, prometheus_client and dnspython fail as they would on a machine without them.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# The sans-I/O core's test modules: frames, handshake rules, hashing, health, routing, config...
CORE_TESTS = [
    "tests/test_config.py",
    "tests/test_explain.py",
    "tests/test_extended_connect.py",
    "tests/test_forwarding.py",
    "tests/test_frames.py",
    "tests/test_frames_fuzz.py",
    "tests/test_handshake.py",
    "tests/test_hashring.py",
    "tests/test_health.py",
    "tests/test_proxy_protocol.py",
    "tests/test_ratelimit.py",
    "tests/test_routing.py",
]
# The peers, the admin server and HTTP probes, the fast loop, the metrics, DNS discovery.
SHELL_PACKAGES = ("websockets", "aiohttp", "uvloop", "prometheus_client", "dns")

# Run as `python -c`: a finder ahead of all others refuses the shell's packages, then pytest runs.
_WITHOUT_SHELL = """
import sys

blocked = set(sys.argv.pop(1).split(","))


class WithoutShell:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in blocked:
            raise ModuleNotFoundError(f"No module named {name!r} (not installed here)", name=name)
        return None


assert not blocked & set(sys.modules), "already imported before the test could block it"
sys.meta_path.insert(0, WithoutShell())
import pytest

sys.exit(pytest.main(sys.argv[1:]))
"""


def collect(files: list[str]) -> subprocess.CompletedProcess[str]:
    """`pytest --collect-only` of `files`, with the shell's packages missing."""
    command = [
        sys.executable, "-c", _WITHOUT_SHELL, ",".join(SHELL_PACKAGES),
        "--collect-only", "-q", "-p", "no:cacheprovider", *files,
    ]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)


def test_the_cores_tests_are_collected_without_the_shells_dependencies():
    result = collect(CORE_TESTS)
    assert result.returncode == 0, result.stdout + result.stderr
    collected = {line.partition("::")[0] for line in result.stdout.splitlines() if "::" in line}
    assert collected == set(CORE_TESTS)


def test_without_httptools_h11_parses_every_head_and_choosing_httptools_is_refused():
    command = [
        sys.executable, "-c", _WITHOUT_SHELL, "httptools", "-q", "-p", "no:cacheprovider", "-rs",
        "tests/test_handshake.py", "tests/test_handshake_parsers.py",
        "tests/test_config.py::test_http_parser_httptools_is_refused_where_it_is_not_installed",
    ]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "httptools is not installed" in result.stdout  # its half of test_handshake is skipped
    assert " passed" in result.stdout


def test_a_shell_test_is_not_collected_without_them():
    # The same child, given an end-to-end test module, fails to import it: the block is real.
    result = collect(["tests/test_server.py"])
    assert result.returncode != 0
    assert "not installed here" in result.stdout + result.stderr
