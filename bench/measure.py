"""Measuring helpers of the benchmarks: percentiles and CPU time of the processes of a run."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import psutil

__all__ = ["CpuMeter", "latency", "per_item_ms", "percentile"]


def percentile(values: Sequence[float], q: float) -> float:
    """The q-quantile (0–1) of values, nearest-rank."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def latency(values_ms: Sequence[float]) -> dict[str, float | int]:
    """p50 / p99 / max (ms, one decimal) and the sample count of a latency series."""
    return {
        "p50_ms": round(percentile(values_ms, 0.5), 2),
        "p99_ms": round(percentile(values_ms, 0.99), 2),
        "max_ms": round(max(values_ms), 2) if values_ms else float("nan"),
        "samples": len(values_ms),
    }


def _cpu_s(proc: psutil.Process) -> float:
    """User + system CPU seconds of a process and all its descendants, live or reaped."""
    try:
        total = proc.cpu_times()
        children = proc.children(recursive=True)
    except psutil.Error:
        return 0.0
    # Children that exited and were reaped (PostgreSQL backends, tool subprocesses) count in children_*.
    value = total.user + total.system + total.children_user + total.children_system
    for child in children:
        try:
            times = child.cpu_times()
        except psutil.Error:
            continue  # gone between the listing and the reading: its parent's children_* has it (or will)
        value += times.user + times.system
    return float(value)


class CpuMeter:
    """CPU seconds each named process (with its descendants) spends between :meth:`start` and :meth:`stop`."""

    def __init__(self, pids: Mapping[str, int]) -> None:
        self.procs = {name: psutil.Process(pid) for name, pid in pids.items()}
        self._start: dict[str, float] = {}

    def start(self) -> None:
        """Take the 'before' reading."""
        self._start = {name: _cpu_s(proc) for name, proc in self.procs.items()}

    def stop(self) -> dict[str, float]:
        """CPU seconds per process since :meth:`start`."""
        return {name: _cpu_s(proc) - self._start.get(name, 0.0) for name, proc in self.procs.items()}


def per_item_ms(cpu_s: Mapping[str, float], items: int, groups: Mapping[str, str]) -> dict[str, float]:
    """CPU ms per item, summed by group (e.g. ``agent-0``, ``agent-1`` → ``agent``), plus ``total``."""
    out: dict[str, float] = {}
    for name, seconds in cpu_s.items():
        group = groups.get(name, name)
        out[group] = out.get(group, 0.0) + seconds * 1000 / max(items, 1)
    rounded = {name: round(value, 3) for name, value in sorted(out.items())}
    rounded["total"] = round(sum(out.values()), 3)
    return rounded
