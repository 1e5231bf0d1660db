"""What a process costs, from /proc: CPU seconds (utime + stime) and peak RSS (VmHWM)."""

from __future__ import annotations

import os

__all__ = ["cpu_seconds", "peak_rss_bytes", "tree_cpu_seconds", "tree_peak_rss_bytes", "children"]

_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of the process (all its threads), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        # The command name may contain spaces; fields after the closing paren are fixed.
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def peak_rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def _tree(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children(p))
    return out


def tree_cpu_seconds(pid: int) -> float:
    """CPU of the process and its live descendants (a wrapper script and its child count as one)."""
    total = 0.0
    for p in _tree(pid):
        try:
            total += cpu_seconds(p)
        except OSError:
            pass
    return total


def tree_peak_rss_bytes(pid: int) -> int:
    """The largest VmHWM in the process tree (the exporter itself, not a wrapper)."""
    best = 0
    for p in _tree(pid):
        try:
            best = max(best, peak_rss_bytes(p))
        except OSError:
            pass
    return best
