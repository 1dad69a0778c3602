"""The core loop with real processes: real agents, kill -9 of agents and scheduler replicas, cancel."""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid
from typing import Any

import grpc
import psutil
import psycopg
import pytest
from google.protobuf import struct_pb2
from maw.common.v1 import machine_pb2
from maw.scheduler.v1 import resources_pb2 as spb
from maw.scheduler.v1 import task_service_pb2 as tpb
from maw.scheduler.v1 import task_service_pb2_grpc as tpb_grpc

from tests.e2e.conftest import Mesh
from tests.e2e.lb import TcpBalancer
from tests.integration.clients import Metadata, eventually

pytestmark = pytest.mark.slow


def _spec(key: str, tool: int, deps: list[str] | None = None, **options: Any) -> spb.SubtaskSpec:
    opts = struct_pb2.Struct()
    opts.update(options)
    return spb.SubtaskSpec(
        key=key,
        dependencies=deps or [],
        preferred_tool=machine_pb2.ToolChoice(kind=tool),  # type: ignore[arg-type]
        tool_options=opts,
    )


async def _create(
    tasks: tpb_grpc.TaskServiceAsyncStub, admin: Metadata, *specs: spb.SubtaskSpec, task: spb.Task | None = None
) -> tpb.CreateTaskResponse:
    request = tpb.CreateTaskRequest(
        task=task or spb.Task(description="e2e"), graph=tpb.SubtaskGraph(subtasks=list(specs))
    )
    reply: tpb.CreateTaskResponse = await tasks.CreateTask(request, metadata=admin, timeout=60)
    return reply


async def _state(tasks: tpb_grpc.TaskServiceAsyncStub, admin: Metadata, name: str) -> int:
    state: int = (await tasks.GetTask(tpb.GetTaskRequest(name=name), metadata=admin, timeout=5)).task.state
    return state


def _results(mesh: Mesh, task: str) -> list[tuple[str, int, int]]:
    with psycopg.connect(mesh.stack.database_url) as conn:
        rows = conn.execute(
            "SELECT key, attempt, outcome FROM scheduler.results WHERE task_id = %s ORDER BY key, attempt",
            (task.split("/")[1],),
        ).fetchall()
    return [(r[0], r[1], r[2]) for r in rows]


async def test_a_dag_runs_in_order_on_two_real_agents(mesh: Mesh, registry: grpc.aio.Channel, admin: Metadata) -> None:
    port = mesh.stack.ports.scheduler
    await mesh.agent(registry, admin, f"dag-a-{uuid.uuid4().hex[:6]}", port, ["test"], slots=1)
    await mesh.agent(registry, admin, f"dag-b-{uuid.uuid4().hex[:6]}", port, ["test"], slots=1)
    await mesh.wait_slots(admin, port, 2)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        tasks = tpb_grpc.TaskServiceStub(channel)
        created = await _create(
            tasks, admin,
            _spec("design", 6, sleep_s=0.2), _spec("build", 6, ["design"], sleep_s=0.2),
            _spec("test", 6, ["design"], sleep_s=0.2), _spec("ship", 6, ["build", "test"]),
        )  # fmt: skip

        async def done() -> bool:
            return await _state(tasks, admin, created.task.name) == spb.TASK_STATE_SUCCEEDED

        await eventually(done, 30, "the DAG to finish")
        subs = (await tasks.ListSubtasks(tpb.ListSubtasksRequest(parent=created.task.name), metadata=admin)).subtasks
    ends = {s.key: s.end_time.ToDatetime() for s in subs}
    starts = {s.key: s.start_time.ToDatetime() for s in subs}
    assert starts["build"] >= ends["design"] and starts["test"] >= ends["design"]
    assert starts["ship"] >= max(ends["build"], ends["test"])
    assert len({s.worker for s in subs}) == 2, "both agents ran part of it"


async def test_kill_9_of_an_agent_mid_subtask_reassigns_it_once(
    mesh: Mesh, registry: grpc.aio.Channel, admin: Metadata
) -> None:
    port = mesh.stack.ports.scheduler
    victim = await mesh.agent(registry, admin, f"victim-{uuid.uuid4().hex[:6]}", port, ["test"], slots=1)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        tasks = tpb_grpc.TaskServiceStub(channel)
        created = await _create(tasks, admin, _spec("slow", 6, sleep_s=3))
        sub = created.subtasks[0].name

        async def running_on_victim() -> bool:
            s = (await tasks.GetSubtask(tpb.GetSubtaskRequest(name=sub), metadata=admin)).subtask
            return s.state == spb.SUBTASK_STATE_RUNNING

        await eventually(running_on_victim, 20, "the victim to run the subtask")
        victim.kill()  # kill -9 of the agent's whole process group
        await mesh.agent(registry, admin, f"rescuer-{uuid.uuid4().hex[:6]}", port, ["test"], slots=1)

        async def done() -> bool:
            return await _state(tasks, admin, created.task.name) == spb.TASK_STATE_SUCCEEDED

        await eventually(done, 30, "the rescuer to finish it")
    assert _results(mesh, created.task.name) == [("slow", 2, 1)], "one committed result, for attempt 2"


async def test_cancel_kills_the_tools_process_group_within_a_second(
    mesh: Mesh, registry: grpc.aio.Channel, admin: Metadata, tmp_path: object
) -> None:
    port = mesh.stack.ports.scheduler
    await mesh.agent(registry, admin, f"shell-{uuid.uuid4().hex[:6]}", port, ["shell"], slots=1)
    marker = f"maw-e2e-{uuid.uuid4().hex[:8]}"
    command = f"sleep 600 & sleep 601 # {marker}\nwait"
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        tasks = tpb_grpc.TaskServiceStub(channel)
        created = await _create(tasks, admin, _spec("forever", 5, command=command))

        def tool_pids() -> list[int]:
            return [p.pid for p in psutil.process_iter(["cmdline"]) if marker in " ".join(p.info["cmdline"] or [])]

        await eventually(tool_pids, 20, "the tool to start")
        group = os.getpgid(tool_pids()[0])
        asked = time.monotonic()
        reply = await tasks.CancelTask(tpb.CancelTaskRequest(name=created.task.name), metadata=admin, timeout=5)
        assert reply.task.state == spb.TASK_STATE_CANCELLED

        def zombie(pid: int) -> bool:
            try:
                return bool(psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)
            except psutil.NoSuchProcess:
                return True  # gone between listing and looking

        def group_gone() -> bool:
            try:
                os.killpg(group, 0)
            except ProcessLookupError:
                return True
            return all(zombie(p) for p in tool_pids())

        await eventually(group_gone, 10, "the tool's process group to die")
        # SIGTERM reaches `sleep` at once; the grace period only matters for tools that ignore it.
        assert time.monotonic() - asked < 1.5


async def test_kill_9_of_a_scheduler_replica_loses_and_repeats_nothing(
    mesh: Mesh, registry: grpc.aio.Channel, admin: Metadata
) -> None:
    first, first_port = mesh.add_scheduler("replica-1")
    _, second_port = mesh.add_scheduler("replica-2")
    balancer = TcpBalancer([first_port, second_port])
    await balancer.start()
    try:
        for i in range(2):
            await mesh.agent(registry, admin, f"lb-{i}-{uuid.uuid4().hex[:6]}", balancer.port, ["test"], slots=16)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{second_port}") as channel:
            tasks = tpb_grpc.TaskServiceStub(channel)
            created = await _create(tasks, admin, *(_spec(f"s{i}", 6, sleep_s=0.01) for i in range(1000)))
            name = created.task.name

            def committed() -> int:
                return len(_results(mesh, name))

            await eventually(lambda: committed() >= 200, 60, "a fifth of the run")
            first.signal(signal.SIGKILL)  # kill -9 of a replica in the middle of the run

            async def done() -> bool:
                return await _state(tasks, admin, name) == spb.TASK_STATE_SUCCEEDED

            await eventually(done, 120, "every subtask to finish on the surviving replica")
        rows = _results(mesh, name)
        succeeded = [(k, a) for k, a, o in rows if o == 1]
        assert len(succeeded) == 1000
        assert len({k for k, _ in succeeded}) == 1000, "every subtask succeeded exactly once"
    finally:
        await balancer.stop()
        await asyncio.sleep(0)


async def test_sigterm_on_a_replica_drains_its_agents_to_another_without_rerunning_work(
    mesh: Mesh, registry: grpc.aio.Channel, admin: Metadata
) -> None:
    leaving, leaving_port = mesh.add_scheduler(f"draining-{uuid.uuid4().hex[:4]}")
    _, staying_port = mesh.add_scheduler(f"staying-{uuid.uuid4().hex[:4]}")
    balancer = TcpBalancer([leaving_port, staying_port])
    await balancer.start()
    try:
        for i in range(2):
            await mesh.agent(registry, admin, f"drain-{i}-{uuid.uuid4().hex[:6]}", balancer.port, ["test"], slots=4)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{staying_port}") as channel:
            tasks = tpb_grpc.TaskServiceStub(channel)
            created = await _create(tasks, admin, *(_spec(f"s{i}", 6, sleep_s=4) for i in range(8)))

            async def all_running() -> bool:
                subs = (
                    await tasks.ListSubtasks(tpb.ListSubtasksRequest(parent=created.task.name), metadata=admin)
                ).subtasks
                return all(s.state == spb.SUBTASK_STATE_RUNNING for s in subs)

            await eventually(all_running, 30, "all eight to run")
            leaving.signal(signal.SIGTERM)
            assert await asyncio.to_thread(leaving.proc.wait, 20) == 0

            async def done() -> bool:
                return await _state(tasks, admin, created.task.name) == spb.TASK_STATE_SUCCEEDED

            await eventually(done, 60, "the work to finish after the drain")
        assert [a for _, a, _ in _results(mesh, created.task.name)] == [1] * 8, "resumed, never rerun"
    finally:
        await balancer.stop()
