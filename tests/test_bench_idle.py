"""`python -m bench.idle` on a small scale: hundreds of idle connections through one
wsgate process, heartbeats every half second, every client answering.

It checks the documented idle-connections run still works, and the sweeper with
many connections at once: every connection is pinged on time and none is lost.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_idle_connections_are_all_held_and_pinged(tmp_path):
    run = subprocess.run(
        [sys.executable, "-m", "bench.idle", "--conns", "300", "--heartbeat", "0.5",
         "--window", "3", "--procs", "2", "--out", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=90,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    (result_file,) = tmp_path.glob("idle-*.json")
    result = json.loads(result_file.read_text())
    assert result["connections"] == 300
    assert result["lost"] == 0
    # Three seconds at one ping per half second of quiet, each ping a few sweeper ticks
    # late at most: two each at the very least, and never more than one per interval.
    assert 2 <= result["pings_per_conn_min"]
    assert result["pings_per_conn_median"] <= 6
    assert 0 < result["kib_per_conn"] < 64
