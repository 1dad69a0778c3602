"""Rollback to a checkpoint over real services: preview, rollback, fencing of old attempts, and refusals."""

from __future__ import annotations

import uuid

import grpc
import pytest
from maw.agent.v1 import agent_service_pb2 as apb
from maw.common.v1 import work_pb2
from maw.evaluator.v1 import checkpoint_service_pb2 as cpb
from maw.evaluator.v1 import checkpoint_service_pb2_grpc as cpb_grpc
from maw.evaluator.v1 import evaluation_intake_service_pb2 as ipb
from maw.evaluator.v1 import evaluation_intake_service_pb2_grpc as ipb_grpc
from maw.evaluator.v1 import resources_pb2 as epb
from maw.scheduler.v1 import resources_pb2 as spb
from maw.scheduler.v1 import task_service_pb2 as tpb
from maw.scheduler.v1 import task_service_pb2_grpc as tpb_grpc

from deploy.local import Stack
from tests.integration.clients import Metadata, ScriptedAgent, bearer, eventually
from tests.integration.test_evaluator import GOOD, diff_result, evaluations, reaches, subtasks, task_state, violations
from tests.integration.test_evaluator_checkpoints import checkpoints, create, open_one, start_agent, waits

HIGH = epb.Policy(checkpoint_frequency=work_pb2.CHECKPOINT_FREQUENCY_HIGH)


def states_of(subs: dict[str, spb.Subtask]) -> dict[str, tuple[int, int]]:
    return {k: (s.state, s.attempt) for k, s in subs.items()}


async def approve_until(
    channels: dict[str, grpc.aio.Channel], admin: Metadata, operator: Metadata, name: str, timeout: float = 60
) -> None:
    """Approve every checkpoint the task opens until it succeeds."""
    stub = cpb_grpc.CheckpointServiceStub(channels["evaluator"])

    async def done() -> bool:
        for cp in await open_one(channels, admin, name):
            try:
                await stub.DecideCheckpoint(
                    cpb.DecideCheckpointRequest(name=cp.name, decision=epb.CHECKPOINT_DECISION_APPROVE),
                    metadata=operator, timeout=10,
                )  # fmt: skip
            except grpc.aio.AioRpcError as exc:  # closed meanwhile (the task ended); the next round sees it
                assert exc.code() == grpc.StatusCode.FAILED_PRECONDITION
        return await task_state(channels, admin, name) == spb.TASK_STATE_SUCCEEDED

    await eventually(done, timeout, "the task to succeed with every checkpoint approved")


async def test_rollback_after_success_reruns_later_steps_and_old_attempts_are_stale(
    stack: Stack, channels: dict[str, grpc.aio.Channel], admin: Metadata, agents: list[ScriptedAgent],
    operator_token: str, viewer_token: str,
) -> None:  # fmt: skip
    label = uuid.uuid4().hex[:8]
    hold = {"on": False}
    agent = await start_agent(
        stack, channels, admin, agents, label, lambda a: None if hold["on"] else diff_result(a, GOOD)
    )
    name = await create(channels, admin, label, steps=3, policy=HIGH)
    operator = bearer(operator_token)
    stub = cpb_grpc.CheckpointServiceStub(channels["evaluator"])
    await approve_until(channels, admin, operator, name)
    history = await checkpoints(channels, admin, name)
    assert [list(c.subtasks) for c in history] == [[f"{name}/subtasks/s{i}"] for i in range(3)]
    first, second, third = history
    before = states_of(await subtasks(channels, admin, name))
    later_evaluations = {e.name for e in await evaluations(channels, admin, name) if not e.subtask.endswith("/s0")}

    preview = await stub.PreviewRollback(cpb.PreviewRollbackRequest(name=first.name), metadata=bearer(viewer_token))
    effect = preview.effect
    assert list(effect.reset_subtasks) == [f"{name}/subtasks/s1", f"{name}/subtasks/s2"]
    assert list(effect.cancelled_subtasks) == [] and list(effect.excused_subtasks) == []
    assert list(effect.closed_checkpoints) == [second.name, third.name]
    assert set(effect.superseded_evaluations) == later_evaluations and len(later_evaluations) == 2
    assert effect.progress_percent == 33
    assert states_of(await subtasks(channels, admin, name)) == before, "a preview changes nothing"
    assert await checkpoints(channels, admin, name) == history
    assert await task_state(channels, admin, name) == spb.TASK_STATE_SUCCEEDED

    def rollback(**fields: object) -> cpb.RollbackToCheckpointRequest:
        return cpb.RollbackToCheckpointRequest(name=first.name, comment="redo steps 1 and 2", **fields)  # type: ignore[arg-type]

    with pytest.raises(grpc.aio.AioRpcError) as stale:
        await stub.RollbackToCheckpoint(rollback(etag="not-the-preview"), metadata=operator, timeout=15)
    assert stale.value.code() == grpc.StatusCode.ABORTED
    with pytest.raises(grpc.aio.AioRpcError) as denied:
        await stub.RollbackToCheckpoint(rollback(etag=preview.etag), metadata=bearer(viewer_token), timeout=15)
    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert states_of(await subtasks(channels, admin, name)) == before, "refused rollbacks change nothing"
    assert await checkpoints(channels, admin, name) == history

    hold["on"] = True  # the rerun of s1 stays running, so the rolled-back state can be looked at
    request_id = uuid.uuid4().hex
    reply = await stub.RollbackToCheckpoint(
        rollback(etag=preview.etag, request_id=request_id), metadata=operator, timeout=15
    )
    assert reply.effect == effect
    assert reply.checkpoint.HasField("rollback_time") and reply.checkpoint.etag != first.etag
    assert reply.checkpoint.state == epb.CHECKPOINT_STATE_APPROVED, "a decided checkpoint keeps its decision"
    assert list(reply.checkpoint.completed_subtasks) == [f"{name}/subtasks/s0"]
    again = await stub.RollbackToCheckpoint(
        rollback(etag=preview.etag, request_id=request_id), metadata=operator, timeout=15
    )
    assert again == reply, "a retry with the same request id returns the first answer"

    async def rolled_back() -> bool:
        subs = await subtasks(channels, admin, name)
        return subs["s2"].state == spb.SUBTASK_STATE_PENDING and subs["s1"].state in (
            spb.SUBTASK_STATE_ASSIGNED, spb.SUBTASK_STATE_RUNNING,
        )  # fmt: skip

    await eventually(rolled_back, 15, "s1 to run again and s2 to wait for it")
    subs = await subtasks(channels, admin, name)
    assert await task_state(channels, admin, name) == spb.TASK_STATE_RUNNING
    assert subs["s0"].state == spb.SUBTASK_STATE_SUCCEEDED and subs["s0"].attempt == before["s0"][1]
    assert subs["s1"].attempt == before["s1"][1] + 2, "the reset moved the attempt on, the new claim once more"
    assert subs["s2"].evaluation == "" and subs["s2"].checkpoint == "" and subs["s2"].grade == 0
    after = {c.name: c for c in await checkpoints(channels, admin, name)}
    assert after[second.name].state == epb.CHECKPOINT_STATE_APPROVED, "later decided checkpoints stay in history"

    old_s2 = next(a for a in agent.assignments if a.key == "s2")
    agent.send(apb.ConnectRequest(results=apb.ResultBatch(results=[diff_result(old_s2, GOOD)])))

    def late_ack() -> apb.ResultAck | None:
        return next((a for a in agent.acks if a.lease == old_s2.lease and a.result_id == ""), None)

    await eventually(late_ack, 10, "the late result's acknowledgement")
    ack = late_ack()
    assert ack is not None and ack.disposition == apb.RESULT_DISPOSITION_STALE

    # The same old attempt's result reaching the evaluator anyway (committed just before the verdict applied):
    # it is never judged, so it can neither open a checkpoint nor send a verdict.
    intake = ipb_grpc.EvaluationIntakeServiceStub(channels["evaluator"])
    late = ipb.SubmittedResult(
        result_id=uuid.uuid4().hex, task=name, subtask=f"{name}/subtasks/s2", subtask_key="s2",
        attempt=old_s2.lease.attempt, outcome=work_pb2.OUTCOME_SUCCEEDED, diff=work_pb2.Diff(unified_diff=GOOD),
        task_subtasks_total=3, task_subtasks_succeeded=2,
    )  # fmt: skip
    submitted = await intake.SubmitResults(
        ipb.SubmitResultsRequest(results=[late]), metadata=bearer(stack.service_credential("scheduler")), timeout=10
    )
    assert submitted.acks[0].disposition == ipb.INTAKE_DISPOSITION_ACCEPTED

    hold["on"] = False
    rerun = [a for a in agent.assignments if a.key == "s1"][-1]
    agent.send(apb.ConnectRequest(results=apb.ResultBatch(results=[diff_result(rerun, GOOD)])))
    await approve_until(channels, admin, operator, name)
    assert [a.key for a in agent.assignments] == ["s0", "s1", "s2", "s1", "s2"]
    final = await subtasks(channels, admin, name)
    assert all(s.state == spb.SUBTASK_STATE_SUCCEEDED for s in final.values())
    judged = {e.name for e in await evaluations(channels, admin, name)}
    assert submitted.acks[0].evaluation not in judged, "the rolled-back attempt's result was not judged"
    assert [list(c.subtasks) for c in (await checkpoints(channels, admin, name))[3:]] == [
        [f"{name}/subtasks/s1"], [f"{name}/subtasks/s2"],
    ], "only the reruns stopped at checkpoints"  # fmt: skip


async def test_rollback_cancels_the_running_attempt_and_the_subtask_runs_again(
    stack: Stack, channels: dict[str, grpc.aio.Channel], admin: Metadata, agents: list[ScriptedAgent],
    operator_token: str,
) -> None:  # fmt: skip
    label = uuid.uuid4().hex[:8]
    agent = await start_agent(
        stack, channels, admin, agents, label, lambda a: None if a.key == "s1" else diff_result(a, GOOD)
    )
    name = await create(channels, admin, label, steps=2, policy=HIGH)
    stub = cpb_grpc.CheckpointServiceStub(channels["evaluator"])
    await eventually(lambda: open_one(channels, admin, name), 30, "the checkpoint after s0")
    (first,) = await open_one(channels, admin, name)
    await stub.DecideCheckpoint(
        cpb.DecideCheckpointRequest(name=first.name, decision=epb.CHECKPOINT_DECISION_APPROVE),
        metadata=bearer(operator_token), timeout=10,
    )  # fmt: skip

    async def s1_runs() -> bool:
        return (await subtasks(channels, admin, name))["s1"].state == spb.SUBTASK_STATE_RUNNING

    await eventually(s1_runs, 20, "s1 to run")
    preview = await stub.PreviewRollback(cpb.PreviewRollbackRequest(name=first.name), metadata=bearer(operator_token))
    assert list(preview.effect.reset_subtasks) == [f"{name}/subtasks/s1"]
    assert list(preview.effect.cancelled_subtasks) == [f"{name}/subtasks/s1"]
    assert list(preview.effect.closed_checkpoints) == [] and preview.effect.progress_percent == 50
    old = next(a for a in agent.assignments if a.key == "s1")

    await stub.RollbackToCheckpoint(
        cpb.RollbackToCheckpointRequest(name=first.name, etag=preview.etag), metadata=bearer(operator_token),
        timeout=15,
    )  # fmt: skip
    await eventually(lambda: any(c.lease == old.lease for c in agent.cancels), 10, "the running attempt's Cancel")
    await eventually(lambda: len([a for a in agent.assignments if a.key == "s1"]) == 2, 15, "s1 to be assigned again")
    again = [a for a in agent.assignments if a.key == "s1"][-1]
    assert again.lease.attempt == old.lease.attempt + 2
    assert await task_state(channels, admin, name) == spb.TASK_STATE_RUNNING


async def test_rollback_of_an_open_checkpoint_resumes_the_task_and_a_cancelled_task_is_refused(
    stack: Stack, channels: dict[str, grpc.aio.Channel], admin: Metadata, operator_token: str
) -> None:
    name = await create(channels, admin, uuid.uuid4().hex[:8])  # no agent carries the label: nothing runs
    stub = cpb_grpc.CheckpointServiceStub(channels["evaluator"])
    operator = bearer(operator_token)

    async def opened() -> epb.Checkpoint | None:
        try:
            reply = await stub.CreateCheckpoint(
                cpb.CreateCheckpointRequest(checkpoint=epb.Checkpoint(task=name), request_id=request_id),
                metadata=operator, timeout=10,
            )  # fmt: skip
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.NOT_FOUND  # not registered with the evaluator yet
            return None
        return reply.checkpoint

    request_id = uuid.uuid4().hex
    await eventually(opened, 15, "the manual checkpoint")
    cp = await opened()
    assert cp is not None
    await eventually(lambda: waits(channels, admin, name), 15, "the task to pause")

    with pytest.raises(grpc.aio.AioRpcError) as unknown:
        await stub.PreviewRollback(cpb.PreviewRollbackRequest(name="checkpoints/nothing-here"), metadata=operator)
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as bad:
        await stub.RollbackToCheckpoint(cpb.RollbackToCheckpointRequest(name="tasks/x"), metadata=operator)
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT and violations(bad.value) == ["name"]

    preview = await stub.PreviewRollback(cpb.PreviewRollbackRequest(name=cp.name), metadata=operator)
    assert list(preview.effect.reset_subtasks) == [] and list(preview.effect.closed_checkpoints) == [cp.name]
    reply = await stub.RollbackToCheckpoint(
        cpb.RollbackToCheckpointRequest(name=cp.name, etag=preview.etag), metadata=operator, timeout=15
    )
    assert reply.checkpoint.state == epb.CHECKPOINT_STATE_CANCELLED and reply.checkpoint.HasField("close_time")

    await reaches(channels, admin, name, spb.TASK_STATE_RUNNING, 15, "the task to run again")
    assert await open_one(channels, admin, name) == []

    await tpb_grpc.TaskServiceStub(channels["scheduler"]).CancelTask(
        tpb.CancelTaskRequest(name=name, reason="not needed"), metadata=admin, timeout=10
    )
    etag_before = (await checkpoints(channels, admin, name))[0].etag
    for call in (
        stub.PreviewRollback(cpb.PreviewRollbackRequest(name=cp.name), metadata=operator),
        stub.RollbackToCheckpoint(cpb.RollbackToCheckpointRequest(name=cp.name), metadata=operator),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await call
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert (await checkpoints(channels, admin, name))[0].etag == etag_before, "a refused rollback changes nothing"
