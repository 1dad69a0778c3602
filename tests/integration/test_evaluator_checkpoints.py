"""Checkpoints the task's policy and people open: frequency milestones, by hand, time budgets, cancellation."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable

import grpc
import pytest
from google.protobuf import duration_pb2
from maw.agent.v1 import agent_service_pb2 as apb
from maw.common.v1 import machine_pb2, work_pb2
from maw.evaluator.v1 import checkpoint_service_pb2 as cpb
from maw.evaluator.v1 import checkpoint_service_pb2_grpc as cpb_grpc
from maw.evaluator.v1 import resources_pb2 as epb
from maw.scheduler.v1 import resources_pb2 as spb
from maw.scheduler.v1 import task_service_pb2 as tpb
from maw.scheduler.v1 import task_service_pb2_grpc as tpb_grpc

from deploy.local import Stack
from tests.integration.clients import Metadata, ScriptedAgent, bearer, enroll, eventually
from tests.integration.test_evaluator import GOOD, diff_result, reaches, subtasks, task_state, violations

CLAUDE = machine_pb2.TOOL_KIND_CLAUDE_CODE


async def start_agent(
    stack: Stack, channels: dict[str, grpc.aio.Channel], admin: Metadata, started: list[ScriptedAgent],
    label: str, behaviour: Callable[[apb.Assignment], apb.Result | None] = lambda a: diff_result(a, GOOD),
) -> ScriptedAgent:  # fmt: skip
    """An agent that only this test's tasks can reach (they require its label)."""
    labels = {"suite": label}
    worker, credential = await enroll(channels["registry"], admin, f"cp-{uuid.uuid4().hex[:8]}", [CLAUDE], labels)
    agent = ScriptedAgent(
        f"127.0.0.1:{stack.ports.scheduler}", worker, credential, [CLAUDE], behaviour=behaviour, labels=labels
    )
    await agent.start()
    started.append(agent)
    return agent


async def create(
    channels: dict[str, grpc.aio.Channel], admin: Metadata, label: str, steps: int = 1,
    policy: epb.Policy | None = None,
) -> str:  # fmt: skip
    """A chain of ``steps`` code-generation subtasks s0 → s1 → … for the agent with ``label``."""
    graph = tpb.SubtaskGraph(
        subtasks=[
            spb.SubtaskSpec(
                key=f"s{i}",
                display_name=f"Step {i}",
                type=work_pb2.SUBTASK_TYPE_CODE_GENERATION,
                preferred_tool=machine_pb2.ToolChoice(kind=CLAUDE),
                dependencies=[f"s{i - 1}"] if i else [],
            )
            for i in range(steps)
        ]
    )
    task = spb.Task(description="Add an adder", policy=policy, required_labels={"suite": label})
    created = await tpb_grpc.TaskServiceStub(channels["scheduler"]).CreateTask(
        tpb.CreateTaskRequest(task=task, graph=graph), metadata=admin, timeout=10
    )
    return created.task.name


async def checkpoints(channels: dict[str, grpc.aio.Channel], admin: Metadata, name: str) -> list[epb.Checkpoint]:
    reply = await cpb_grpc.CheckpointServiceStub(channels["evaluator"]).ListCheckpoints(
        cpb.ListCheckpointsRequest(filter=f'task = "{name}"'), metadata=admin, timeout=10
    )
    return list(reply.checkpoints)


async def open_one(channels: dict[str, grpc.aio.Channel], admin: Metadata, name: str) -> list[epb.Checkpoint]:
    return [c for c in await checkpoints(channels, admin, name) if c.state == epb.CHECKPOINT_STATE_OPEN]


async def waits(channels: dict[str, grpc.aio.Channel], admin: Metadata, name: str) -> bool:
    return await task_state(channels, admin, name) == spb.TASK_STATE_WAITING_CHECKPOINT


async def test_high_frequency_stops_after_every_subtask_and_approval_moves_on(
    stack: Stack, channels: dict[str, grpc.aio.Channel], admin: Metadata, agents: list[ScriptedAgent],
    operator_token: str,
) -> None:  # fmt: skip
    label = uuid.uuid4().hex[:8]
    agent = await start_agent(stack, channels, admin, agents, label)
    policy = epb.Policy(checkpoint_frequency=work_pb2.CHECKPOINT_FREQUENCY_HIGH)
    name = await create(channels, admin, label, steps=2, policy=policy)
    stub = cpb_grpc.CheckpointServiceStub(channels["evaluator"])

    await eventually(lambda: open_one(channels, admin, name), 30, "the first FREQUENCY checkpoint")
    (first,) = await open_one(channels, admin, name)
    assert first.trigger == epb.CHECKPOINT_TRIGGER_FREQUENCY and "50 %" in first.reason
    assert first.progress_percent == 50, "the milestone the held result reaches"
    assert first.subtasks == [f"{name}/subtasks/s0"]
    await eventually(lambda: waits(channels, admin, name), 10, "the task to wait")
    held = (await subtasks(channels, admin, name))["s0"]
    assert held.state == spb.SUBTASK_STATE_WAITING_CHECKPOINT
    assert held.checkpoint == first.name, "the Subtask shows the checkpoint it waits at"
    assert held.evaluation.startswith("evaluations/") and held.evaluation_score >= 7
    assert held.grade in (epb.GRADE_GOOD, epb.GRADE_EXCELLENT)
    await asyncio.sleep(1.0)
    assert [a.key for a in agent.assignments] == ["s0"], "nothing new is assigned while the task waits"

    await stub.DecideCheckpoint(
        cpb.DecideCheckpointRequest(name=first.name, decision=epb.CHECKPOINT_DECISION_APPROVE),
        metadata=bearer(operator_token), timeout=10,
    )  # fmt: skip

    async def second() -> list[epb.Checkpoint]:
        return [c for c in await open_one(channels, admin, name) if c.name != first.name]

    await eventually(second, 30, "the checkpoint after the second subtask")
    (last,) = await second()
    assert last.trigger == epb.CHECKPOINT_TRIGGER_FREQUENCY and "100 %" in last.reason
    assert last.progress_percent == 100
    assert [a.key for a in agent.assignments] == ["s0", "s1"]
    await stub.DecideCheckpoint(
        cpb.DecideCheckpointRequest(name=last.name, decision=epb.CHECKPOINT_DECISION_APPROVE),
        metadata=bearer(operator_token), timeout=10,
    )  # fmt: skip

    await reaches(channels, admin, name, spb.TASK_STATE_SUCCEEDED, 30, "the approved task to succeed")
    done = (await subtasks(channels, admin, name))["s0"]
    assert done.state == spb.SUBTASK_STATE_SUCCEEDED and done.checkpoint == ""


async def test_a_person_pauses_a_task_by_hand_and_approval_lets_it_run(
    stack: Stack, channels: dict[str, grpc.aio.Channel], admin: Metadata, agents: list[ScriptedAgent],
    operator_token: str, viewer_token: str,
) -> None:  # fmt: skip
    label = uuid.uuid4().hex[:8]
    name = await create(channels, admin, label)  # no agent carries the label yet: nothing runs
    stub = cpb_grpc.CheckpointServiceStub(channels["evaluator"])
    operator = bearer(operator_token)

    def manual(task: str = name, **fields: object) -> cpb.CreateCheckpointRequest:
        return cpb.CreateCheckpointRequest(checkpoint=epb.Checkpoint(task=task, **fields), request_id=request_id)  # type: ignore[arg-type]

    request_id = uuid.uuid4().hex
    with pytest.raises(grpc.aio.AioRpcError) as denied:
        await stub.CreateCheckpoint(manual(reason="look"), metadata=bearer(viewer_token), timeout=10)
    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.aio.AioRpcError) as bad:
        await stub.CreateCheckpoint(manual("task-without-prefix"), metadata=operator, timeout=10)
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT and violations(bad.value) == ["checkpoint.task"]
    with pytest.raises(grpc.aio.AioRpcError) as held:
        await stub.CreateCheckpoint(manual(subtasks=[f"{name}/subtasks/s0"]), metadata=operator, timeout=10)
    assert violations(held.value) == ["checkpoint.subtasks"]
    assert await checkpoints(channels, admin, name) == [], "refused requests opened nothing"

    async def opened() -> epb.Checkpoint | None:
        try:
            reply = await stub.CreateCheckpoint(manual(reason="check the plan first"), metadata=operator, timeout=10)
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.NOT_FOUND, "only an unknown task may be refused here"
            return None  # the scheduler has not registered the task with the evaluator yet
        return reply.checkpoint

    await eventually(opened, 15, "the manual checkpoint")
    cp = await opened()  # the same request id: the retry returns the checkpoint opened the first time
    assert cp is not None and cp.trigger == epb.CHECKPOINT_TRIGGER_MANUAL and cp.creator == "users/fixture-operator"
    assert [c.name for c in await checkpoints(channels, admin, name)] == [cp.name]
    await eventually(lambda: waits(channels, admin, name), 15, "the task to pause")

    request_id = uuid.uuid4().hex
    with pytest.raises(grpc.aio.AioRpcError) as twice:
        await stub.CreateCheckpoint(manual(), metadata=operator, timeout=10)
    assert twice.value.code() == grpc.StatusCode.FAILED_PRECONDITION, "one open checkpoint per task"
    with pytest.raises(grpc.aio.AioRpcError) as nothing:
        await stub.DecideCheckpoint(
            cpb.DecideCheckpointRequest(name=cp.name, decision=epb.CHECKPOINT_DECISION_CORRECT,
                                        feedback=[work_pb2.Feedback(text="redo")]),
            metadata=operator, timeout=10,
        )  # fmt: skip
    assert violations(nothing.value) == ["decision"], "a manual checkpoint holds no result to correct"

    agent = await start_agent(stack, channels, admin, agents, label)
    await asyncio.sleep(1.5)
    assert agent.assignments == [], "a paused task gets no assignment"
    await stub.DecideCheckpoint(
        cpb.DecideCheckpointRequest(name=cp.name, decision=epb.CHECKPOINT_DECISION_APPROVE), metadata=operator,
        timeout=10,
    )  # fmt: skip

    await reaches(channels, admin, name, spb.TASK_STATE_SUCCEEDED, 30, "the resumed task to succeed")
    assert [a.key for a in agent.assignments] == ["s0"]


async def test_a_task_past_its_time_budget_waits_and_cancelling_it_closes_the_checkpoint(
    stack: Stack, channels: dict[str, grpc.aio.Channel], admin: Metadata
) -> None:
    budget = duration_pb2.Duration(seconds=1)
    name = await create(channels, admin, uuid.uuid4().hex[:8], policy=epb.Policy(time_budget=budget))

    await eventually(lambda: open_one(channels, admin, name), 20, "the TIME_BUDGET checkpoint")
    (cp,) = await open_one(channels, admin, name)
    assert cp.trigger == epb.CHECKPOINT_TRIGGER_TIME_BUDGET and "time budget" in cp.reason
    await eventually(lambda: waits(channels, admin, name), 15, "the task to pause")
    await asyncio.sleep(1.5)
    assert len(await checkpoints(channels, admin, name)) == 1, "the budget fires once"

    await tpb_grpc.TaskServiceStub(channels["scheduler"]).CancelTask(
        tpb.CancelTaskRequest(name=name, reason="too slow"), metadata=admin, timeout=10
    )

    async def closed() -> bool:
        (after,) = await checkpoints(channels, admin, name)
        return after.state == epb.CHECKPOINT_STATE_CANCELLED

    await eventually(closed, 15, "the open checkpoint of the cancelled task to close")
