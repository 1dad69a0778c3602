"""End-to-end throughput of the core loop: N no-op subtasks through the whole path.

Starts its own mesh (embedded PostgreSQL with fsync on, Redis, registry, scheduler), enrolls M real
``maw-agent`` processes running the no-op TEST tool, submits N independent subtasks, and waits until
every one has a committed result. Prints one JSON object as its last line:

- ``subtasks_per_s``: N / (last commit - first submit), end to end;
- ``submit_to_assign_p50_ms`` / ``_p99_ms``: task committed → subtask assigned (scheduler's clock);
- ``result_to_commit_p50_ms`` / ``_p99_ms``: tool finished (agent's clock) → result committed;
- ``baseline_commits_per_s`` and ``ratio_to_baseline``: the same PostgreSQL doing one durable
  INSERT + COMMIT per item, measured in the same invocation, and how many times faster the batched
  path is than that naive one;
- ``processes``: CPU seconds and peak RSS of every process of the run.

Usage: ``make bench`` (``BENCH_N``, ``BENCH_AGENTS``, ``BENCH_SLOTS``, ``BENCH_TASK_SIZE`` override).
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import grpc
import psutil
import psycopg
from maw.common.v1 import machine_pb2
from maw.scheduler.v1 import resources_pb2 as spb
from maw.scheduler.v1 import stats_service_pb2, stats_service_pb2_grpc
from maw.scheduler.v1 import task_service_pb2 as tpb
from maw.scheduler.v1 import task_service_pb2_grpc as tpb_grpc

from deploy.local import Endpoints, Stack
from deploy.local._procs import Child
from tests.integration.clients import enroll, login

ROOT = Path(__file__).resolve().parents[1]


def percentile(values: list[float], q: float) -> float:
    """The q-quantile (0–1) of values, nearest-rank."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


class Sampler:
    """Samples CPU time and RSS of a set of processes in a thread."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.procs = {name: psutil.Process(pid) for name, pid in pids.items()}
        self.peak_rss = dict.fromkeys(pids, 0)
        self.cpu_start = {n: self._cpu(p) for n, p in self.procs.items()}
        self.cpu_end: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _cpu(proc: psutil.Process) -> float:
        try:
            total = proc.cpu_times()
            # Children that exited and were reaped (PostgreSQL backends) count in children_*; live ones below.
            value = total.user + total.system + total.children_user + total.children_system
            for child in proc.children(recursive=True):
                t = child.cpu_times()
                value += t.user + t.system
            return float(value)
        except psutil.Error:
            return 0.0

    @staticmethod
    def _rss(proc: psutil.Process) -> int:
        try:
            return int(proc.memory_info().rss) + sum(int(c.memory_info().rss) for c in proc.children(recursive=True))
        except psutil.Error:
            return 0

    def _run(self) -> None:
        while not self._stop.wait(0.25):
            for name, proc in self.procs.items():
                self.peak_rss[name] = max(self.peak_rss[name], self._rss(proc))

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> dict[str, dict[str, float]]:
        self._stop.set()
        self._thread.join()
        return {
            name: {
                "cpu_s": round(self._cpu(proc) - self.cpu_start[name], 2),
                "peak_rss_mb": round(self.peak_rss[name] / 2**20, 1),
            }
            for name, proc in self.procs.items()
        }


def baseline_commits_per_s(database_url: str, n: int = 300) -> float:
    """The naive durable path on the same server: one INSERT and one COMMIT per item."""
    with psycopg.connect(database_url) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS public.bench_baseline (id text PRIMARY KEY, at timestamptz)")
        conn.commit()
        started = time.perf_counter()
        for _ in range(n):
            conn.execute("INSERT INTO public.bench_baseline VALUES (%s, now())", (uuid.uuid4().hex,))
            conn.commit()
        elapsed = time.perf_counter() - started
        conn.execute("DROP TABLE public.bench_baseline")
        conn.commit()
    return n / elapsed


async def run(n: int, agents: int, slots: int, task_size: int) -> dict[str, Any]:
    data = Path(tempfile.mkdtemp(prefix="maw-bench-"))
    stack = Stack(data_dir=data, ports=Endpoints.random(), database_url="", redis_url="")
    stack.database_url = stack.redis_url = ""  # always its own servers, fsync on: "durable" means it
    children: list[Child] = []
    try:
        stack.start_postgres()
        stack.start_redis()
        stack.start_service("registry")
        stack.start_service("scheduler")
        target = f"127.0.0.1:{stack.ports.scheduler}"
        async with grpc.aio.insecure_channel(f"127.0.0.1:{stack.ports.registry}") as registry:
            admin = await login(registry, "admin", stack.admin_password)
            for i in range(agents):
                worker, credential = await enroll(registry, admin, f"bench-{i}", [machine_pb2.TOOL_KIND_TEST])
                cred_file = data / f"agent-{i}.credential"
                cred_file.write_text(credential)
                cred_file.chmod(0o600)
                argv = [
                    sys.executable, "-m", "maw_agent", "run", "--server", target, "--worker", worker,
                    "--credential-file", str(cred_file), "--capacity-slots", str(slots),
                    "--work-dir", str(data / f"agent-{i}"), "--tool", "test", "--log-level", "WARNING",
                ]  # fmt: skip
                children.append(Child(f"agent-{i}", argv, stack.log_dir / f"agent-{i}.log", cwd=ROOT))
        async with grpc.aio.insecure_channel(target) as channel:
            stats = stats_service_pb2_grpc.StatsServiceStub(channel)
            deadline = time.monotonic() + 60
            while True:
                got = await stats.GetStats(stats_service_pb2.GetStatsRequest(), metadata=admin, timeout=5)
                if got.total_slots >= agents * slots:
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"agents did not connect: {got.total_slots} slots of {agents * slots}")
                await asyncio.sleep(0.2)
            baseline = baseline_commits_per_s(stack.database_url)
            pids = {name: c.pid for name, c in stack.children.items()} | {c.name: c.pid for c in children}
            sampler = Sampler(pids)
            sampler.start()
            tasks = tpb_grpc.TaskServiceStub(channel)
            sizes = [min(task_size, n - i) for i in range(0, n, task_size)]
            started = time.time()

            async def submit(size: int) -> None:
                plan = tpb.SubtaskGraph(
                    subtasks=[
                        spb.SubtaskSpec(
                            key=f"s{i}", preferred_tool=machine_pb2.ToolChoice(kind=machine_pb2.TOOL_KIND_TEST)
                        )
                        for i in range(size)
                    ]
                )
                await tasks.CreateTask(
                    tpb.CreateTaskRequest(task=spb.Task(description="bench"), graph=plan), metadata=admin, timeout=120
                )

            await asyncio.gather(*(submit(s) for s in sizes))
            with psycopg.connect(stack.database_url, autocommit=True) as conn:
                while True:
                    done = conn.execute("SELECT count(*) FROM scheduler.results").fetchone()
                    assert done is not None
                    if done[0] >= n:
                        break
                    if time.time() - started > 600:
                        raise RuntimeError(f"only {done[0]} of {n} results after 600 s")
                    await asyncio.sleep(0.05)
            processes = sampler.stop()
            with psycopg.connect(stack.database_url) as conn:
                last_commit = conn.execute("SELECT max(commit_time) FROM scheduler.results").fetchone()
                first_submit = conn.execute("SELECT min(create_time) FROM scheduler.tasks").fetchone()
                assert last_commit is not None and first_submit is not None
                created: dict[str, Any] = dict(conn.execute("SELECT id, create_time FROM scheduler.tasks").fetchall())
                assigned = conn.execute("SELECT task_id, body FROM scheduler.task_events WHERE kind = 2").fetchall()
                results = conn.execute("SELECT commit_time, body FROM scheduler.results").fetchall()
                exactly_once = conn.execute(
                    "SELECT count(*) FROM (SELECT task_id, key FROM scheduler.results"
                    " WHERE outcome = 1 GROUP BY task_id, key HAVING count(*) > 1) d"
                ).fetchone()
    finally:
        for child in children:
            child.stop()
        stack.stop()
    wait_ms = []
    for task_id, body in assigned:
        event = tpb.TaskEvent.FromString(body)
        change = event.subtask_state_changed
        if change.subtask.state == spb.SUBTASK_STATE_ASSIGNED and change.subtask.attempt == 1:
            wait_ms.append((event.time.ToDatetime().timestamp() - created[task_id].timestamp()) * 1000)
    commit_ms = []
    for commit_time, body in results:
        result = spb.SubtaskResult.FromString(body)
        if result.HasField("finish_time"):
            commit_ms.append((commit_time.timestamp() - result.finish_time.ToDatetime().timestamp()) * 1000)
    elapsed = last_commit[0].timestamp() - first_submit[0].timestamp()
    rate = n / elapsed
    return {
        "n": n,
        "agents": agents,
        "slots_per_agent": slots,
        "task_size": task_size,
        "elapsed_s": round(elapsed, 3),
        "subtasks_per_s": round(rate, 1),
        "submit_to_assign_p50_ms": round(percentile(wait_ms, 0.5), 1),
        "submit_to_assign_p99_ms": round(percentile(wait_ms, 0.99), 1),
        "result_to_commit_p50_ms": round(percentile(commit_ms, 0.5), 1),
        "result_to_commit_p99_ms": round(percentile(commit_ms, 0.99), 1),
        "result_to_commit_mean_ms": round(statistics.fmean(commit_ms), 1) if commit_ms else None,
        "duplicate_successes": exactly_once[0] if exactly_once else None,
        "baseline_commits_per_s": round(baseline, 1),
        "ratio_to_baseline": round(rate / baseline, 2),
        "processes": processes,
        "cpus": os.cpu_count(),
    }


def main() -> None:
    n = int(os.environ.get("BENCH_N", "10000"))
    agents = int(os.environ.get("BENCH_AGENTS", "2"))
    slots = int(os.environ.get("BENCH_SLOTS", "256"))
    task_size = int(os.environ.get("BENCH_TASK_SIZE", "1000"))
    report = asyncio.run(run(n, agents, slots, task_size))
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    (out / f"throughput-{int(time.time())}.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report))


if __name__ == "__main__":
    main()
