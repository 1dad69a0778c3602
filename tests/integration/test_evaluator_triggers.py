"""The plan and final-acceptance checkpoints, policy changes reaching the scheduler, and feedback for future work."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from google.protobuf import field_mask_pb2
from maw.common.v1 import work_pb2
from maw.evaluator.v1 import checkpoint_service_pb2 as cpb
from maw.evaluator.v1 import checkpoint_service_pb2_grpc as cpb_grpc
from maw.evaluator.v1 import policy_service_pb2 as ppb
from maw.evaluator.v1 import policy_service_pb2_grpc as ppb_grpc
from maw.evaluator.v1 import resources_pb2 as epb
from maw.scheduler.v1 import resources_pb2 as spb

from deploy.local import Stack
from tests.integration.clients import Metadata, ScriptedAgent, bearer, eventually
from tests.integration.test_evaluator import reaches, subtasks, task_state, violations
from tests.integration.test_evaluator_checkpoints import create, open_one, start_agent, waits

PLAN = epb.CHECKPOINT_TRIGGER_AFTER_DECOMPOSITION
FINAL = epb.CHECKPOINT_TRIGGER_BEFORE_FINAL_ACCEPT


async def decide(
    channels: dict[str, grpc.aio.Channel], token: str, checkpoint: epb.Checkpoint, decision: int, **fields: object
) -> epb.Checkpoint:
    reply = await cpb_grpc.CheckpointServiceStub(channels["evaluator"]).DecideCheckpoint(
        cpb.DecideCheckpointRequest(name=checkpoint.name, decision=decision, **fields),  # type: ignore[arg-type]
        metadata=bearer(token), timeout=10,
    )  # fmt: skip
    return reply.checkpoint


async def one_open(channels: dict[str, grpc.aio.Channel], admin: Metadata, name: str, trigger: int) -> epb.Checkpoint:
    async def found() -> list[epb.Checkpoint]:
        return [c for c in await open_one(channels, admin, name) if c.trigger == trigger]

    await eventually(found, 30, f"an open checkpoint with trigger {trigger}")
    (checkpoint,) = await found()
    return checkpoint


async def test_a_task_asking_to_confirm_its_plan_runs_nothing_until_a_person_approves(
    stack: Stack, channels: dict[str, grpc.aio.Channel], admin: Metadata, agents: list[ScriptedAgent],
    operator_token: str,
) -> None:  # fmt: skip
    label = "plan"
    agent = await start_agent(stack, channels, admin, agents, label)
    name = await create(channels, admin, label, steps=2, policy=epb.Policy(triggers=[PLAN]))
    assert await task_state(channels, admin, name) == spb.TASK_STATE_WAITING_CHECKPOINT, "it waits from creation"

    checkpoint = await one_open(channels, admin, name, PLAN)
    assert "2 subtasks" in checkpoint.reason and "s0 (code_generation)" in checkpoint.reason
    assert list(checkpoint.subtasks) == [], "the whole task waits; no result is held"
    await asyncio.sleep(1.0)
    assert agent.assignments == [], "nothing is assigned before the plan is confirmed"

    await decide(channels, operator_token, checkpoint, epb.CHECKPOINT_DECISION_APPROVE)
    await reaches(channels, admin, name, spb.TASK_STATE_SUCCEEDED)
    assert [a.key for a in agent.assignments] == ["s0", "s1"]


async def test_a_finished_task_waits_for_final_acceptance_and_succeeds_only_when_approved(
    stack: Stack, channels: dict[str, grpc.aio.Channel], admin: Metadata, agents: list[ScriptedAgent],
    operator_token: str,
) -> None:  # fmt: skip
    label = "final"
    await start_agent(stack, channels, admin, agents, label)
    approved = await create(channels, admin, label, policy=epb.Policy(triggers=[FINAL]))
    rejected = await create(channels, admin, label, policy=epb.Policy(triggers=[FINAL]))

    for name in (approved, rejected):
        checkpoint = await one_open(channels, admin, name, FINAL)
        assert checkpoint.progress_percent == 100
        await eventually(lambda name=name: waits(channels, admin, name), 10, "the task to wait")  # type: ignore[misc]
        assert (await subtasks(channels, admin, name))["s0"].state == spb.SUBTASK_STATE_SUCCEEDED
        await asyncio.sleep(0.5)
        assert await task_state(channels, admin, name) == spb.TASK_STATE_WAITING_CHECKPOINT, "not done before a person"

    first = await one_open(channels, admin, approved, FINAL)
    await decide(channels, operator_token, first, epb.CHECKPOINT_DECISION_APPROVE)
    await reaches(channels, admin, approved, spb.TASK_STATE_SUCCEEDED)

    second = await one_open(channels, admin, rejected, FINAL)
    await decide(channels, operator_token, second, epb.CHECKPOINT_DECISION_REJECT, comment="not what we wanted")
    await reaches(channels, admin, rejected, spb.TASK_STATE_CANCELLED)


async def test_a_changed_task_policy_reaches_the_scheduler_before_later_decisions(
    stack: Stack, channels: dict[str, grpc.aio.Channel], admin: Metadata, agents: list[ScriptedAgent],
    operator_token: str,
) -> None:  # fmt: skip
    label = "policy"
    await start_agent(stack, channels, admin, agents, label)
    name = await create(channels, admin, label, policy=epb.Policy(triggers=[PLAN]))
    plan = await one_open(channels, admin, name, PLAN)

    # Neither the task nor its registered policy asked for final acceptance; the change is what makes it wait.
    changed = epb.Policy(name=f"{name}/policy", triggers=[FINAL])
    await ppb_grpc.PolicyServiceStub(channels["evaluator"]).UpdatePolicy(
        ppb.UpdatePolicyRequest(policy=changed, update_mask=field_mask_pb2.FieldMask(paths=["triggers"])),
        metadata=bearer(operator_token), timeout=10,
    )  # fmt: skip
    await decide(channels, operator_token, plan, epb.CHECKPOINT_DECISION_APPROVE)

    final = await one_open(channels, admin, name, FINAL)
    assert (await subtasks(channels, admin, name))["s0"].state == spb.SUBTASK_STATE_SUCCEEDED
    await decide(channels, operator_token, final, epb.CHECKPOINT_DECISION_APPROVE)
    await reaches(channels, admin, name, spb.TASK_STATE_SUCCEEDED)


async def test_feedback_for_the_future_reaches_the_subtasks_that_have_not_run(
    stack: Stack, channels: dict[str, grpc.aio.Channel], admin: Metadata, agents: list[ScriptedAgent],
    operator_token: str,
) -> None:  # fmt: skip
    label = "future"
    agent = await start_agent(stack, channels, admin, agents, label)
    policy = epb.Policy(
        triggers=[epb.CHECKPOINT_TRIGGER_FREQUENCY], checkpoint_frequency=work_pb2.CHECKPOINT_FREQUENCY_HIGH
    )
    name = await create(channels, admin, label, steps=2, policy=policy)
    first = await one_open(channels, admin, name, epb.CHECKPOINT_TRIGGER_FREQUENCY)
    words = "Give every public function type hints and a docstring."
    feedback = work_pb2.Feedback(type=work_pb2.FEEDBACK_TYPE_STYLE, text=words, reference_files=["app.py"])
    await decide(channels, operator_token, first, epb.CHECKPOINT_DECISION_CORRECT, feedback=[feedback],
                 apply_to_future=True)  # fmt: skip

    async def carried() -> bool:
        return [f.text for f in (await subtasks(channels, admin, name))["s1"].feedback] == [words]

    await eventually(carried, 30, "the subtask that has not run to carry the feedback")

    async def finished() -> bool:  # approve every later FREQUENCY stop until the task is done
        for checkpoint in await open_one(channels, admin, name):
            await decide(channels, operator_token, checkpoint, epb.CHECKPOINT_DECISION_APPROVE)
        return await task_state(channels, admin, name) == spb.TASK_STATE_SUCCEEDED

    await eventually(finished, 60, "the corrected task to finish")
    prompts = {a.key: a.prompt for a in agent.assignments}
    assert set(prompts) == {"s0", "s0-fix-1", "s1"}
    assert words in prompts["s1"] and "(see app.py)" in prompts["s1"], "the future subtask's prompt has the words"
    assert "Feedback from the people" not in prompts["s0-fix-1"], "a correction carries them in its own instructions"
    assert words in prompts["s0-fix-1"]
    assert words not in prompts["s0"]


async def test_the_inbox_filters_by_assignee_and_trigger(
    stack: Stack, channels: dict[str, grpc.aio.Channel], admin: Metadata, agents: list[ScriptedAgent],
    operator_token: str,
) -> None:  # fmt: skip
    await start_agent(stack, channels, admin, agents, "inbox")
    await start_agent(stack, channels, admin, agents, "inbox-busy", behaviour=lambda a: None)  # never finishes
    planned = await create(channels, admin, "inbox", policy=epb.Policy(triggers=[PLAN]))
    running = await create(channels, admin, "inbox-busy")
    stub = cpb_grpc.CheckpointServiceStub(channels["evaluator"])

    async def for_ada() -> epb.Checkpoint | None:
        request = cpb.CreateCheckpointRequest(
            checkpoint=epb.Checkpoint(task=running, reason="Ada checks this", assignee="users/ada"),
            request_id=f"ada-{running}",
        )
        try:
            return (await stub.CreateCheckpoint(request, metadata=bearer(operator_token), timeout=10)).checkpoint
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.NOT_FOUND, exc.details()  # not registered with the evaluator yet
            return None

    await eventually(for_ada, 15, "the manual checkpoint for Ada")
    ada = await for_ada()
    plan = await one_open(channels, admin, planned, PLAN)

    async def inbox(filter_: str) -> list[str]:
        reply = await stub.ListCheckpoints(cpb.ListCheckpointsRequest(filter=filter_), metadata=admin, timeout=10)
        return [c.name for c in reply.checkpoints if c.task in (planned, running)]

    assert ada is not None and ada.assignee == "users/ada"
    assert await inbox('assignee = "users/ada" AND state = OPEN') == [ada.name]
    assert await inbox('assignee = "" AND state = OPEN') == [plan.name], "unassigned ones only"
    assert await inbox("trigger = MANUAL") == [ada.name]
    assert await inbox(f'trigger = AFTER_DECOMPOSITION AND task = "{planned}"') == [plan.name]
    with pytest.raises(grpc.aio.AioRpcError) as bad:
        await stub.ListCheckpoints(cpb.ListCheckpointsRequest(filter="trigger = SOMETIMES"), metadata=admin, timeout=10)
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT and violations(bad.value) == ["filter"]
