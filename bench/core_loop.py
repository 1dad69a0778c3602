"""maw's own figures: a backlog of no-op subtasks through the whole path, and one at a time to an idle agent.

Two modes, each the same scheduler path with a different tool on the agent:

- ``inprocess``: the TEST tool's no-op, run inside the agent's process (no workspace, no subprocess);
- ``subprocess``: the SHELL tool running ``true`` in a git worktree of a local repository, the workspace
  and subprocess path AI tools take (worktree, tool process, diff snapshot, worktree removed).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import grpc
import psycopg
from google.protobuf import struct_pb2
from maw.common.v1 import machine_pb2
from maw.scheduler.v1 import resources_pb2 as spb
from maw.scheduler.v1 import task_service_pb2 as tpb
from maw.scheduler.v1 import task_service_pb2_grpc as tpb_grpc

from bench.measure import CpuMeter, latency, per_item_ms
from bench.mesh import BenchMesh
from bench.store import Progress, progress, timings

__all__ = ["MODES", "backlog", "idle"]

MODES = ("inprocess", "subprocess")
_DONE = {spb.SUBTASK_STATE_SUCCEEDED, spb.SUBTASK_STATE_FAILED, spb.SUBTASK_STATE_CANCELLED}


def _task(mesh: BenchMesh, mode: str, size: int, prefix: str) -> tpb.CreateTaskRequest:
    """A task of ``size`` independent no-op subtasks of ``mode``."""
    task = spb.Task(description=f"bench {mode}")
    options = None
    if mode == "subprocess":
        task.workspace.repository = mesh.repository
        options = struct_pb2.Struct()
        options.update({"command": "true"})
        tool = machine_pb2.ToolChoice(kind=machine_pb2.TOOL_KIND_SHELL)
    else:
        tool = machine_pb2.ToolChoice(kind=machine_pb2.TOOL_KIND_TEST)
    specs = [spb.SubtaskSpec(key=f"{prefix}{i}", preferred_tool=tool, tool_options=options) for i in range(size)]
    return tpb.CreateTaskRequest(task=task, graph=tpb.SubtaskGraph(subtasks=specs))


def _counts(done: Progress) -> dict[str, int]:
    return {
        "succeeded": done.succeeded,
        "failed_subtasks": done.failed_subtasks,
        "failed_results": done.failed_results,
        "duplicates": done.duplicates,
    }


async def _wait_ended(mesh: BenchMesh, task_ids: list[str], n: int, timeout_s: float) -> Progress:
    """Poll until every subtask of the tasks ended (succeeded on its current attempt, or failed)."""
    deadline = time.monotonic() + timeout_s
    with psycopg.connect(mesh.database_url, autocommit=True) as conn:
        while True:
            done = progress(conn, task_ids)
            if done.ended >= n:
                return done
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {done.ended} of {n} subtasks ended after {timeout_s:.0f} s: {done}")
            await asyncio.sleep(0.05)


async def backlog(mesh: BenchMesh, mode: str, n: int, task_size: int, timeout_s: float = 900) -> dict[str, Any]:
    """N subtasks submitted at once (tasks of ``task_size``); throughput and CPU until the last one ended."""
    meter = CpuMeter(mesh.pids())
    async with grpc.aio.insecure_channel(mesh.scheduler) as channel:
        tasks = tpb_grpc.TaskServiceStub(channel)
        sizes = [min(task_size, n - i) for i in range(0, n, task_size)]
        meter.start()
        created = await asyncio.gather(
            *(tasks.CreateTask(_task(mesh, mode, s, "s"), metadata=mesh.admin, timeout=300) for s in sizes)
        )
        task_ids = [t.task.name.removeprefix("tasks/") for t in created]
        done = await _wait_ended(mesh, task_ids, n, timeout_s)
    cpu = meter.stop()
    with psycopg.connect(mesh.database_url) as conn:
        times = timings(conn, task_ids)
    wait_ms = [(at - times.created[t]) * 1000 for (t, _), at in times.assigned.items()]
    commit_ms = [(committed - finished) * 1000 for _, _, _, finished, committed in times.results]
    elapsed = times.last_commit - times.first_create
    return {
        "n": n,
        "task_size": task_size,
        **_counts(done),
        "elapsed_s": round(elapsed, 3),
        "subtasks_per_s": round(done.succeeded / elapsed, 1) if elapsed > 0 else None,
        "submit_to_assign": latency(wait_ms),
        "result_to_commit": latency(commit_ms),
        "cpu_ms_per_subtask": per_item_ms(cpu, done.succeeded, {name: "agent" for name in cpu if "agent" in name}),
    }


async def _until_done(stream: grpc.aio.UnaryStreamCall[tpb.WatchTaskRequest, tpb.WatchTaskResponse]) -> int:
    """Read a WatchTask stream until its (only) subtask ends; that subtask state."""
    async for reply in stream:
        for event in reply.events:
            if event.WhichOneof("kind") == "subtask_state_changed":
                state = event.subtask_state_changed.subtask.state
                if state in _DONE:
                    return state
    raise RuntimeError("WatchTask ended before the subtask did")


async def idle(mesh: BenchMesh, mode: str, samples: int) -> dict[str, Any]:
    """One subtask at a time to an idle agent: CreateTask → assigned, → committed, → SUCCEEDED watched."""
    sent: dict[str, float] = {}
    seen_ms: list[float] = []
    failed = 0
    async with grpc.aio.insecure_channel(mesh.scheduler) as channel:
        tasks = tpb_grpc.TaskServiceStub(channel)
        for _ in range(samples):
            request = _task(mesh, mode, 1, "s")
            started = time.time()
            created = await tasks.CreateTask(request, metadata=mesh.admin, timeout=30)
            stream = tasks.WatchTask(tpb.WatchTaskRequest(name=created.task.name), metadata=mesh.admin, timeout=60)
            state = await _until_done(stream)
            seen = time.time()
            stream.cancel()
            sent[created.task.name.removeprefix("tasks/")] = started
            if state == spb.SUBTASK_STATE_SUCCEEDED:
                seen_ms.append((seen - started) * 1000)
            else:
                failed += 1
    with psycopg.connect(mesh.database_url) as conn:
        times = timings(conn, list(sent))
        done = progress(conn, list(sent))
    received_ms = [(begun - sent[t]) * 1000 for t, _, begun, _, _ in times.results]
    assigned_ms = [(at - sent[t]) * 1000 for (t, _), at in times.assigned.items()]
    committed_ms = [(committed - sent[t]) * 1000 for t, _, _, _, committed in times.results]
    return {
        "samples": samples,
        **_counts(done),
        "watch_failed": failed,
        "create_to_received": latency(received_ms),
        "create_to_assigned_event": latency(assigned_ms),
        "create_to_committed": latency(committed_ms),
        "round_trip": latency(seen_ms),
    }
