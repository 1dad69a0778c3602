"""`make bench`: maw's core loop measured end to end on its own mesh, optionally beside peer queues.

Starts its own mesh (embedded PostgreSQL with fsync on, Redis, registry, scheduler, evaluator) and
``BENCH_AGENTS`` real ``maw-agent`` processes, then for each mode (``inprocess``: the TEST tool's no-op;
``subprocess``: the SHELL tool running ``true`` in a git worktree) measures a backlog (N subtasks at once:
throughput, queueing, CPU per subtask per process) and idle dispatch (one subtask at a time to an idle agent).
With ``BENCH_PEERS=1`` (``make bench-peers``) PgQueuer and Celery run the same no-op on the same servers.
Prints one JSON object as its last line (also written to bench/results/); docs/benchmarks.md explains the
fields.

Knobs: ``BENCH_N`` (in-process backlog, 10000), ``BENCH_SUBPROCESS_N`` (1000), ``BENCH_IDLE_SAMPLES`` (200),
``BENCH_AGENTS`` (2), ``BENCH_SLOTS`` (256), ``BENCH_TASK_SIZE`` (1000), ``BENCH_MODES``
(``inprocess,subprocess``), ``BENCH_PEERS`` (0), ``BENCH_PEER_N`` (= ``BENCH_N``).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any

from bench.core_loop import MODES, backlog, idle
from bench.mesh import ROOT, BenchMesh
from bench.peers import peers, ratios

__all__ = ["Knobs", "main", "run"]


def _int(name: str, default: int) -> int:
    return int(os.environ.get(name, str(default)))


@dataclass(frozen=True)
class Knobs:
    """Sizes of one run, from the environment (``BENCH_*``)."""

    n: int = field(default_factory=lambda: _int("BENCH_N", 10000))
    subprocess_n: int = field(default_factory=lambda: _int("BENCH_SUBPROCESS_N", 1000))
    idle_samples: int = field(default_factory=lambda: _int("BENCH_IDLE_SAMPLES", 200))
    agents: int = field(default_factory=lambda: _int("BENCH_AGENTS", 2))
    slots: int = field(default_factory=lambda: _int("BENCH_SLOTS", 256))
    task_size: int = field(default_factory=lambda: _int("BENCH_TASK_SIZE", 1000))
    modes: tuple[str, ...] = field(
        default_factory=lambda: tuple(m for m in os.environ.get("BENCH_MODES", ",".join(MODES)).split(",") if m)
    )
    peers: bool = field(default_factory=lambda: os.environ.get("BENCH_PEERS", "0") not in ("", "0"))
    peer_n: int = field(default_factory=lambda: _int("BENCH_PEER_N", _int("BENCH_N", 10000)))

    def backlog_n(self, mode: str) -> int:
        """How many subtasks the backlog of ``mode`` pushes."""
        return self.subprocess_n if mode == "subprocess" else self.n


async def run(knobs: Knobs) -> dict[str, Any]:
    """One invocation: every mode on one mesh, then (if asked) the peers on the same servers."""
    unknown = set(knobs.modes) - set(MODES)
    if unknown:
        raise ValueError(f"unknown BENCH_MODES {sorted(unknown)}; known: {', '.join(MODES)}")
    report: dict[str, Any] = {
        "agents": knobs.agents,
        "slots_per_agent": knobs.slots,
        "cpus": os.cpu_count(),
        "modes": {},
    }
    async with BenchMesh(knobs.agents, knobs.slots) as mesh:
        for mode in knobs.modes:
            # Idle first: the backlog leaves work (worktree removal, relays) behind that would queue ahead.
            idle_figures = await idle(mesh, mode, knobs.idle_samples)
            report["modes"][mode] = {
                "backlog": await backlog(mesh, mode, knobs.backlog_n(mode), knobs.task_size),
                "idle": idle_figures,
            }
        if knobs.peers:
            report["peers"] = await peers(mesh, knobs.peer_n, knobs.idle_samples)
            report["ratios"] = ratios(report["modes"].get("inprocess"), report["peers"])
    return report


def main() -> None:
    """Run with the environment's knobs; print the JSON report as the last line."""
    report = asyncio.run(run(Knobs()))
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    (out / f"throughput-{int(time.time())}.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report))


if __name__ == "__main__":
    main()
