"""Voting in the scheduler's DAG: competitors at creation, and the NOT_SELECTED transition."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from maw.common.v1 import machine_pb2, work_pb2
from maw.evaluator.v1 import resources_pb2 as epb
from maw.scheduler.v1 import resources_pb2 as spb

from services.runtime.errors import MawError
from services.scheduler import states, voting

S = states.SubtaskState
CODE, DOCS = work_pb2.SUBTASK_TYPE_CODE_GENERATION, work_pb2.SUBTASK_TYPE_DOCUMENTATION


def row(key: str, kind: int, deps: list[str], dependents: list[str], tool: int = 0) -> dict[str, Any]:
    spec = spb.SubtaskSpec(key=key, type=kind, dependencies=deps)  # type: ignore[arg-type]
    spec.preferred_tool.kind = tool  # type: ignore[assignment]
    return {"task_id": "t", "key": key, "ordinal": 0, "body": spec.SerializeToString(), "state": 1 if deps else 2,
            "dependencies": deps, "dependents": dependents, "deps_remaining": len(deps), "priority": 7,
            "tool_kind": tool}  # fmt: skip


def plan() -> list[dict[str, Any]]:
    return [
        row("design", DOCS, [], ["implement"]),
        row("implement", CODE, ["design"], ["docs"], machine_pb2.TOOL_KIND_CLAUDE_CODE),
        row("docs", DOCS, ["implement"], []),
    ]


def task(**voting_fields: Any) -> spb.Task:
    return spb.Task(policy=epb.Policy(voting=epb.VotingPolicy(**voting_fields)))


def test_without_voting_the_plan_is_unchanged_and_nothing_competes() -> None:
    out = voting.expand(task(solutions=1), plan())
    assert [r["key"] for r in out] == ["design", "implement", "docs"]
    assert [r["solution_of"] for r in out] == ["", "", ""]


def test_a_voted_subtask_gets_competitors_with_its_dependencies_and_no_dependents() -> None:
    out = voting.expand(task(solutions=3), plan())
    assert [r["key"] for r in out] == ["design", "implement", "implement-alt-1", "implement-alt-2", "docs"]
    assert [r["ordinal"] for r in out] == [0, 1, 2, 3, 4]
    assert [r["solution_of"] for r in out] == ["", "implement", "implement", "implement", ""]
    by_key = {r["key"]: r for r in out}
    for alt in ("implement-alt-1", "implement-alt-2"):
        assert by_key[alt]["dependencies"] == ["design"] and by_key[alt]["deps_remaining"] == 1
        assert by_key[alt]["dependents"] == [] and by_key[alt]["priority"] == 7
        spec = spb.SubtaskSpec.FromString(by_key[alt]["body"])
        assert spec.key == alt and spec.type == CODE
        assert spec.preferred_tool.kind == machine_pb2.TOOL_KIND_CLAUDE_CODE, "same tool unless asked to spread"
    assert by_key["design"]["dependents"] == ["implement", "implement-alt-1", "implement-alt-2"], (
        "the dependency releases every competitor"
    )
    assert by_key["implement"]["dependents"] == ["docs"], "only the logical subtask has dependents"


def test_distinct_tools_spread_over_the_ai_tools_after_the_logical_subtasks_own() -> None:
    out = voting.expand(task(solutions=3, prefer_distinct_tools=True), plan())
    kinds = {r["key"]: spb.SubtaskSpec.FromString(r["body"]).preferred_tool.kind for r in out}
    assert kinds["implement"] == machine_pb2.TOOL_KIND_CLAUDE_CODE
    assert kinds["implement-alt-1"] == machine_pb2.TOOL_KIND_GEMINI_CLI
    assert kinds["implement-alt-2"] == machine_pb2.TOOL_KIND_CODEX_CLI
    assert {r["key"]: r["tool_kind"] for r in out}["implement-alt-2"] == machine_pb2.TOOL_KIND_CODEX_CLI


def test_the_voted_types_are_the_policys() -> None:
    out = voting.expand(task(solutions=2, subtask_types=[DOCS]), plan())
    assert [r["key"] for r in out] == ["design", "design-alt-1", "implement", "docs", "docs-alt-1"]


def test_long_keys_stay_within_the_key_limit() -> None:
    key = "k" * 63
    assert voting.alt_key(key, 2) == "k" * 57 + "-alt-2" and len(voting.alt_key(key, 2)) == 63
    assert voting.solution_index("k" * 57 + "-alt-2", key) == 2 and voting.solution_index(key, key) == 0


def test_bad_voting_settings_and_key_collisions_are_invalid_argument() -> None:
    with pytest.raises(MawError) as bad:
        voting.expand(task(solutions=11, reviewers=-1, method=7), plan())
    assert bad.value.code == grpc.StatusCode.INVALID_ARGUMENT
    fields = [f for f, _ in voting.policy_problems(epb.VotingPolicy(solutions=11, reviewers=-1, method=7))]  # type: ignore[arg-type]
    assert fields == ["task.policy.voting.solutions", "task.policy.voting.reviewers", "task.policy.voting.method"]
    taken = [*plan(), row("implement-alt-1", DOCS, [], [])]
    with pytest.raises(MawError):
        voting.expand(task(solutions=2), taken)


def test_only_a_solution_being_evaluated_can_be_not_selected_and_it_stays_so() -> None:
    states.check_subtask(S.EVALUATING, S.NOT_SELECTED)
    for old in (S.PENDING, S.READY, S.RUNNING, S.SUCCEEDED, S.FAILED, S.CORRECTING):
        with pytest.raises(states.TransitionError):
            states.check_subtask(old, S.NOT_SELECTED)
    assert S.NOT_SELECTED in states.TERMINAL_SUBTASK


def test_solutions_not_selected_do_not_decide_the_outcome() -> None:
    # implement + 2 competitors + docs: one competitor won (succeeded), one lost (excused).
    assert states.task_outcome(4, 3, 0, 0, excused=1) == states.TaskState.SUCCEEDED
    assert states.task_outcome(4, 2, 0, 0, excused=1) is None
