"""CPU time and memory of process trees and of the machine, read from /proc."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

_TICK = os.sysconf("SC_CLK_TCK")
_HAS_SCHEDSTAT = os.path.exists("/proc/self/schedstat")


def _parent_map() -> dict[int, int]:
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # exited while we looked
        parents[int(entry)] = int(fields[1])
    return parents


def tree(root: int) -> list[int]:
    """`root` and all its descendants (nginx's master and worker, for example)."""
    children: dict[int, list[int]] = {}
    for pid, parent in _parent_map().items():
        children.setdefault(parent, []).append(pid)
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, ()))
    return found


def cpu_seconds(pid: int) -> float:
    """CPU time of a process (all its threads), in seconds; 0 if it is gone.

    The sum over threads of /proc/PID/task/TID/schedstat (ns on CPU) when the
    kernel has it: utime + stime of /proc/PID/stat are the same time split in
    two, but counted in 10 ms ticks, too coarse for the low-rate latency run.
    """
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0.0
    if not _HAS_SCHEDSTAT:
        return _stat_cpu_seconds(pid)
    total = 0
    for tid in tids:
        try:
            total += int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue  # the thread exited while we looked
    return total / 1e9


def _stat_cpu_seconds(pid: int) -> float:
    """utime + stime from /proc/PID/stat, in seconds; 0 if the process is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    # After the command name: state is field 3 of stat(5), utime 14 and stime 15.
    return (int(fields[11]) + int(fields[12])) / _TICK


def rss_kib(pid: int) -> int:
    """Resident set size of a process, in KiB (VmRSS); 0 if it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


@dataclass(frozen=True)
class MachineTimes:
    busy: float  # seconds of CPU busy summed over all CPUs
    total: float


def machine_times() -> MachineTimes:
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    total = sum(values[:8])  # guest time is already counted in user
    return MachineTimes((total - idle) / _TICK, total / _TICK)


class CpuSampler:
    """CPU seconds of named process groups and of the machine between `start` and `stop`."""

    def __init__(self, groups: dict[str, list[int]]) -> None:
        self.groups = groups
        self._before: dict[str, float] = {}
        self._machine_before = machine_times()
        self._wall_before = 0.0

    def _read(self) -> dict[str, float]:
        return {name: sum(cpu_seconds(pid) for pid in pids) for name, pids in self.groups.items()}

    def start(self, wall: float) -> None:
        self._before = self._read()
        self._machine_before = machine_times()
        self._wall_before = wall

    def stop(self, wall: float) -> dict[str, float]:
        """Cores used per group (CPU seconds / wall seconds), plus `machine` as busy fraction of all CPUs."""
        after = self._read()
        machine = machine_times()
        elapsed = max(wall - self._wall_before, 1e-9)
        used = {name: (after[name] - self._before[name]) / elapsed for name in after}
        span = max(machine.total - self._machine_before.total, 1e-9)
        used["machine"] = (machine.busy - self._machine_before.busy) / span
        used["seconds"] = elapsed
        return used


def tree_cpu_seconds(pids: list[int]) -> float:
    return sum(cpu_seconds(pid) for pid in pids)


def tree_rss_kib(pids: list[int]) -> int:
    return sum(rss_kib(pid) for pid in pids)
