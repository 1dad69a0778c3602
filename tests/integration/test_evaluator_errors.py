"""The ERROR trigger: a judged subtask failing for good waits at a checkpoint when the task's policy asks."""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta

import grpc
from maw.agent.v1 import agent_service_pb2 as apb
from maw.common.v1 import machine_pb2, work_pb2
from maw.evaluator.v1 import checkpoint_service_pb2 as cpb
from maw.evaluator.v1 import checkpoint_service_pb2_grpc as cpb_grpc
from maw.evaluator.v1 import resources_pb2 as epb
from maw.scheduler.v1 import resources_pb2 as spb
from maw.scheduler.v1 import task_service_pb2 as tpb
from maw.scheduler.v1 import task_service_pb2_grpc as tpb_grpc

from deploy.local import Stack
from tests.integration.clients import Metadata, ScriptedAgent, bearer, eventually
from tests.integration.test_evaluator import GOOD, diff_result, reaches, subtasks
from tests.integration.test_evaluator_checkpoints import open_one, start_agent

CLAUDE = machine_pb2.TOOL_KIND_CLAUDE_CODE
ERROR_POLICY = epb.Policy(triggers=[epb.CHECKPOINT_TRIGGER_ERROR, epb.CHECKPOINT_TRIGGER_ESCALATION])


def fails_first(assignment: apb.Assignment) -> apb.Result:
    """The stand-in tool fails the original subtask and writes good code for its correction."""
    if assignment.key == "s0":
        return apb.Result(
            lease=assignment.lease, outcome=work_pb2.OUTCOME_FAILED, exit_code=2, error_message="tool crashed: boom"
        )
    return diff_result(assignment, GOOD)


async def create(
    channels: dict[str, grpc.aio.Channel], admin: Metadata, label: str, policy: epb.Policy | None,
    limits: work_pb2.TimeLimits | None = None,
) -> str:  # fmt: skip
    """One code-generation subtask s0 (one attempt) for the agent with ``label``."""
    graph = tpb.SubtaskGraph(
        subtasks=[
            spb.SubtaskSpec(
                key="s0",
                display_name="Step 0",
                type=work_pb2.SUBTASK_TYPE_CODE_GENERATION,
                preferred_tool=machine_pb2.ToolChoice(kind=CLAUDE),
                time_limits=limits,
            )
        ]
    )
    task = spb.Task(description="Add an adder", policy=policy, required_labels={"suite": label}, max_attempts=1)
    created = await tpb_grpc.TaskServiceStub(channels["scheduler"]).CreateTask(
        tpb.CreateTaskRequest(task=task, graph=graph), metadata=admin, timeout=10
    )
    return created.task.name


async def held_at_error(
    stack: Stack, channels: dict[str, grpc.aio.Channel], admin: Metadata, agents: list[ScriptedAgent]
) -> tuple[str, epb.Checkpoint, ScriptedAgent]:
    """A task whose only subtask failed for good and now waits at its ERROR checkpoint."""
    label = uuid.uuid4().hex[:8]
    agent = await start_agent(stack, channels, admin, agents, label, fails_first)
    name = await create(channels, admin, label, ERROR_POLICY)
    await eventually(lambda: open_one(channels, admin, name), 30, "the ERROR checkpoint")
    (cp,) = await open_one(channels, admin, name)

    await reaches(channels, admin, name, spb.TASK_STATE_WAITING_CHECKPOINT, 10, "the task to wait at the checkpoint")
    return name, cp, agent


async def test_a_failure_waits_at_an_error_checkpoint_and_a_persons_correction_completes_the_task(
    stack: Stack, channels: dict[str, grpc.aio.Channel], admin: Metadata, agents: list[ScriptedAgent],
    operator_token: str,
) -> None:  # fmt: skip
    name, cp, agent = await held_at_error(stack, channels, admin, agents)
    assert cp.trigger == epb.CHECKPOINT_TRIGGER_ERROR
    assert cp.subtasks == [f"{name}/subtasks/s0"]
    assert "FAILED" in cp.reason and "tool crashed: boom" in cp.reason, cp.reason
    held = (await subtasks(channels, admin, name))["s0"]
    assert held.state == spb.SUBTASK_STATE_WAITING_CHECKPOINT and held.checkpoint == cp.name
    await asyncio.sleep(0.5)
    assert [a.key for a in agent.assignments] == ["s0"], "nothing runs while the task waits"

    words = "The tool crashed on the missing fixture; create tests/conftest.py first."
    await cpb_grpc.CheckpointServiceStub(channels["evaluator"]).DecideCheckpoint(
        cpb.DecideCheckpointRequest(
            name=cp.name, decision=epb.CHECKPOINT_DECISION_CORRECT,
            feedback=[work_pb2.Feedback(type=work_pb2.FEEDBACK_TYPE_BUG, text=words)],
        ),
        metadata=bearer(operator_token), timeout=10,
    )  # fmt: skip

    await reaches(channels, admin, name, spb.TASK_STATE_SUCCEEDED, 30, "the corrected task to succeed")
    fix = next(a for a in agent.assignments if a.key == "s0-fix-1")
    assert words in fix.prompt, "the correction carries the person's words"
    done = await subtasks(channels, admin, name)
    assert done["s0"].state == spb.SUBTASK_STATE_SUCCEEDED and done["s0-fix-1"].state == spb.SUBTASK_STATE_SUCCEEDED


async def test_approving_an_error_checkpoint_accepts_the_failure_and_fails_the_task(
    stack: Stack, channels: dict[str, grpc.aio.Channel], admin: Metadata, agents: list[ScriptedAgent],
    operator_token: str,
) -> None:  # fmt: skip
    name, cp, _ = await held_at_error(stack, channels, admin, agents)
    await cpb_grpc.CheckpointServiceStub(channels["evaluator"]).DecideCheckpoint(
        cpb.DecideCheckpointRequest(name=cp.name, decision=epb.CHECKPOINT_DECISION_APPROVE),
        metadata=bearer(operator_token), timeout=10,
    )  # fmt: skip

    await reaches(channels, admin, name, spb.TASK_STATE_FAILED, 30, "the task to fail")
    assert (await subtasks(channels, admin, name))["s0"].state == spb.SUBTASK_STATE_FAILED


async def test_rejecting_an_error_checkpoint_cancels_the_task(
    stack: Stack, channels: dict[str, grpc.aio.Channel], admin: Metadata, agents: list[ScriptedAgent],
    operator_token: str,
) -> None:  # fmt: skip
    name, cp, _ = await held_at_error(stack, channels, admin, agents)
    await cpb_grpc.CheckpointServiceStub(channels["evaluator"]).DecideCheckpoint(
        cpb.DecideCheckpointRequest(name=cp.name, decision=epb.CHECKPOINT_DECISION_REJECT),
        metadata=bearer(operator_token), timeout=10,
    )  # fmt: skip

    await reaches(channels, admin, name, spb.TASK_STATE_CANCELLED, 30, "the task to be cancelled")


async def test_without_the_error_trigger_a_failure_fails_the_task_at_once(
    stack: Stack, channels: dict[str, grpc.aio.Channel], admin: Metadata, agents: list[ScriptedAgent]
) -> None:
    label = uuid.uuid4().hex[:8]
    await start_agent(stack, channels, admin, agents, label, fails_first)
    name = await create(channels, admin, label, None)

    await reaches(channels, admin, name, spb.TASK_STATE_FAILED, 30, "the task to fail")
    await asyncio.sleep(1.0)
    assert await open_one(channels, admin, name) == [], "the default policy opens no ERROR checkpoint"


async def test_a_subtask_past_its_total_time_limit_waits_at_an_error_checkpoint(
    stack: Stack, channels: dict[str, grpc.aio.Channel], admin: Metadata, agents: list[ScriptedAgent]
) -> None:
    label = uuid.uuid4().hex[:8]
    await start_agent(stack, channels, admin, agents, label, lambda a: None)  # the tool never finishes
    limits = work_pb2.TimeLimits()
    limits.total.FromTimedelta(timedelta(seconds=1.5))
    name = await create(channels, admin, label, ERROR_POLICY, limits)
    await eventually(lambda: open_one(channels, admin, name), 30, "the ERROR checkpoint")
    (cp,) = await open_one(channels, admin, name)
    assert cp.trigger == epb.CHECKPOINT_TRIGGER_ERROR and cp.subtasks == [f"{name}/subtasks/s0"]
    assert "TIMED_OUT" in cp.reason and "total time limit reached" in cp.reason, cp.reason

    await reaches(channels, admin, name, spb.TASK_STATE_WAITING_CHECKPOINT, 10, "the task to wait instead of failing")
    assert (await subtasks(channels, admin, name))["s0"].state == spb.SUBTASK_STATE_WAITING_CHECKPOINT


async def test_a_subtask_no_agent_takes_within_its_queue_wait_limit_waits_at_an_error_checkpoint(
    stack: Stack, channels: dict[str, grpc.aio.Channel], admin: Metadata, agents: list[ScriptedAgent],
    operator_token: str,
) -> None:  # fmt: skip
    limits = work_pb2.TimeLimits()
    limits.queue_wait.FromTimedelta(timedelta(seconds=1))
    held = await create(channels, admin, f"nobody-{uuid.uuid4().hex[:6]}", ERROR_POLICY, limits)  # no agent has it
    failing = await create(channels, admin, f"nobody-{uuid.uuid4().hex[:6]}", None, limits)  # no ERROR trigger
    await eventually(lambda: open_one(channels, admin, held), 30, "the ERROR checkpoint")
    (cp,) = await open_one(channels, admin, held)
    assert cp.trigger == epb.CHECKPOINT_TRIGGER_ERROR and cp.subtasks == [f"{held}/subtasks/s0"]
    assert "queue-wait time limit reached" in cp.reason, cp.reason

    await reaches(
        channels,
        admin,
        held,
        spb.TASK_STATE_WAITING_CHECKPOINT,
        10,
        "the task that never started to wait instead of failing",
    )
    assert (await subtasks(channels, admin, held))["s0"].state == spb.SUBTASK_STATE_WAITING_CHECKPOINT

    await reaches(channels, admin, failing, spb.TASK_STATE_FAILED, 30, "the task without the trigger to fail at once")
    assert await open_one(channels, admin, failing) == []

    await cpb_grpc.CheckpointServiceStub(channels["evaluator"]).DecideCheckpoint(
        cpb.DecideCheckpointRequest(name=cp.name, decision=epb.CHECKPOINT_DECISION_APPROVE),
        metadata=bearer(operator_token), timeout=10,
    )  # fmt: skip

    await reaches(channels, admin, held, spb.TASK_STATE_FAILED, 30, "approving to accept the failure")
