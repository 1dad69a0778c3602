"""The dashboard in headless Chromium, through Envoy, against the real mesh with a real maw-agent.

The browser side is dashboard/e2e/flow.mjs (playwright-core driving Debian's Chromium); this test starts
the mesh, builds and serves the dashboard, starts the agent when the page is watching, and asserts on what
the page reported. Screenshots land in test-artifacts/dashboard/.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from deploy.local.dashboard import DASHBOARD, build
from tests.e2e.conftest import Mesh
from tests.integration.clients import Metadata, eventually

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts" / "dashboard"
CHROMIUM = os.environ.get("MAW_CHROMIUM", "/usr/bin/chromium")


@pytest.fixture(scope="module")
def gateway(mesh: Mesh) -> Iterator[str]:
    """The mesh completed with the evaluator, the dashboard's file server and Envoy; yields the page URL."""
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: run `make chromium` (apt-get install chromium)")
    build()
    stack = mesh.stack
    stack.start_service("evaluator")
    stack.start_dashboard()
    stack.start_envoy()
    yield f"http://localhost:{stack.ports.gateway}/"


async def _run_flow(
    gateway: str, mesh: Mesh, registry: grpc.aio.Channel, admin: Metadata, worker: str
) -> tuple[dict[str, Any], list[str]]:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    env = os.environ | {
        "MAW_URL": gateway,
        "MAW_USER": "admin",
        "MAW_PASSWORD": mesh.stack.admin_password,
        "MAW_WORKER": f"workers/{worker}",
        "MAW_ARTIFACTS": str(ARTIFACTS),
        "MAW_CHROMIUM": CHROMIUM,
    }
    node = shutil.which("node") or "node"
    proc = await asyncio.create_subprocess_exec(
        node, str(DASHBOARD / "e2e" / "flow.mjs"), cwd=DASHBOARD, env=env,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    steps: list[str] = []
    final: dict[str, Any] = {}
    try:
        await asyncio.wait_for(_follow(proc, mesh, registry, admin, worker, steps, final), 120)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        pytest.fail(f"the browser flow hung after steps {steps}:\n{(await proc.stderr.read()).decode()}")
    stderr = (await proc.stderr.read()).decode()
    await proc.wait()
    assert "error" not in final, f"{final.get('error')}\n{json.dumps(final.get('result'), indent=1)}\n{stderr}"
    assert proc.returncode == 0, stderr
    result: dict[str, Any] = final["result"]
    return result, steps


async def _follow(
    proc: asyncio.subprocess.Process,
    mesh: Mesh,
    registry: grpc.aio.Channel,
    admin: Metadata,
    worker: str,
    steps: list[str],
    final: dict[str, Any],
) -> None:
    """React to the flow's steps until it prints its result."""
    assert proc.stdin is not None and proc.stdout is not None
    async for raw in proc.stdout:
        line = json.loads(raw)
        if line.get("step") == "waiting-for-worker":
            # The workers page is open and live: now the machine comes online.
            await mesh.agent(registry, admin, worker, mesh.stack.ports.scheduler, ["test"], slots=4)
        if line.get("step") == "stop-gateway":
            # Envoy dies; while it is down a task is created (straight to the scheduler), then it
            # comes back on the same port.
            mesh.stack.children["envoy"].stop()
            created = await _create_task(mesh, admin)
            await _until_logged(registry, admin, created)
            await asyncio.to_thread(mesh.stack.start_envoy)
            proc.stdin.write(f"{created}\n".encode())
            await proc.stdin.drain()
        steps.append(line.get("step", ""))
        final.clear()
        final.update(line)


async def _create_task(mesh: Mesh, admin: Metadata) -> str:
    from maw.scheduler.v1 import resources_pb2, task_service_pb2, task_service_pb2_grpc

    async with grpc.aio.insecure_channel(f"127.0.0.1:{mesh.stack.ports.scheduler}") as channel:
        reply = await task_service_pb2_grpc.TaskServiceStub(channel).CreateTask(
            task_service_pb2.CreateTaskRequest(
                task=resources_pb2.Task(description="created while the gateway was down"),
                graph=task_service_pb2.SubtaskGraph(subtasks=[resources_pb2.SubtaskSpec(key="only")]),
            ),
            metadata=admin,
            timeout=30,
        )
    name: str = reply.task.name
    return name


async def _until_logged(registry: grpc.aio.Channel, admin: Metadata, task: str) -> None:
    from maw.registry.v1 import activity_service_pb2, activity_service_pb2_grpc

    stub = activity_service_pb2_grpc.ActivityServiceStub(registry)

    async def logged() -> bool:
        reply = await stub.ListActivity(
            activity_service_pb2.ListActivityRequest(filter=f'task = "{task}"'), metadata=admin, timeout=5
        )
        return len(reply.activity_entries) > 0

    await eventually(logged, 20, "the task to reach the activity log")


async def test_a_person_signs_in_sees_a_worker_come_online_and_watches_a_dag_finish(
    gateway: str, mesh: Mesh, registry: grpc.aio.Channel, admin: Metadata
) -> None:
    worker = f"browser-{uuid.uuid4().hex[:6]}"
    result, steps = await _run_flow(gateway, mesh, registry, admin, worker)

    assert "waiting-for-worker" in steps
    assert result["bad_login_error"], "a wrong password must say so"
    assert result["signed_in_as"]
    assert result["worker_online"] and "test" in result["worker_row"]
    # Bad input: the server's field violations, shown next to the fields they name.
    assert "must not be empty" in result["description_error"]
    assert "nowhere" in result["dependency_error"]
    # The DAG advanced live to done: every node ended SUCCEEDED, having been seen before that.
    assert result["task_state"] == "succeeded"
    assert set(result["seen_states"]) == {"design", "build", "test", "ship"}
    for key, states in result["seen_states"].items():
        assert states[-1] == "succeeded", (key, states)
        assert len(states) >= 2, f"{key} was never seen before it finished: {states}"
    assert "hello from step 4" in result["ship_log"]
    assert result["checkpoints"] in {"available", "unavailable"}
    assert "subtask.succeeded" in result["activity_verbs"]
    # The gateway restarted: the feed showed it, then resumed with what happened meanwhile, once.
    assert result["saw_reconnecting"]
    assert result["resumed_with"], "entries logged while the gateway was down must appear after the reconnect"
    assert result["duplicate_entries"] == 0
    assert result["page_errors"] == []
    assert result["errors_during_outage"] == []
    for name in ("workers", "create-task-errors", "task-done", "checkpoints", "activity", "activity-reconnecting"):
        assert (ARTIFACTS / f"{name}.png").stat().st_size > 0


async def _node(script: str, env: dict[str, str], timeout: float) -> dict[str, Any]:
    """Run a dashboard/e2e script to its end; its last stdout line as JSON."""
    node = shutil.which("node") or "node"
    proc = await asyncio.create_subprocess_exec(
        node, str(DASHBOARD / "e2e" / script), cwd=DASHBOARD, env=os.environ | env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        pytest.fail(f"{script} hung")
    lines = out.decode().strip().splitlines()
    assert lines, f"{script} printed nothing:\n{err.decode()}"
    final: dict[str, Any] = json.loads(lines[-1])
    assert "error" not in final, f"{final.get('error')}\n{json.dumps(final.get('result'), indent=1)}\n{err.decode()}"
    assert proc.returncode == 0, err.decode()
    return final


async def test_a_person_decides_a_checkpoint_in_the_inbox_and_the_task_moves_on(
    gateway: str, mesh: Mesh, registry: grpc.aio.Channel, admin: Metadata
) -> None:
    from maw.agent.v1 import agent_service_pb2 as apb
    from maw.common.v1 import machine_pb2, work_pb2
    from maw.evaluator.v1 import checkpoint_service_pb2 as cpb
    from maw.evaluator.v1 import checkpoint_service_pb2_grpc as cpb_grpc
    from maw.evaluator.v1 import resources_pb2 as epb
    from maw.scheduler.v1 import resources_pb2 as spb
    from maw.scheduler.v1 import task_service_pb2 as tpb
    from maw.scheduler.v1 import task_service_pb2_grpc as tpb_grpc

    from tests.integration.clients import ScriptedAgent, enroll
    from tests.integration.test_evaluator import GOOD, WEAK, diff_result

    claude = machine_pb2.TOOL_KIND_CLAUDE_CODE
    words = "Use a dict of handlers instead of eval, and read the key from the environment"
    async with (
        grpc.aio.insecure_channel(f"127.0.0.1:{mesh.stack.ports.scheduler}") as scheduler,
        grpc.aio.insecure_channel(f"127.0.0.1:{mesh.stack.ports.evaluator}") as evaluator,
    ):
        graph = tpb.SubtaskGraph(
            subtasks=[
                spb.SubtaskSpec(
                    key="implement", type=work_pb2.SUBTASK_TYPE_CODE_GENERATION,
                    preferred_tool=machine_pb2.ToolChoice(kind=claude),
                )
            ]
        )  # fmt: skip
        created = await tpb_grpc.TaskServiceStub(scheduler).CreateTask(
            tpb.CreateTaskRequest(task=spb.Task(description="Add an adder (browser checkpoint)"), graph=graph),
            metadata=admin,
            timeout=10,
        )
        task = created.task.name

        def stand_in(assignment: apb.Assignment) -> apb.Result | None:
            """A stand-in AI tool: weak diffs (so three corrections fail and the evaluator escalates to a
            person) until an assignment carries the person's words. Work of other tasks is held, untouched."""
            if not assignment.lease.subtask.startswith(f"{task}/"):
                return None
            return diff_result(assignment, GOOD if words in assignment.prompt else WEAK)

        worker, credential = await enroll(registry, admin, f"claude-{uuid.uuid4().hex[:6]}", [claude])
        agent = ScriptedAgent(
            f"127.0.0.1:{mesh.stack.ports.scheduler}", worker, credential, [claude], behaviour=stand_in
        )
        await agent.start()
        try:
            checkpoints = cpb_grpc.CheckpointServiceStub(evaluator)

            async def open_checkpoints() -> list[epb.Checkpoint]:
                reply = await checkpoints.ListCheckpoints(
                    cpb.ListCheckpointsRequest(filter=f'state = OPEN AND task = "{task}"'), metadata=admin, timeout=10
                )
                return list(reply.checkpoints)

            async def waiting() -> bool:
                got = await tpb_grpc.TaskServiceStub(scheduler).GetTask(
                    tpb.GetTaskRequest(name=task), metadata=admin, timeout=10
                )
                return bool(got.task.state == spb.TASK_STATE_WAITING_CHECKPOINT) and bool(await open_checkpoints())

            await eventually(waiting, 60, "the task to wait at a checkpoint")
            (checkpoint,) = await open_checkpoints()
            final = await _node(
                "checkpoint.mjs",
                {
                    "MAW_URL": gateway, "MAW_USER": "admin", "MAW_PASSWORD": mesh.stack.admin_password,
                    "MAW_TASK": task, "MAW_CHECKPOINT": checkpoint.name, "MAW_FEEDBACK": words,
                    "MAW_ARTIFACTS": str(ARTIFACTS), "MAW_CHROMIUM": CHROMIUM,
                },
                120,
            )  # fmt: skip
            result: dict[str, Any] = final["result"]

            # Before: the task's page says it waits, the inbox shows the weak diff it is about.
            assert result["task_state_before"] == "waiting_checkpoint"
            assert "checkpoint" in result["notice"].lower()
            assert "def handler(x)" in result["subject"]
            # Every dimension with its score or "not measured", the evidence behind a weak one, and the verdict.
            assert "security" in result["dimensions"] and "not measured" in result["dimensions"]
            assert "(bandit)" in result["dimensions"] or "(secrets)" in result["dimensions"], result["dimensions"]
            assert "escalate" in result["verdict"] and "earlier evaluation(s)" in result["subject"]
            # A revision without words: the server's field message next to the feedback, nothing decided.
            assert "feedback" in result["feedback_error"].lower(), "the server's message for `feedback` must show"
            assert result["still_listed"]
            # With words: decided by this person, the words reach the agent in the next correction, and the
            # task's page shows it finish.
            assert result["decided"]
            got = await checkpoints.GetCheckpoint(
                cpb.GetCheckpointRequest(name=checkpoint.name), metadata=admin, timeout=10
            )
            assert got.checkpoint.state == epb.CHECKPOINT_STATE_CORRECTED
            assert got.checkpoint.decision.decided_by == "users/admin"
            ours = [a for a in agent.assignments if a.lease.subtask.startswith(f"{task}/")]
            assert [a.key for a in ours] == ["implement"] + [f"implement-fix-{i}" for i in (1, 2, 3, 4)]
            assert words in ours[4].prompt and not any(words in a.prompt for a in ours[:4])
            assert result["task_state_after"] == "succeeded"
            assert result["nodes"]["implement-fix-4"] == "succeeded"
            assert set(result["nodes"].values()) == {"succeeded"}
            assert result["page_errors"] == []
        finally:
            await agent.stop()
    for name in ("checkpoint-task-waiting", "checkpoint-feedback-error", "checkpoint-decided", "checkpoint-task-done"):
        assert (ARTIFACTS / f"{name}.png").stat().st_size > 0


async def test_a_person_previews_and_rolls_back_to_an_earlier_checkpoint_in_the_browser(
    gateway: str, mesh: Mesh, registry: grpc.aio.Channel, admin: Metadata
) -> None:
    from maw.common.v1 import machine_pb2, work_pb2
    from maw.evaluator.v1 import checkpoint_service_pb2 as cpb
    from maw.evaluator.v1 import checkpoint_service_pb2_grpc as cpb_grpc
    from maw.evaluator.v1 import resources_pb2 as epb
    from maw.scheduler.v1 import resources_pb2 as spb
    from maw.scheduler.v1 import task_service_pb2 as tpb
    from maw.scheduler.v1 import task_service_pb2_grpc as tpb_grpc

    from tests.integration.clients import ScriptedAgent, enroll
    from tests.integration.test_evaluator import GOOD, diff_result

    claude = machine_pb2.TOOL_KIND_CLAUDE_CODE
    label = {"suite": f"rollback-{uuid.uuid4().hex[:6]}"}
    async with (
        grpc.aio.insecure_channel(f"127.0.0.1:{mesh.stack.ports.scheduler}") as scheduler,
        grpc.aio.insecure_channel(f"127.0.0.1:{mesh.stack.ports.evaluator}") as evaluator,
    ):
        steps = [
            spb.SubtaskSpec(key=f"s{i}", type=work_pb2.SUBTASK_TYPE_CODE_GENERATION,
                            preferred_tool=machine_pb2.ToolChoice(kind=claude), dependencies=[f"s{i - 1}"] if i else [])
            for i in range(2)
        ]  # fmt: skip
        policy = epb.Policy(
            triggers=[epb.CHECKPOINT_TRIGGER_FREQUENCY], checkpoint_frequency=work_pb2.CHECKPOINT_FREQUENCY_HIGH
        )
        task = spb.Task(description="Add an adder (browser rollback)", policy=policy, required_labels=label)
        created = await tpb_grpc.TaskServiceStub(scheduler).CreateTask(
            tpb.CreateTaskRequest(task=task, graph=tpb.SubtaskGraph(subtasks=steps)), metadata=admin, timeout=10
        )
        name = created.task.name
        worker, credential = await enroll(registry, admin, f"claude-{uuid.uuid4().hex[:6]}", [claude], label)
        agent = ScriptedAgent(
            f"127.0.0.1:{mesh.stack.ports.scheduler}", worker, credential, [claude],
            behaviour=lambda a: diff_result(a, GOOD), labels=label,
        )  # fmt: skip
        await agent.start()
        try:
            checkpoints = cpb_grpc.CheckpointServiceStub(evaluator)

            async def open_ones() -> list[epb.Checkpoint]:
                reply = await checkpoints.ListCheckpoints(
                    cpb.ListCheckpointsRequest(filter=f'state = OPEN AND task = "{name}"'), metadata=admin, timeout=10
                )
                return list(reply.checkpoints)

            await eventually(open_ones, 60, "the checkpoint after s0")
            (first,) = await open_ones()
            await checkpoints.DecideCheckpoint(
                cpb.DecideCheckpointRequest(name=first.name, decision=epb.CHECKPOINT_DECISION_APPROVE),
                metadata=admin, timeout=10,
            )  # fmt: skip

            async def second() -> list[epb.Checkpoint]:
                return [c for c in await open_ones() if c.name != first.name]

            await eventually(second, 60, "the checkpoint after s1")
            (last,) = await second()
            final = await _node(
                "rollback.mjs",
                {
                    "MAW_URL": gateway, "MAW_USER": "admin", "MAW_PASSWORD": mesh.stack.admin_password,
                    "MAW_CHECKPOINT": last.name, "MAW_EARLIER": first.name,
                    "MAW_ARTIFACTS": str(ARTIFACTS), "MAW_CHROMIUM": CHROMIUM,
                },
                120,
            )  # fmt: skip
            result: dict[str, Any] = final["result"]
            history = result["history"]
            assert "frequency: " in history and "50 % progress" in history and "approved" in history
            assert "Resets s1" in result["preview"] and "closes 1 checkpoint(s)" in result["preview"], result
            assert "Rolled back" in result["rolled_back"]
            assert result["page_errors"] == []

            async def get(checkpoint: epb.Checkpoint) -> epb.Checkpoint:
                request = cpb.GetCheckpointRequest(name=checkpoint.name)
                return (await checkpoints.GetCheckpoint(request, metadata=admin, timeout=10)).checkpoint

            assert (await get(first)).HasField("rollback_time")
            assert (await get(last)).state == epb.CHECKPOINT_STATE_CANCELLED, "the later checkpoint closed"
            await eventually(lambda: [a.key for a in agent.assignments].count("s1") == 2, 60, "s1 to run again")
        finally:
            await agent.stop()
    for shot in ("rollback-preview", "rollback-done"):
        assert (ARTIFACTS / f"{shot}.png").stat().st_size > 0
