"""`python -m bench.soak` on a tiny scale: a few attackers per phase, half-second waits.

It checks that the documented abuse soak still runs, and what it must show at any
scale: slow and silent handshakes dropped with 408, every malformed one answered
4xx without a backend connection, every connection of the burst upgraded, and
no good client's message lost.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_the_soak_runs_every_phase_and_the_gateway_holds(tmp_path):
    run = subprocess.run(
        [sys.executable, "-m", "bench.soak", "--scale", "0.02", "--good", "4",
         "--handshake-timeout", "1", "--out", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    (result_file,) = tmp_path.glob("soak-*.json")
    result = json.loads(result_file.read_text())
    phases = {phase["phase"]: phase for phase in result["phases"]}
    assert list(phases) == ["slowloris", "idle", "malformed", "flood", "burst", "firehose"]
    for name in ("slowloris", "idle"):
        assert phases[name]["answers"] == {"408": phases[name]["attackers"]}
        assert phases[name]["backend_connections"] == 0
    malformed = phases["malformed"]
    assert sum(malformed["answers"].values()) == malformed["attackers"] == 5
    assert all(answer.startswith("4") for answer in malformed["answers"]), malformed["answers"]
    assert malformed["backend_connections"] == 0
    for name in ("flood", "burst", "firehose"):
        assert phases[name]["answers"] == {"upgraded": phases[name]["attackers"]}
    assert result["good_sent"] > 0
    assert result["good_lost"] == 0
    assert result["good_disconnected"] == 0
