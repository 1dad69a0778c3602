"""Latency from a subtask state change committed in the scheduler to its render in the browser.

Starts its own mesh (embedded PostgreSQL with fsync on, Redis, registry, scheduler, the dashboard's file
server, Envoy), creates one task of independent TEST subtasks while no agent is connected, opens the task's
page in headless Chromium (dashboard/e2e/latency.mjs, through Envoy, gRPC-Web), then connects a
protocol-level agent (one slot) that finishes one subtask every ``BENCH_PACE_MS``. Every subtask goes
ASSIGNED → RUNNING → SUCCEEDED, each change its own committed event.

- Commit time: ``task_events.time`` in PostgreSQL (``now()`` of the committing transaction, i.e. its start,
  so the figure is an upper bound of commit → render).
- Render time: ``performance.timeOrigin + performance.now()`` in a MutationObserver callback when the DAG
  node's ``data-state`` shows the new state (``dom``), and at the following animation frame (``frame``,
  painted). Same machine, same clock.
- A change whose state the page never shows alone (a later one of the same subtask arrived in the same
  render) counts as rendered when the later state appears; ``coalesced`` says how many.
- Baseline in the same run: the same changes received by a plain Python gRPC ``WatchTask`` client
  straight to the scheduler; ``ratio_p50`` / ``ratio_p99`` = browser (dom) / baseline.

Prints one JSON object as its last line. Usage: ``make bench-dashboard`` (``BENCH_SUBTASKS``,
``BENCH_PACE_MS`` override).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import psycopg
from maw.agent.v1 import agent_service_pb2 as apb
from maw.common.v1 import machine_pb2, work_pb2
from maw.scheduler.v1 import resources_pb2 as spb
from maw.scheduler.v1 import task_service_pb2 as tpb
from maw.scheduler.v1 import task_service_pb2_grpc as tpb_grpc

from bench.measure import percentile
from deploy.local import Endpoints, Stack
from deploy.local.dashboard import DASHBOARD, build
from tests.integration.clients import Metadata, ScriptedAgent, enroll, eventually, login

TEST = machine_pb2.TOOL_KIND_TEST
CHROMIUM = os.environ.get("MAW_CHROMIUM", "/usr/bin/chromium")


def state_name(state: int) -> str:
    """The dashboard's spelling of a SubtaskState: SUBTASK_STATE_RUNNING → running."""
    return spb.SubtaskState.Name(state).removeprefix("SUBTASK_STATE_").lower()  # type: ignore[arg-type]


def committed_changes(database_url: str, task_id: str) -> list[tuple[int, str, str, float]]:
    """(sequence, subtask, state, commit epoch ms) of every subtask state change of the task."""
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT sequence, body, extract(epoch FROM time) * 1000 FROM scheduler.task_events"
            " WHERE task_id = %s ORDER BY sequence",
            (task_id,),
        ).fetchall()
    changes = []
    for sequence, body, at in rows:
        event = tpb.TaskEvent.FromString(bytes(body))
        if event.WhichOneof("kind") == "subtask_state_changed":
            changed = event.subtask_state_changed
            if changed.previous_state != changed.subtask.state:
                changes.append((sequence, changed.subtask.name, state_name(changed.subtask.state), float(at)))
    return changes


def match(
    changes: list[tuple[int, str, str, float]], records: list[list[Any]]
) -> tuple[list[float], list[float], int, int]:
    """Per committed change, ms until the page showed it (or a later state of the same subtask).

    Returns (dom latencies, frame latencies, coalesced, never shown).
    """
    shown: dict[str, list[tuple[str, float, float]]] = {}
    for name, state, dom, frame in records:
        shown.setdefault(name, []).append((state, float(dom), float(frame)))
    later: dict[str, list[str]] = {}
    for _, name, state, _ in changes:
        later.setdefault(name, []).append(state)
    dom_ms: list[float] = []
    frame_ms: list[float] = []
    coalesced = missing = 0
    position: dict[str, int] = {}
    for _, name, state, at in changes:
        k = position.get(name, 0)
        position[name] = k + 1
        acceptable = set(later[name][k:])
        hit = next((r for r in shown.get(name, []) if r[0] in acceptable and r[1] >= at - 50), None)
        if hit is None:
            missing += 1
            continue
        coalesced += hit[0] != state
        dom_ms.append(hit[1] - at)
        frame_ms.append((hit[2] or hit[1]) - at)
    return dom_ms, frame_ms, coalesced, missing


def summary(values: list[float]) -> dict[str, float]:
    return {
        "p50_ms": round(percentile(values, 0.5), 1),
        "p99_ms": round(percentile(values, 0.99), 1),
        "max_ms": round(max(values), 1) if values else float("nan"),
        "n": len(values),
    }


async def watch_baseline(channel: grpc.aio.Channel, admin: Metadata, task: str, seen: dict[int, float]) -> None:
    """A plain gRPC WatchTask client: when each event's sequence arrived (epoch ms)."""
    call = tpb_grpc.TaskServiceStub(channel).WatchTask(tpb.WatchTaskRequest(name=task), metadata=admin)
    async for reply in call:
        at = time.time() * 1000
        for event in reply.events:
            seen.setdefault(event.sequence, at)


async def drive(agent: ScriptedAgent, n: int, pace_s: float) -> None:
    """Finish the agent's assignments one by one, ``pace_s`` after each arrived."""

    def arrived(count: int) -> Callable[[], bool]:
        return lambda: len(agent.assignments) >= count

    for i in range(n):
        await eventually(arrived(i + 1), 30, f"assignment {i + 1}")
        await asyncio.sleep(pace_s)
        lease = agent.assignments[i].lease
        result = apb.Result(lease=lease, outcome=work_pb2.OUTCOME_SUCCEEDED, summary="done")
        agent.send(apb.ConnectRequest(results=apb.ResultBatch(results=[result])))


async def run(n: int, pace_ms: int) -> dict[str, Any]:
    data = Path(tempfile.mkdtemp(prefix="maw-bench-dashboard-"))
    stack = Stack(data_dir=data, ports=Endpoints.random(), database_url="", redis_url="")
    stack.database_url = stack.redis_url = ""  # always its own servers, fsync on
    agent: ScriptedAgent | None = None
    try:
        stack.start_postgres()
        stack.start_redis()
        stack.start_service("registry")
        stack.start_service("scheduler")
        stack.start_dashboard()
        stack.start_envoy()
        async with (
            grpc.aio.insecure_channel(f"127.0.0.1:{stack.ports.registry}") as registry,
            grpc.aio.insecure_channel(f"127.0.0.1:{stack.ports.scheduler}") as scheduler,
        ):
            admin = await login(registry, "admin", stack.admin_password)
            graph = tpb.SubtaskGraph(
                subtasks=[
                    spb.SubtaskSpec(key=f"s{i:03d}", preferred_tool=machine_pb2.ToolChoice(kind=TEST)) for i in range(n)
                ]
            )
            created = await tpb_grpc.TaskServiceStub(scheduler).CreateTask(
                tpb.CreateTaskRequest(task=spb.Task(description="dashboard latency benchmark"), graph=graph),
                metadata=admin,
                timeout=30,
            )
            task = created.task.name
            env = os.environ | {
                "MAW_URL": f"http://localhost:{stack.ports.gateway}/",
                "MAW_USER": "admin",
                "MAW_PASSWORD": stack.admin_password,
                "MAW_TASK": task,
                "MAW_SUBTASKS": str(n),
                "MAW_CHROMIUM": CHROMIUM,
            }
            node = shutil.which("node") or "node"
            proc = await asyncio.create_subprocess_exec(
                node, str(DASHBOARD / "e2e" / "latency.mjs"), cwd=DASHBOARD, env=env,
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            )  # fmt: skip
            assert proc.stdin is not None and proc.stdout is not None
            first = json.loads(await asyncio.wait_for(proc.stdout.readline(), 60))
            if first.get("step") != "observing":
                raise RuntimeError(f"the page did not get ready: {first}")

            received: dict[int, float] = {}
            watcher = asyncio.create_task(watch_baseline(scheduler, admin, task, received))
            worker, credential = await enroll(registry, admin, "bench-dashboard", [TEST])
            agent = ScriptedAgent(
                f"127.0.0.1:{stack.ports.scheduler}", worker, credential, [TEST], slots=1, behaviour=lambda a: None
            )
            started = time.perf_counter()
            await agent.start()
            await drive(agent, n, pace_ms / 1000)
            tasks = tpb_grpc.TaskServiceStub(scheduler)

            async def succeeded() -> bool:
                got = await tasks.GetTask(tpb.GetTaskRequest(name=task), metadata=admin, timeout=10)
                return bool(got.task.state == spb.TASK_STATE_SUCCEEDED)

            await eventually(succeeded, 60, "the task to succeed")
            await asyncio.sleep(0.5)  # the last renders
            elapsed = time.perf_counter() - started
            watcher.cancel()
            proc.stdin.write(b"done\n")
            await proc.stdin.drain()
            final = json.loads(await asyncio.wait_for(proc.stdout.readline(), 60))
            await proc.wait()
            if "error" in final:
                raise RuntimeError(f"the page failed: {final['error']}")

        changes = committed_changes(stack.database_url, task.split("/")[-1])
        dom, frame, coalesced, missing = match(changes, final["records"])
        baseline = [received[seq] - at for seq, _, _, at in changes if seq in received]
        browser = summary(dom)
        grpc_plain = summary(baseline)
        return {
            "benchmark": "dashboard_latency",
            "subtasks": n,
            "pace_ms": pace_ms,
            "changes_committed": len(changes),
            "browser_dom": browser,
            "browser_frame": summary(frame),
            "grpc_watch_baseline": grpc_plain,
            "ratio_p50": round(browser["p50_ms"] / grpc_plain["p50_ms"], 2) if grpc_plain["p50_ms"] else None,
            "ratio_p99": round(browser["p99_ms"] / grpc_plain["p99_ms"], 2) if grpc_plain["p99_ms"] else None,
            "coalesced": coalesced,
            "never_shown": missing,
            "target_p99_ms": 100,
            "meets_target": browser["p99_ms"] <= 100 and missing == 0,
            "page_errors": final.get("page_errors", []),
            "elapsed_s": round(elapsed, 1),
            "commit_time": "task_events.time (PostgreSQL now() of the committing transaction)",
        }
    finally:
        if agent is not None:
            await agent.stop()
        stack.stop()
        shutil.rmtree(data, ignore_errors=True)


def main() -> None:
    n = int(os.environ.get("BENCH_SUBTASKS", "80"))
    pace_ms = int(os.environ.get("BENCH_PACE_MS", "40"))
    if not Path(CHROMIUM).exists():
        raise SystemExit(f"{CHROMIUM} is missing: run `make chromium`")
    build()
    print(json.dumps(asyncio.run(run(n, pace_ms))))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
