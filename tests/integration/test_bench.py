"""`make bench` in miniature: its JSON (last line) has every field, with counts and latencies that add up."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
N, SUBPROCESS_N, SAMPLES = 40, 5, 4


def _latency_ok(figures: dict[str, Any], samples: int) -> None:
    assert figures["samples"] == samples
    assert 0 < figures["p50_ms"] <= figures["p99_ms"] <= figures["max_ms"]


@pytest.fixture(scope="module")
def report() -> dict[str, Any]:
    env = {
        **os.environ,
        "BENCH_N": str(N),
        "BENCH_SUBPROCESS_N": str(SUBPROCESS_N),
        "BENCH_IDLE_SAMPLES": str(SAMPLES),
        "BENCH_AGENTS": "1",
        "BENCH_SLOTS": "8",
        "BENCH_TASK_SIZE": "30",
        "BENCH_PEERS": "0",
    }
    done = subprocess.run(
        [sys.executable, "-m", "bench.throughput"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


@pytest.mark.slow
@pytest.mark.parametrize(("mode", "n"), [("inprocess", N), ("subprocess", SUBPROCESS_N)])
def test_backlog_counts_every_subtask_once_and_reports_its_cost(report: dict[str, Any], mode: str, n: int) -> None:
    backlog = report["modes"][mode]["backlog"]
    assert backlog["n"] == backlog["succeeded"] == n
    assert backlog["failed_subtasks"] == backlog["failed_results"] == backlog["duplicates"] == 0
    assert backlog["subtasks_per_s"] > 0
    assert backlog["elapsed_s"] > 0
    _latency_ok(backlog["submit_to_assign"], n)
    _latency_ok(backlog["result_to_commit"], n)
    cpu = backlog["cpu_ms_per_subtask"]
    assert {"scheduler", "registry", "evaluator", "agent", "postgres", "total"} <= set(cpu)
    assert cpu["scheduler"] > 0 and cpu["agent"] > 0
    assert all(v >= 0 for v in cpu.values())
    assert cpu["total"] >= max(v for k, v in cpu.items() if k != "total") - 0.01


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["inprocess", "subprocess"])
def test_idle_latency_is_measured_per_subtask_in_order(report: dict[str, Any], mode: str) -> None:
    idle = report["modes"][mode]["idle"]
    assert idle["samples"] == idle["succeeded"] == SAMPLES
    assert idle["failed_subtasks"] == idle["failed_results"] == idle["duplicates"] == idle["watch_failed"] == 0
    for name in ("create_to_received", "create_to_assigned_event", "create_to_committed", "round_trip"):
        _latency_ok(idle[name], SAMPLES)
    # Each sample is received before its result is committed, and committed before a watcher sees it.
    assert idle["create_to_received"]["p50_ms"] <= idle["create_to_committed"]["p50_ms"]
    assert idle["create_to_committed"]["p50_ms"] <= idle["round_trip"]["p50_ms"]


@pytest.mark.slow
def test_peers_are_left_out_unless_asked(report: dict[str, Any]) -> None:
    assert "peers" not in report and "ratios" not in report
    assert report["agents"] == 1 and report["cpus"] >= 1
