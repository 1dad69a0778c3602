"""Peers run by `make bench-peers` on the bench's own servers: PgQueuer (PostgreSQL) and Celery (Redis).

Each runs the same no-op as maw's in-process mode: a backlog of N jobs (throughput, CPU per job) and one job
at a time to an idle worker (dispatch and round trip), so ``ratios`` compares like with like. Both packages
are optional (requirements/bench.txt) and loaded by name; a missing one is reported, not fatal.
"""

from __future__ import annotations

import asyncio
import importlib
import os
import sys
import time
from datetime import timedelta
from typing import Any

import psutil
import psycopg

from bench.measure import CpuMeter, latency, per_item_ms
from bench.mesh import BenchMesh, Proc

__all__ = ["peers", "ratios"]

_BATCH = 1000  # jobs per enqueue call / per submit wave


def _optional(name: str) -> Any:
    """The module ``name``, or None when the bench extra is not installed."""
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


async def pgqueuer(mesh: BenchMesh, n: int, samples: int) -> dict[str, Any]:
    """PgQueuer in this process, durable tables, on its own database of the bench's PostgreSQL."""
    pgq, asyncpg = _optional("pgqueuer"), _optional("asyncpg")
    if pgq is None or asyncpg is None:
        return {"skipped": "pgqueuer or asyncpg is not installed (pip install -r requirements/bench.txt)"}
    url = mesh.database_url.rsplit("/", 1)[0] + "/bench_pgqueuer"
    with psycopg.connect(mesh.database_url, autocommit=True) as admin:
        admin.execute("DROP DATABASE IF EXISTS bench_pgqueuer")
        admin.execute("CREATE DATABASE bench_pgqueuer")
    # asyncpg: PgQueuer's primary driver (its psycopg driver's NOTIFY watcher holds the connection up to 1 s).
    producer = await asyncpg.connect(url)
    worker = await asyncpg.connect(url)
    try:
        queries = pgq.Queries(pgq.AsyncpgDriver(producer))
        await queries.install()
        meter = CpuMeter({"bench": os.getpid(), "postgres": mesh.pids()["postgres"]})
        meter.start()
        started = time.time()
        for i in range(0, n, _BATCH):
            size = min(_BATCH, n - i)
            await queries.enqueue(["noop"] * size, [None] * size, [0] * size)
        done = 0
        manager = pgq.QueueManager(pgq.Queries(pgq.AsyncpgDriver(worker)))

        @manager.entrypoint("noop")  # type: ignore[untyped-decorator]
        async def noop(job: Any) -> None:
            nonlocal done
            done += 1

        await manager.run(batch_size=100, mode=importlib.import_module("pgqueuer.types").QueueExecutionMode.drain)
        elapsed = time.time() - started
        cpu = meter.stop()
        figures: dict[str, Any] = {
            "n": n,
            "done": done,
            "elapsed_s": round(elapsed, 3),
            "jobs_per_s": round(done / elapsed, 1),
            "cpu_ms_per_job": per_item_ms(cpu, done, {}),
            "idle": await _pgqueuer_idle(pgq, queries, worker, samples),
        }
    finally:
        await producer.close()
        await worker.close()
    return figures


async def _pgqueuer_idle(pgq: Any, queries: Any, worker: Any, samples: int) -> dict[str, Any]:
    """One job at a time: enqueue → entrypoint started, → terminal status seen (CompletionWatcher)."""
    manager = pgq.QueueManager(pgq.Queries(pgq.AsyncpgDriver(worker)))
    begun: dict[Any, float] = {}

    @manager.entrypoint("idle")  # type: ignore[untyped-decorator]
    async def idle(job: Any) -> None:
        begun[job.id] = time.time()

    running = asyncio.create_task(manager.run(batch_size=1, dequeue_timeout=timedelta(seconds=1)))
    dispatch_ms, round_trip_ms = [], []
    try:
        await asyncio.sleep(0.5)
        watcher = importlib.import_module("pgqueuer.core.completion").CompletionWatcher(
            queries.driver, queries=queries, debounce=timedelta(milliseconds=1)
        )
        async with watcher:
            for _ in range(samples):
                sent = time.time()
                (job_id,) = await queries.enqueue("idle", None)
                await asyncio.wait_for(watcher.wait_for(job_id), 30)
                round_trip_ms.append((time.time() - sent) * 1000)
                dispatch_ms.append((begun[job_id] - sent) * 1000)
    finally:
        manager.shutdown.set()
        await asyncio.wait_for(running, 30)
    return {"enqueue_to_started": latency(dispatch_ms), "round_trip": latency(round_trip_ms)}


def celery(mesh: BenchMesh, n: int, samples: int) -> dict[str, Any]:
    """Celery 5 with the bench's Redis as broker and result backend, a prefork worker of 2 processes."""
    if _optional("celery") is None:
        return {"skipped": "celery is not installed (pip install -r requirements/bench.txt)"}
    url = mesh.redis_url.rsplit("/", 1)[0] + "/1"
    os.environ["BENCH_CELERY_URL"] = url
    peer = importlib.import_module("bench.celery_peer")
    argv = [sys.executable, "-m", "celery", "-A", "bench.celery_peer", "worker", "-P", "prefork", "-c", "2",
            "--without-gossip", "--without-mingle", "--without-heartbeat", "-l", "WARNING"]  # fmt: skip
    worker = Proc("celery", argv, mesh.stack.log_dir / "celery.log", env={**os.environ, "BENCH_CELERY_URL": url})
    try:
        peer.noop.delay().get(timeout=60)  # the worker is up and warm
        meter = CpuMeter({"celery": worker.pid, "redis": mesh.pids()["redis"], "bench": os.getpid()})
        meter.start()
        started = time.time()
        results = [peer.noop.delay() for _ in range(n)]
        peer.app.ResultSet(results).get(timeout=600)
        elapsed = time.time() - started
        cpu = meter.stop()
        dispatch_ms, round_trip_ms = [], []
        for _ in range(samples):
            sent = time.time()
            begun = peer.noop.delay().get(timeout=30)
            round_trip_ms.append((time.time() - sent) * 1000)
            dispatch_ms.append((begun - sent) * 1000)
    finally:
        worker.stop()
    return {
        "n": n,
        "done": len(results),
        "elapsed_s": round(elapsed, 3),
        "jobs_per_s": round(len(results) / elapsed, 1),
        "cpu_ms_per_job": per_item_ms(cpu, len(results), {}),
        "durable": False,
        "idle": {"delay_to_started": latency(dispatch_ms), "round_trip": latency(round_trip_ms)},
    }


async def peers(mesh: BenchMesh, n: int, samples: int) -> dict[str, Any]:
    """Both peers, one after the other, on the servers of ``mesh`` (maw's agents idle meanwhile)."""
    return {
        "pgqueuer": await pgqueuer(mesh, n, samples),
        "celery": await asyncio.to_thread(celery, mesh, n, samples),
        "python": sys.version.split()[0],
        "cpus": psutil.cpu_count(),
    }


def ratios(ours: dict[str, Any] | None, theirs: dict[str, Any]) -> dict[str, float | None]:
    """ours / peer for throughput (higher is better for us) and idle round-trip p50 (lower is better)."""
    out: dict[str, float | None] = {}
    if ours is None:
        return out
    rate = ours["backlog"]["subtasks_per_s"]
    trip = ours["idle"]["round_trip"]["p50_ms"]
    for name in ("pgqueuer", "celery"):
        peer = theirs.get(name, {})
        if "jobs_per_s" not in peer:
            out[f"throughput_vs_{name}"] = out[f"idle_round_trip_p50_vs_{name}"] = None
            continue
        out[f"throughput_vs_{name}"] = round(rate / peer["jobs_per_s"], 2) if rate else None
        out[f"idle_round_trip_p50_vs_{name}"] = round(trip / peer["idle"]["round_trip"]["p50_ms"], 2)
    return out
