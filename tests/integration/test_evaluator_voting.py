"""Voting over real services: competing solutions, the best one continues, a tie goes to a person."""

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
from maw.evaluator.v1 import resources_pb2 as epb
from maw.evaluator.v1 import review_service_pb2 as rvpb
from maw.evaluator.v1 import review_service_pb2_grpc as rvpb_grpc
from maw.scheduler.v1 import resources_pb2 as spb
from maw.scheduler.v1 import task_service_pb2 as tpb
from maw.scheduler.v1 import task_service_pb2_grpc as tpb_grpc

from deploy.local import Stack
from services.runtime.errors import details_from_trailers
from tests.integration.clients import Metadata, ScriptedAgent, bearer, enroll, eventually
from tests.integration.test_evaluator import reaches
from tests.integration.test_evaluator_durability import _query, _restart_evaluator

CLAUDE, GEMINI, SHELL = machine_pb2.TOOL_KIND_CLAUDE_CODE, machine_pb2.TOOL_KIND_GEMINI_CLI, machine_pb2.TOOL_KIND_SHELL


def change(name: str, tests: bool = True, broken: bool = False) -> str:
    """A unified diff creating app.py with function ``name`` (and its test, unless ``tests`` is off)."""
    body = f"+def {name}(a: int, b: int) -> int\n+    return eval(a)\n" if broken else (
        f"+def {name}(a: int, b: int) -> int:\n+    return a + b\n"
    )  # fmt: skip
    out = f"diff --git a/app.py b/app.py\nnew file mode 100644\n--- /dev/null\n+++ b/app.py\n@@ -0,0 +1,2 @@\n{body}"
    if tests:
        out += (
            "diff --git a/tests/test_app.py b/tests/test_app.py\nnew file mode 100644\n--- /dev/null\n"
            f"+++ b/tests/test_app.py\n@@ -0,0 +1,5 @@\n+from app import {name}\n+\n+\n"
            f"+def test_{name}() -> None:\n+    assert {name}(1, 2) == 3\n"
        )
    return out


BEST, MIDDLE, WORST = change("add"), change("add", tests=False), change("add", broken=True)
TWIN = change("plus")  # scores exactly as BEST does, with a different change


def by_key(diffs: dict[str, str], ranking: list[str] | None = None) -> Callable[[apb.Assignment], apb.Result]:
    """A stand-in AI tool: each subtask key gets its own change; a REVIEW answers with ``ranking``."""

    def behaviour(assignment: apb.Assignment) -> apb.Result:
        if assignment.type == work_pb2.SUBTASK_TYPE_REVIEW:
            text = f"Compared them.\n```json\n{json.dumps({'ranking': ranking or [], 'summary': 'ok'})}\n```\n"
            return apb.Result(lease=assignment.lease, outcome=work_pb2.OUTCOME_SUCCEEDED, output=text)
        diff = diffs.get(assignment.key, "")
        return apb.Result(
            lease=assignment.lease,
            outcome=work_pb2.OUTCOME_SUCCEEDED,
            summary=f"did {assignment.key}",
            diff=work_pb2.Diff(unified_diff=diff, files=[work_pb2.FileChange(path="app.py")] if diff else []),
        )

    return behaviour


async def start_agent(
    stack: Stack, channels: dict[str, grpc.aio.Channel], admin: Metadata, started: list[ScriptedAgent],
    behaviour: Callable[[apb.Assignment], apb.Result], tools: list[machine_pb2.ToolKind.ValueType],
) -> ScriptedAgent:  # fmt: skip
    worker, credential = await enroll(channels["registry"], admin, f"vt-{uuid.uuid4().hex[:8]}", tools)
    agent = ScriptedAgent(f"127.0.0.1:{stack.ports.scheduler}", worker, credential, tools, behaviour=behaviour)
    await agent.start()
    started.append(agent)
    return agent


async def create(
    channels: dict[str, grpc.aio.Channel], admin: Metadata, voting: epb.VotingPolicy
) -> tpb.CreateTaskResponse:
    graph = tpb.SubtaskGraph(
        subtasks=[
            spb.SubtaskSpec(
                key="implement",
                type=work_pb2.SUBTASK_TYPE_CODE_GENERATION,
                preferred_tool=machine_pb2.ToolChoice(kind=CLAUDE),
            ),
            spb.SubtaskSpec(
                key="announce",
                type=work_pb2.SUBTASK_TYPE_DOCUMENTATION,
                dependencies=["implement"],
                preferred_tool=machine_pb2.ToolChoice(kind=SHELL),
            ),
        ]
    )
    task = spb.Task(description="Add an adder", policy=epb.Policy(voting=voting))
    return await tpb_grpc.TaskServiceStub(channels["scheduler"]).CreateTask(
        tpb.CreateTaskRequest(task=task, graph=graph), metadata=admin, timeout=10
    )


async def subtask_states(channels: dict[str, grpc.aio.Channel], admin: Metadata, name: str) -> dict[str, int]:
    reply = await tpb_grpc.TaskServiceStub(channels["scheduler"]).ListSubtasks(
        tpb.ListSubtasksRequest(parent=name), metadata=admin, timeout=10
    )
    return {s.key: s.state for s in reply.subtasks}


async def rounds(channels: dict[str, grpc.aio.Channel], admin: Metadata, name: str) -> list[epb.VotingRound]:
    reply = await rvpb_grpc.ReviewServiceStub(channels["evaluator"]).ListVotingRounds(
        rvpb.ListVotingRoundsRequest(filter=f'task = "{name}"'), metadata=admin, timeout=10
    )
    return list(reply.voting_rounds)


def dependency_diff(agent: ScriptedAgent, key: str) -> str:
    (assignment,) = [a for a in agent.assignments if a.key == key]
    (dep,) = assignment.context.dependencies
    return dep.diff.unified_diff


async def test_the_best_scored_of_three_solutions_continues_and_the_others_are_not_selected(
    stack: Stack, channels: dict[str, grpc.aio.Channel], admin: Metadata, agents: list[ScriptedAgent]
) -> None:
    diffs = {"implement": MIDDLE, "implement-alt-1": BEST, "implement-alt-2": WORST}
    agent = await start_agent(stack, channels, admin, agents, by_key(diffs), [CLAUDE, SHELL])
    created = await create(channels, admin, epb.VotingPolicy(solutions=3))
    name = created.task.name
    assert [s.key for s in created.subtasks] == ["implement", "implement-alt-1", "implement-alt-2", "announce"]
    assert [s.solution_of for s in created.subtasks] == [f"{name}/subtasks/implement"] * 3 + [""]
    assert created.task.subtask_count == 4

    await reaches(channels, admin, name, spb.TASK_STATE_SUCCEEDED, 30, "the voted task to succeed")
    assert await subtask_states(channels, admin, name) == {
        "implement": spb.SUBTASK_STATE_SUCCEEDED,
        "implement-alt-1": spb.SUBTASK_STATE_SUCCEEDED,
        "implement-alt-2": spb.SUBTASK_STATE_NOT_SELECTED,
        "announce": spb.SUBTASK_STATE_SUCCEEDED,
    }
    assert dependency_diff(agent, "announce") == BEST, "the dependent works on the winner's change"

    (voted,) = await rounds(channels, admin, name)
    assert voted.state == epb.VOTING_STATE_DECIDED and voted.method == epb.VOTE_METHOD_WEIGHTED
    assert voted.subtask == f"{name}/subtasks/implement"
    assert voted.winner == f"{voted.name}/solutions/implement-alt-1"
    assert [s.subtask.rsplit("/", 1)[1] for s in voted.solutions] == ["implement-alt-1", "implement", "implement-alt-2"]
    assert [s.rank for s in voted.solutions] == [1, 2, 3]
    assert [s.selected for s in voted.solutions] == [True, False, False]
    scores = [s.score for s in voted.solutions]
    assert scores == sorted(scores, reverse=True) and scores[0] > scores[1] > scores[2]
    assert voted.solutions[0].diff.unified_diff == BEST

    reads = rvpb_grpc.ReviewServiceStub(channels["evaluator"])
    winner = voted.solutions[0].subtask
    again = await reads.GetVotingRound(rvpb.GetVotingRoundRequest(name=voted.name), metadata=admin, timeout=10)
    assert again.voting_round == voted
    page = await reads.ListSolutions(
        rvpb.ListSolutionsRequest(parent=voted.name, page_size=2), metadata=admin, timeout=10
    )
    assert [s.rank for s in page.solutions] == [1, 2] and page.next_page_token
    rest = await reads.ListSolutions(
        rvpb.ListSolutionsRequest(parent=voted.name, page_size=2, page_token=page.next_page_token),
        metadata=admin, timeout=10,
    )  # fmt: skip
    assert [s.rank for s in rest.solutions] == [3]
    chosen = await reads.ListSolutions(
        rvpb.ListSolutionsRequest(parent="votingRounds/-", filter=f'selected = true AND subtask = "{winner}"'),
        metadata=admin, timeout=10,
    )  # fmt: skip
    assert [s.name for s in chosen.solutions] == [voted.winner]


async def test_a_tie_waits_for_a_person_whose_choice_continues(
    stack: Stack, channels: dict[str, grpc.aio.Channel], admin: Metadata, agents: list[ScriptedAgent],
    operator_token: str,
) -> None:  # fmt: skip
    diffs = {"implement": BEST, "implement-alt-1": TWIN, "implement-alt-2": WORST}
    agent = await start_agent(stack, channels, admin, agents, by_key(diffs), [CLAUDE, SHELL])
    name = (await create(channels, admin, epb.VotingPolicy(solutions=3, method=epb.VOTE_METHOD_MAJORITY))).task.name
    stub = cpb_grpc.CheckpointServiceStub(channels["evaluator"])

    async def tied() -> list[epb.Checkpoint]:
        reply = await stub.ListCheckpoints(
            cpb.ListCheckpointsRequest(filter=f'state = OPEN AND task = "{name}"'), metadata=admin, timeout=10
        )
        return list(reply.checkpoints)

    await eventually(tied, 30, "the tie's checkpoint")
    (checkpoint,) = await tied()
    assert checkpoint.trigger == epb.CHECKPOINT_TRIGGER_ESCALATION and checkpoint.voting_round
    assert checkpoint.subtasks == [f"{name}/subtasks/implement"]
    detail = await stub.GetCheckpoint(cpb.GetCheckpointRequest(name=checkpoint.name), metadata=admin, timeout=10)
    assert detail.voting_round.name == checkpoint.voting_round
    assert (
        detail.voting_round.state == epb.VOTING_STATE_TIED
        and "tie between A and B" in detail.voting_round.decision_reason
    )

    await reaches(channels, admin, name, spb.TASK_STATE_WAITING_CHECKPOINT, 10, "the task to wait at the checkpoint")

    # A solution of another round, a name that is no solution of this one, not a solution name: each refused,
    # naming the field, and nothing changed.
    for bad in ("votingRounds/nope/solutions/implement", f"{checkpoint.voting_round}/solutions/nope", "implement"):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.DecideCheckpoint(
                cpb.DecideCheckpointRequest(name=checkpoint.name, decision=epb.CHECKPOINT_DECISION_APPROVE,
                                            selected_solution=bad),
                metadata=bearer(operator_token), timeout=10,
            )  # fmt: skip
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        status = details_from_trailers(refused.value.trailing_metadata())
        assert status is not None and "selected_solution" in str(status.details[0].value)
    still = await stub.GetCheckpoint(cpb.GetCheckpointRequest(name=checkpoint.name), metadata=admin, timeout=10)
    assert still.checkpoint.state == epb.CHECKPOINT_STATE_OPEN and still.voting_round == detail.voting_round
    assert (await subtask_states(channels, admin, name))["implement-alt-2"] == spb.SUBTASK_STATE_EVALUATING

    chosen = f"{checkpoint.voting_round}/solutions/implement-alt-1"
    decided = await stub.DecideCheckpoint(
        cpb.DecideCheckpointRequest(name=checkpoint.name, decision=epb.CHECKPOINT_DECISION_APPROVE,
                                    selected_solution=chosen, request_id=uuid.uuid4().hex),
        metadata=bearer(operator_token), timeout=10,
    )  # fmt: skip
    assert decided.checkpoint.decision.selected_solution == chosen

    await reaches(channels, admin, name, spb.TASK_STATE_SUCCEEDED, 30, "the task to go on with the person's choice")
    assert await subtask_states(channels, admin, name) == {
        "implement": spb.SUBTASK_STATE_SUCCEEDED,
        "implement-alt-1": spb.SUBTASK_STATE_SUCCEEDED,
        "implement-alt-2": spb.SUBTASK_STATE_NOT_SELECTED,
        "announce": spb.SUBTASK_STATE_SUCCEEDED,
    }
    assert dependency_diff(agent, "announce") == TWIN, "the person's choice, not the first solution, continues"
    (voted,) = await rounds(channels, admin, name)
    assert voted.state == epb.VOTING_STATE_OVERRIDDEN and voted.winner == chosen
    assert voted.checkpoint == checkpoint.name


async def test_two_reviewers_rankings_pick_the_winner_over_the_better_score(
    stack: Stack, channels: dict[str, grpc.aio.Channel], admin: Metadata, agents: list[ScriptedAgent]
) -> None:
    diffs = {"implement": BEST, "implement-alt-1": MIDDLE}
    behaviour = by_key(diffs, ranking=["B", "A"])
    await start_agent(stack, channels, admin, agents, behaviour, [CLAUDE, SHELL])
    await start_agent(stack, channels, admin, agents, behaviour, [GEMINI])
    voting = epb.VotingPolicy(solutions=2, reviewers=2, method=epb.VOTE_METHOD_MAJORITY)
    name = (await create(channels, admin, voting)).task.name

    await reaches(channels, admin, name, spb.TASK_STATE_SUCCEEDED, 45, "the ranked task to succeed")
    (voted,) = await rounds(channels, admin, name)
    assert voted.state == epb.VOTING_STATE_DECIDED
    assert voted.winner == f"{voted.name}/solutions/implement-alt-1", "both reviewers put B first"
    winner, loser = voted.solutions
    assert winner.score < loser.score, "the votes outweigh the better static score"
    assert [v.rank for v in winner.votes] == [1, 1] and len({v.review for v in winner.votes}) == 2
    states = await subtask_states(channels, admin, name)
    assert states["implement"] == states["implement-alt-1"] == spb.SUBTASK_STATE_SUCCEEDED
    assert states["implement-review-1-1"] == states["implement-review-1-2"] == spb.SUBTASK_STATE_SUCCEEDED


async def test_when_every_solution_fails_a_person_is_asked_and_approving_accepts_the_failure(
    stack: Stack, channels: dict[str, grpc.aio.Channel], admin: Metadata, agents: list[ScriptedAgent],
    operator_token: str,
) -> None:  # fmt: skip
    def failing(assignment: apb.Assignment) -> apb.Result:
        return apb.Result(lease=assignment.lease, outcome=work_pb2.OUTCOME_FAILED, error_message="tool crashed")

    await start_agent(stack, channels, admin, agents, failing, [CLAUDE, SHELL])
    graph = tpb.SubtaskGraph(
        subtasks=[spb.SubtaskSpec(key="implement", type=work_pb2.SUBTASK_TYPE_CODE_GENERATION,
                                  preferred_tool=machine_pb2.ToolChoice(kind=CLAUDE))]
    )  # fmt: skip
    task = spb.Task(description="Add an adder", max_attempts=1, policy=epb.Policy(voting=epb.VotingPolicy(solutions=2)))
    name = (
        await tpb_grpc.TaskServiceStub(channels["scheduler"]).CreateTask(
            tpb.CreateTaskRequest(task=task, graph=graph), metadata=admin, timeout=10
        )
    ).task.name
    stub = cpb_grpc.CheckpointServiceStub(channels["evaluator"])

    async def asked() -> list[epb.Checkpoint]:
        reply = await stub.ListCheckpoints(
            cpb.ListCheckpointsRequest(filter=f'state = OPEN AND task = "{name}"'), metadata=admin, timeout=10
        )
        return list(reply.checkpoints)

    await eventually(asked, 30, "the checkpoint for a round without a usable solution")
    (checkpoint,) = await asked()
    assert "no solution is usable" in checkpoint.reason
    held = {"implement": spb.SUBTASK_STATE_WAITING_CHECKPOINT, "implement-alt-1": spb.SUBTASK_STATE_EVALUATING}

    async def paused() -> bool:  # the checkpoint opens before its pause verdict reaches the scheduler
        return await subtask_states(channels, admin, name) == held

    await eventually(paused, 15, "the pause verdict of the round's checkpoint")
    assert await subtask_states(channels, admin, name) == held, (
        "failed solutions are held: they do not fail the task by themselves"
    )
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.DecideCheckpoint(
            cpb.DecideCheckpointRequest(name=checkpoint.name, decision=epb.CHECKPOINT_DECISION_APPROVE,
                                        selected_solution=f"{checkpoint.voting_round}/solutions/implement-alt-1"),
            metadata=bearer(operator_token), timeout=10,
        )  # fmt: skip
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, "a failed solution cannot be chosen"
    await stub.DecideCheckpoint(
        cpb.DecideCheckpointRequest(name=checkpoint.name, decision=epb.CHECKPOINT_DECISION_APPROVE),
        metadata=bearer(operator_token), timeout=10,
    )  # fmt: skip

    await reaches(channels, admin, name, spb.TASK_STATE_FAILED, 30, "the accepted failure to fail the task")
    assert await subtask_states(channels, admin, name) == {
        "implement": spb.SUBTASK_STATE_FAILED,
        "implement-alt-1": spb.SUBTASK_STATE_NOT_SELECTED,
    }


@pytest.mark.slow
async def test_a_decided_vote_survives_kill_9_of_the_evaluator_and_applies_exactly_once(
    stack: Stack, channels: dict[str, grpc.aio.Channel], admin: Metadata, agents: list[ScriptedAgent]
) -> None:
    await _restart_evaluator(stack, "after_delivery")
    try:
        diffs = {"implement": MIDDLE, "implement-alt-1": BEST}
        agent = await start_agent(stack, channels, admin, agents, by_key(diffs), [CLAUDE, SHELL])
        name = (await create(channels, admin, epb.VotingPolicy(solutions=2))).task.name
        task_id = name.removeprefix("tasks/")

        def applied() -> list[tuple[object, ...]]:
            return _query(stack, "SELECT disposition FROM scheduler.applied_verdicts WHERE task_id = %s", task_id)

        # SelectSolution and Accept went out in one batch; the relay is parked before removing them.
        await eventually(lambda: len(applied()) == 2, 30, "the scheduler to apply the vote's verdicts")
    finally:
        await _restart_evaluator(stack)  # kill -9 at the held point, then start normally: the batch goes again

    await reaches(channels, admin, name, spb.TASK_STATE_SUCCEEDED, 30, "the task to finish after the restart")
    await eventually(
        lambda: not _query(stack, "SELECT 1 FROM evaluator.outbox WHERE task_id = %s", task_id), 10, "the outbox"
    )
    assert applied() == [(1,), (1,)], "SelectSolution then Accept, each applied once (the repeat was DUPLICATE)"
    copies = _query(
        stack, "SELECT attempt FROM scheduler.results WHERE task_id = %s AND key = 'implement' ORDER BY 1", task_id
    )
    assert copies == [(1,), (2,)], "its own result, and the winner's copied once into the next attempt"
    assert dependency_diff(agent, "announce") == BEST


async def test_a_rollback_past_a_vote_lets_the_solutions_vote_again_in_a_new_round(
    stack: Stack, channels: dict[str, grpc.aio.Channel], admin: Metadata, agents: list[ScriptedAgent],
    operator_token: str,
) -> None:  # fmt: skip
    runs = [{"implement": BEST, "implement-alt-1": TWIN}, {"implement": WORST, "implement-alt-1": BEST}]
    seen: dict[str, int] = {}

    def behaviour(assignment: apb.Assignment) -> apb.Result:
        seen[assignment.key] = seen.get(assignment.key, 0) + 1
        return by_key(runs[min(seen[assignment.key], 2) - 1])(assignment)

    agent = await start_agent(stack, channels, admin, agents, behaviour, [CLAUDE, SHELL])
    name = (await create(channels, admin, epb.VotingPolicy(solutions=2))).task.name
    stub = cpb_grpc.CheckpointServiceStub(channels["evaluator"])

    async def tied() -> list[epb.Checkpoint]:
        reply = await stub.ListCheckpoints(
            cpb.ListCheckpointsRequest(filter=f'state = OPEN AND task = "{name}"'), metadata=admin, timeout=10
        )
        return list(reply.checkpoints)

    await eventually(tied, 30, "the tie's checkpoint")
    (checkpoint,) = await tied()
    # The evaluator opens the checkpoint before the scheduler has applied its pause: roll back once it holds.
    await reaches(channels, admin, name, spb.TASK_STATE_WAITING_CHECKPOINT, 30, "the task to pause at the tie")
    preview = await stub.PreviewRollback(cpb.PreviewRollbackRequest(name=checkpoint.name), metadata=admin, timeout=15)
    assert set(preview.effect.reset_subtasks) == {f"{name}/subtasks/implement", f"{name}/subtasks/implement-alt-1"}
    await stub.RollbackToCheckpoint(
        cpb.RollbackToCheckpointRequest(name=checkpoint.name, etag=preview.etag, request_id=uuid.uuid4().hex),
        metadata=bearer(operator_token), timeout=15,
    )  # fmt: skip

    await reaches(
        channels, admin, name, spb.TASK_STATE_SUCCEEDED, 30, "the rerun's vote to decide and the task to finish"
    )
    first, second = await rounds(channels, admin, name)
    assert first.state == epb.VOTING_STATE_TIED, "the old round stays as history"
    assert second.state == epb.VOTING_STATE_DECIDED and second.winner == f"{second.name}/solutions/implement-alt-1"
    assert dependency_diff(agent, "announce") == BEST
