"""Peer review over real services: REVIEW subtasks on another agent and tool, parsed, voted and combined."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable

import grpc
import pytest
from maw.agent.v1 import agent_service_pb2 as apb
from maw.common.v1 import machine_pb2, work_pb2
from maw.evaluator.v1 import checkpoint_service_pb2 as cpb
from maw.evaluator.v1 import checkpoint_service_pb2_grpc as cpb_grpc
from maw.evaluator.v1 import evaluation_intake_service_pb2 as ipb
from maw.evaluator.v1 import evaluation_intake_service_pb2_grpc as ipb_grpc
from maw.evaluator.v1 import evaluation_service_pb2 as evpb
from maw.evaluator.v1 import evaluation_service_pb2_grpc as evpb_grpc
from maw.evaluator.v1 import resources_pb2 as epb
from maw.evaluator.v1 import review_service_pb2 as rvpb
from maw.evaluator.v1 import review_service_pb2_grpc as rvpb_grpc
from maw.scheduler.v1 import resources_pb2 as spb
from maw.scheduler.v1 import task_service_pb2 as tpb
from maw.scheduler.v1 import task_service_pb2_grpc as tpb_grpc

from deploy.local import Stack
from tests.integration.clients import Metadata, ScriptedAgent, bearer, enroll, eventually
from tests.integration.test_evaluator import GOOD, diff_result

CLAUDE, GEMINI = machine_pb2.TOOL_KIND_CLAUDE_CODE, machine_pb2.TOOL_KIND_GEMINI_CLI
REVIEW = work_pb2.SUBTASK_TYPE_REVIEW


def verdict(recommendation: str, score: float = 9, summary: str = "fine") -> str:
    """A stand-in reviewer's final text: prose, then the review object in a fenced json block."""
    review = {
        "scores": {"code_quality": score, "completeness": score, "security": score},
        "recommendation": recommendation,
        "summary": summary,
        "suggestions": ["validate the inputs"] if recommendation == "CORRECT" else [],
        "findings": [{"path": "app.py", "line": 1, "severity": "MEDIUM", "message": "no input validation"}],
    }
    return f"I read the change carefully.\n\n```json\n{json.dumps(review, indent=2)}\n```\n"


def author(assignment: apb.Assignment) -> apb.Result:
    """A stand-in coding tool: delivers the same good change for any work."""
    return diff_result(assignment, GOOD)


def reviewer(outputs: list[str]) -> Callable[[apb.Assignment], apb.Result]:
    """A stand-in reviewing tool: answers the n-th REVIEW assignment with the n-th output (the last repeats)."""
    seen: list[int] = []

    def behaviour(assignment: apb.Assignment) -> apb.Result:
        if assignment.type != REVIEW:
            return author(assignment)
        seen.append(1)
        output = outputs[min(len(seen), len(outputs)) - 1]
        return apb.Result(lease=assignment.lease, outcome=work_pb2.OUTCOME_SUCCEEDED, summary="reviewed", output=output)

    return behaviour


async def start(
    stack: Stack, channels: dict[str, grpc.aio.Channel], admin: Metadata, started: list[ScriptedAgent],
    tool: machine_pb2.ToolKind.ValueType, behaviour: Callable[[apb.Assignment], apb.Result],
) -> ScriptedAgent:  # fmt: skip
    worker, credential = await enroll(channels["registry"], admin, f"rv-{uuid.uuid4().hex[:8]}", [tool])
    agent = ScriptedAgent(f"127.0.0.1:{stack.ports.scheduler}", worker, credential, [tool], behaviour=behaviour)
    await agent.start()
    started.append(agent)
    return agent


async def pair(
    stack: Stack, channels: dict[str, grpc.aio.Channel], admin: Metadata, started: list[ScriptedAgent],
    outputs: list[str],
) -> tuple[ScriptedAgent, ScriptedAgent]:  # fmt: skip
    """An author with Claude Code and a reviewer with Gemini CLI."""
    writer = await start(stack, channels, admin, started, CLAUDE, author)
    critic = await start(stack, channels, admin, started, GEMINI, reviewer(outputs))
    return writer, critic


async def create(channels: dict[str, grpc.aio.Channel], admin: Metadata, reviewers: int = 2) -> str:
    graph = tpb.SubtaskGraph(
        subtasks=[
            spb.SubtaskSpec(
                key="implement",
                display_name="Implement",
                type=work_pb2.SUBTASK_TYPE_CODE_GENERATION,
                preferred_tool=machine_pb2.ToolChoice(kind=CLAUDE),
            )
        ]
    )
    policy = epb.Policy(peer_review=epb.PeerReviewPolicy(reviewers=reviewers, require_different_tool=True))
    task = spb.Task(description="Add an adder", policy=policy)
    created = await tpb_grpc.TaskServiceStub(channels["scheduler"]).CreateTask(
        tpb.CreateTaskRequest(task=task, graph=graph), metadata=admin, timeout=10
    )
    return created.task.name


async def get_task(channels: dict[str, grpc.aio.Channel], admin: Metadata, name: str) -> spb.Task:
    reply = await tpb_grpc.TaskServiceStub(channels["scheduler"]).GetTask(
        tpb.GetTaskRequest(name=name), metadata=admin, timeout=10
    )
    return reply.task


async def subtasks(channels: dict[str, grpc.aio.Channel], admin: Metadata, name: str) -> dict[str, spb.Subtask]:
    reply = await tpb_grpc.TaskServiceStub(channels["scheduler"]).ListSubtasks(
        tpb.ListSubtasksRequest(parent=name), metadata=admin, timeout=10
    )
    return {s.key: s for s in reply.subtasks}


async def evaluations(channels: dict[str, grpc.aio.Channel], admin: Metadata, name: str) -> list[epb.Evaluation]:
    reply = await evpb_grpc.EvaluationServiceStub(channels["evaluator"]).ListEvaluations(
        evpb.ListEvaluationsRequest(filter=f'task = "{name}"'), metadata=admin, timeout=10
    )
    return list(reply.evaluations)


async def reviews(channels: dict[str, grpc.aio.Channel], token: Metadata, query: str) -> list[epb.Review]:
    reply = await rvpb_grpc.ReviewServiceStub(channels["evaluator"]).ListReviews(
        rvpb.ListReviewsRequest(filter=query), metadata=token, timeout=10
    )
    return list(reply.reviews)


async def finished(channels: dict[str, grpc.aio.Channel], admin: Metadata, name: str) -> None:
    async def done() -> bool:
        return (await get_task(channels, admin, name)).state == spb.TASK_STATE_SUCCEEDED

    await eventually(done, 30, f"{name} to succeed")


async def test_a_result_reviewed_by_two_other_agents_is_accepted_with_its_reviews(
    stack: Stack, channels: dict[str, grpc.aio.Channel], admin: Metadata, agents: list[ScriptedAgent],
    viewer_token: str,
) -> None:  # fmt: skip
    writer, critic = await pair(stack, channels, admin, agents, [verdict("ACCEPT", 9), verdict("ACCEPT", 8)])
    name = await create(channels, admin)
    await finished(channels, admin, name)

    assert [a.key for a in writer.assignments] == ["implement"], "the author never reviews its own work"
    keys = sorted(a.key for a in critic.assignments)
    assert keys == ["implement-review-1-1", "implement-review-1-2"]
    prompt = critic.assignments[0].prompt
    assert "+def add(a: int, b: int) -> int:" in prompt, "the reviewer sees the diff"
    assert '"recommendation"' in prompt and "Add an adder" in prompt, "and the format and the task"
    subs = await subtasks(channels, admin, name)
    for key in keys:
        assert subs[key].type == REVIEW and subs[key].review_of == f"{name}/subtasks/implement"
        assert subs[key].state == spb.SUBTASK_STATE_SUCCEEDED
    assert subs["implement"].state == spb.SUBTASK_STATE_SUCCEEDED
    assert (await get_task(channels, admin, name)).subtask_count == 3

    (evaluation,) = await evaluations(channels, admin, name)
    assert evaluation.state == epb.EVALUATION_STATE_COMPLETED and evaluation.verdict == epb.VERDICT_ACCEPT
    assert "reviewers voted ACCEPT 2, CORRECT 0" in evaluation.verdict_reason
    assert len(evaluation.reviews) == 2
    completeness = next(d for d in evaluation.dimensions if d.dimension == epb.DIMENSION_COMPLETENESS)
    assert completeness.measured and completeness.scorers == ["peer-review"] and completeness.score == 8.5
    assert any(
        f.scorer.startswith("reviews/") and f.path == "app.py" for d in evaluation.dimensions for f in d.evidence
    )

    viewer = bearer(viewer_token)
    listed = await reviews(channels, viewer, f'subtask = "{name}/subtasks/implement" AND state = VALID')
    assert sorted(r.name for r in listed) == sorted(evaluation.reviews)
    got = await rvpb_grpc.ReviewServiceStub(channels["evaluator"]).GetReview(
        rvpb.GetReviewRequest(name=listed[0].name), metadata=viewer, timeout=10
    )
    review = got.review
    assert review.reviewer == critic.worker and review.reviewer_tool.kind == GEMINI
    assert review.recommendation == epb.VERDICT_ACCEPT and review.attempt == 1
    assert review.review_subtask.startswith(f"{name}/subtasks/implement-review-1-")
    assert {s.dimension for s in review.scores} == {
        epb.DIMENSION_CODE_QUALITY, epb.DIMENSION_COMPLETENESS, epb.DIMENSION_SECURITY
    }  # fmt: skip


async def test_malformed_and_out_of_range_reviews_are_recorded_and_excused_and_the_task_still_succeeds(
    stack: Stack, channels: dict[str, grpc.aio.Channel], admin: Metadata, agents: list[ScriptedAgent],
) -> None:  # fmt: skip
    out_of_range = verdict("ACCEPT").replace('"security": 9', '"security": 12')
    _, _ = await pair(stack, channels, admin, agents, ["Looks great, ship it!", out_of_range])
    name = await create(channels, admin)
    await finished(channels, admin, name)

    found = await reviews(channels, admin, f'task = "{name}"')
    assert {r.state for r in found} == {epb.REVIEW_STATE_MALFORMED}
    assert sorted(r.error for r in found) == ["no JSON object in the output", "scores.security: 12 is outside 0–10"]
    subs = await subtasks(channels, admin, name)
    assert sorted(subs) == ["implement", "implement-review-1-1", "implement-review-1-2"], "nothing else was added"
    for key in ("implement-review-1-1", "implement-review-1-2"):
        assert subs[key].state == spb.SUBTASK_STATE_FAILED, "a malformed review fails its REVIEW subtask"
        assert "MALFORMED" in subs[key].state_message
    task = await get_task(channels, admin, name)
    assert task.state == spb.TASK_STATE_SUCCEEDED, "a failed review is excused: it never fails its task"
    (evaluation,) = await evaluations(channels, admin, name)
    assert evaluation.verdict == epb.VERDICT_ACCEPT
    assert (
        "no valid peer review" in evaluation.verdict_reason
        and "decided by the combined score" in evaluation.verdict_reason
    )
    assert all("peer-review" not in d.scorers for d in evaluation.dimensions), "malformed reviews count for nothing"


async def test_a_majority_correct_sends_the_result_back_with_the_reviewers_words(
    stack: Stack, channels: dict[str, grpc.aio.Channel], admin: Metadata, agents: list[ScriptedAgent],
) -> None:  # fmt: skip
    asks = verdict("CORRECT", 8, "the adder must reject non-integers")
    writer, _ = await pair(stack, channels, admin, agents, [asks, asks, verdict("ACCEPT", 9)])
    name = await create(channels, admin)
    await finished(channels, admin, name)

    assert [a.key for a in writer.assignments] == ["implement", "implement-fix-1"]
    fix = writer.assignments[1]
    assert fix.type == work_pb2.SUBTASK_TYPE_CODE_FIX
    assert "the adder must reject non-integers" in fix.prompt and "validate the inputs" in fix.prompt
    first, second = await evaluations(channels, admin, name)
    assert first.verdict == epb.VERDICT_CORRECT and first.overall_score >= 5
    assert "the majority asks for a correction although" in first.verdict_reason
    assert second.subtask == f"{name}/subtasks/implement-fix-1" and second.verdict == epb.VERDICT_ACCEPT
    assert len(second.reviews) == 2, "the correction is reviewed too"


async def test_a_replayed_review_result_applies_once(
    stack: Stack, channels: dict[str, grpc.aio.Channel], admin: Metadata, agents: list[ScriptedAgent],
) -> None:  # fmt: skip
    _, critic = await pair(stack, channels, admin, agents, [verdict("ACCEPT", 9)])
    name = await create(channels, admin, reviewers=1)
    await finished(channels, admin, name)
    (review,) = await reviews(channels, admin, f'task = "{name}"')
    (ack,) = [a for a in critic.acks if a.lease.subtask == review.review_subtask]

    replay = ipb.SubmittedResult(
        result_id=ack.result_id, task=name, subtask=review.review_subtask, subtask_key="implement-review-1-1",
        subtask_type=REVIEW, attempt=1, review_of=review.subtask, review_of_attempt=1,
        outcome=work_pb2.OUTCOME_SUCCEEDED, output=verdict("CORRECT", 1),
    )  # fmt: skip
    intake = ipb_grpc.EvaluationIntakeServiceStub(channels["evaluator"])
    reply = await intake.SubmitResults(
        ipb.SubmitResultsRequest(results=[replay]), metadata=bearer(stack.service_credential("scheduler")), timeout=10
    )
    assert reply.acks[0].disposition == ipb.INTAKE_DISPOSITION_DUPLICATE
    assert reply.acks[0].evaluation == review.name, "the ack names the review the result became"
    again = await reviews(channels, admin, f'task = "{name}"')
    assert again == [review], "the replay changed nothing"
    (evaluation,) = await evaluations(channels, admin, name)
    assert evaluation.verdict == epb.VERDICT_ACCEPT and list(evaluation.reviews) == [review.name]
    assert (await get_task(channels, admin, name)).state == spb.TASK_STATE_SUCCEEDED


async def test_list_reviews_refuses_an_unknown_filter_and_get_review_an_unknown_name(
    stack: Stack, channels: dict[str, grpc.aio.Channel], admin: Metadata,
) -> None:  # fmt: skip
    stub = rvpb_grpc.ReviewServiceStub(channels["evaluator"])
    with pytest.raises(grpc.aio.AioRpcError) as bad:
        await stub.ListReviews(rvpb.ListReviewsRequest(filter="state = GREAT"), metadata=admin, timeout=10)
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await stub.GetReview(rvpb.GetReviewRequest(name="reviews/nope"), metadata=admin, timeout=10)
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND


async def test_a_checkpoint_shows_the_reviews_of_the_held_result(
    stack: Stack, channels: dict[str, grpc.aio.Channel], admin: Metadata, agents: list[ScriptedAgent],
) -> None:  # fmt: skip
    await pair(stack, channels, admin, agents, [verdict("ACCEPT", 5.5)])
    name = await create(channels, admin)
    inbox = cpb_grpc.CheckpointServiceStub(channels["evaluator"])

    async def opened() -> list[epb.Checkpoint]:
        reply = await inbox.ListCheckpoints(
            cpb.ListCheckpointsRequest(filter=f'state = OPEN AND task = "{name}"'), metadata=admin, timeout=10
        )
        return list(reply.checkpoints)

    await eventually(opened, 30, "a LOW_SCORE checkpoint")
    (checkpoint,) = await opened()
    assert checkpoint.trigger == epb.CHECKPOINT_TRIGGER_LOW_SCORE, "peer scores below the review threshold stop"
    got = await inbox.GetCheckpoint(cpb.GetCheckpointRequest(name=checkpoint.name), metadata=admin, timeout=10)
    (subject,) = got.subjects
    assert len(subject.reviews) == 2 and {r.state for r in subject.reviews} == {epb.REVIEW_STATE_VALID}
    assert sorted(r.name for r in subject.reviews) == sorted(subject.evaluation.reviews)


async def test_a_review_subtask_that_fails_for_good_is_a_failed_review_and_never_fails_its_task(
    stack: Stack, channels: dict[str, grpc.aio.Channel], admin: Metadata, agents: list[ScriptedAgent],
) -> None:  # fmt: skip
    def broken(assignment: apb.Assignment) -> apb.Result:
        if assignment.type != REVIEW:
            return author(assignment)
        return apb.Result(lease=assignment.lease, outcome=work_pb2.OUTCOME_FAILED, error_message="quota exceeded")

    await start(stack, channels, admin, agents, CLAUDE, author)
    critic = await start(stack, channels, admin, agents, GEMINI, broken)
    name = await create(channels, admin, reviewers=1)
    await finished(channels, admin, name)

    attempts = [a.lease.attempt for a in critic.assignments]
    assert len(attempts) > 1 and attempts == sorted(attempts), "the review was retried like any subtask first"
    (review,) = await reviews(channels, admin, f'task = "{name}"')
    assert review.state == epb.REVIEW_STATE_FAILED
    assert review.error == "the review subtask failed (FAILED): quota exceeded"
    subs = await subtasks(channels, admin, name)
    assert subs["implement-review-1-1"].state == spb.SUBTASK_STATE_FAILED
    assert subs["implement"].state == spb.SUBTASK_STATE_SUCCEEDED
    (evaluation,) = await evaluations(channels, admin, name)
    assert evaluation.verdict == epb.VERDICT_ACCEPT and list(evaluation.reviews) == [review.name]
