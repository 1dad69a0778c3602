"""Voting in the scheduler: competing solutions in the DAG, and applying the evaluator's pick.

- At CreateTask (:func:`expand`), the task's own ``policy.voting`` decides which subtasks vote: with
  ``solutions`` N ≥ 2, each subtask of a voted type (``subtask_types``, empty = CODE_GENERATION) gets N − 1
  competitors ``<key>-alt-<i>`` with the same spec, dependencies and priority and no dependents. Each competitor
  and the logical subtask itself carry ``solution_of`` = the logical key; the logical subtask is solution 1 and
  carries the winner's result onward. The policy is read from the task only: the DAG is fixed at creation, before
  the evaluator has answered, so a ``voting`` setting in ``policies/default`` does not add competitors.
- ``prefer_distinct_tools`` spreads the competitors' preferred tools over the AI tool kinds, starting after the
  logical subtask's own (or CLAUDE_CODE when it names none). A preferred AI tool is a preference, not a
  constraint (allocation.tool_for), so an agent without it still takes the work; SHELL and TEST specs keep their
  tool. Distinct workers are not enforced.
- A solution is always judged: its result, success or failure for good, holds it EVALUATING and goes to the
  evaluator (engine.py), so a failed solution never fails the task.
- SelectSolution (:func:`select_solution`): the losers become NOT_SELECTED (counted excused, so they do not
  decide the task's outcome); when an alternative won, it SUCCEEDS and its result is copied into a new attempt
  (attempt + 1) of the logical subtask, so dependents receive the winning change through store.latest_results;
  the logical subtask stays held for the verdict that follows (addressed to that new attempt).
"""

from __future__ import annotations

import re
import uuid
from typing import Any

from maw.common.v1 import work_pb2
from maw.evaluator.v1 import resources_pb2 as epb
from maw.scheduler.v1 import resources_pb2 as spb
from sqlalchemy import text

from services.runtime import invalid_argument

from . import allocation, store
from .names import subtask_name, try_parse_subtask
from .reviews import MAX_REVIEWERS
from .states import SubtaskState
from .verdict_context import REJECTED, STALE, Outcome, VerdictContext

S = SubtaskState
MAX_SOLUTIONS = 10
AI_TOOLS = tuple(sorted(allocation.AI_TOOLS))  # in ToolKind order: CLAUDE_CODE, GEMINI_CLI, CODEX_CLI, OLLAMA
_DEFAULT_TYPES = frozenset({work_pb2.SUBTASK_TYPE_CODE_GENERATION})
_ALT = re.compile(r"-alt-(\d+)$")


def policy_problems(voting: epb.VotingPolicy, prefix: str = "task.policy.voting") -> list[tuple[str, str]]:
    """Field violations of a task's voting settings."""
    found = []
    if not 0 <= voting.solutions <= MAX_SOLUTIONS:
        found.append((f"{prefix}.solutions", f"must be 0-{MAX_SOLUTIONS} (0 or 1: no voting)"))
    if not 0 <= voting.reviewers <= MAX_REVIEWERS:
        found.append((f"{prefix}.reviewers", f"must be 0-{MAX_REVIEWERS}"))
    if voting.method not in epb.VoteMethod.values():
        found.append((f"{prefix}.method", f"unknown vote method {voting.method}"))
    for i, kind in enumerate(voting.subtask_types):
        if kind not in work_pb2.SubtaskType.values() or kind == work_pb2.SUBTASK_TYPE_UNSPECIFIED:
            found.append((f"{prefix}.subtask_types[{i}]", f"unknown subtask type {kind}"))
    return found


def alt_key(key: str, i: int) -> str:
    """The key of the ``i``-th competitor (1-based) of ``key``, within the 63-character key limit."""
    suffix = f"-alt-{i}"
    return key[: 63 - len(suffix)] + suffix


def solution_index(key: str, logical: str) -> int:
    """0 for the logical subtask, i for its ``i``-th competitor."""
    if key == logical:
        return 0
    match = _ALT.search(key)
    return int(match.group(1)) if match else 0


def _tools(first: int, count: int) -> list[int]:
    start = AI_TOOLS.index(first) if first in AI_TOOLS else 0
    return [AI_TOOLS[(start + i) % len(AI_TOOLS)] for i in range(count)]


def expand(task: spb.Task, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The subtask rows with every voted subtask's competitors inserted after it (INVALID_ARGUMENT if invalid).

    ``rows`` are CreateTask's subtask rows (store.insert_task), in plan order; every returned row has
    ``solution_of``. Ordinals are renumbered in the new order.
    """
    voting = task.policy.voting
    problems = policy_problems(voting)
    if problems:
        raise invalid_argument(problems)
    for row in rows:
        row["solution_of"] = ""
    if voting.solutions < 2:
        return rows
    types = frozenset(voting.subtask_types) or _DEFAULT_TYPES
    by_key = {r["key"]: r for r in rows}
    out: list[dict[str, Any]] = []
    for row in rows:
        out.append(row)
        spec = spb.SubtaskSpec.FromString(row["body"])
        if spec.type not in types:
            continue
        row["solution_of"] = row["key"]
        kinds = _tools(spec.preferred_tool.kind, voting.solutions)
        for i in range(1, voting.solutions):
            key = alt_key(row["key"], i)
            if key in by_key:
                raise invalid_argument(
                    [("task.policy.voting", f"competitor key {key!r} of {row['key']!r} is already a subtask key")]
                )
            alt = spb.SubtaskSpec()
            alt.CopyFrom(spec)
            alt.key = key
            alt.display_name = f"{spec.display_name or row['key']} (solution {i + 1})"
            if voting.prefer_distinct_tools and spec.preferred_tool.kind in (0, *AI_TOOLS):
                alt.ClearField("preferred_tool")  # a model name belongs to the tool it replaces
                alt.preferred_tool.kind = kinds[i]  # type: ignore[assignment]
            copy = dict(row, key=key, body=alt.SerializeToString(), dependents=[], solution_of=row["key"])
            copy["tool_kind"] = int(alt.preferred_tool.kind)
            for dep in row["dependencies"]:
                by_key[dep]["dependents"] = [*by_key[dep]["dependents"], key]
            by_key[key] = copy
            out.append(copy)
    for ordinal, row in enumerate(out):
        row["ordinal"] = ordinal
    return out


async def select_solution(ap: VerdictContext) -> None:
    """Apply SelectSolution: losers NOT_SELECTED, a winning alternative SUCCEEDS and lends the logical its result."""

    select = ap.v.select_solution
    logical = await ap.subtask()  # held, at the verdict's attempt
    if logical.solution_of != logical.key:
        raise Outcome(STALE, f"{ap.v.subtask} is not a voted subtask")
    pairs = []
    for name in [select.winner, *select.not_selected]:
        pair = try_parse_subtask(name)
        if pair is None or pair[0] != ap.task_id:
            raise Outcome(STALE, f"{name!r} is not a subtask of {ap.v.task}")
        pairs.append(pair)
    rows = await store.lock_subtasks(ap.conn, pairs)
    for pair in pairs:
        row = rows.get(pair)
        if row is None or row.solution_of != logical.key:
            raise Outcome(STALE, f"{subtask_name(*pair)} is not a solution of {ap.v.subtask}")
    winner = rows[pairs[0]]
    round_name = select.voting_round
    losers = []
    for pair in pairs[1:]:
        row = rows[pair]
        if row.key == logical.key or row.state == S.NOT_SELECTED:
            continue  # the logical subtask carries the winner's result instead; a repeat changes nothing
        ap.move(row, S.NOT_SELECTED, f"not selected by {round_name}")
        losers.append(row.key)
    if losers:
        await ap.conn.execute(
            text(
                "UPDATE subtasks SET state = :s, end_time = now(), update_time = now()"
                " WHERE task_id = :t AND key = ANY(:k)"
            ),
            {"s": int(S.NOT_SELECTED), "t": ap.task_id, "k": losers},
        )
    succeeded = 0
    if winner.key != logical.key:
        await ap.judged(winner)
        ap.move(winner, S.SUCCEEDED, f"selected by {round_name}")
        await store.set_subtask_states(ap.conn, [{"task_id": ap.task_id, "key": winner.key,
                                                  "state": int(S.SUCCEEDED), "checkpoint": ""}])  # fmt: skip
        await ap.conn.execute(
            text("UPDATE subtasks SET end_time = now() WHERE task_id = :t AND key = :k"),
            {"t": ap.task_id, "k": winner.key},
        )
        succeeded = 1
        await _adopt(ap, logical, winner)
    await ap.settle({"succeeded": succeeded, "excused": len(losers)})


async def _adopt(ap: VerdictContext, logical: store.SubtaskRow, winner: store.SubtaskRow) -> None:
    """The winner's result becomes the logical subtask's next attempt (so dependents receive it)."""

    found = (
        await ap.conn.execute(
            text(
                "SELECT worker, outcome, duration_ms, body FROM results"
                " WHERE task_id = :t AND key = :k AND attempt = :a"
            ),
            {"t": ap.task_id, "k": winner.key, "a": winner.attempt},
        )
    ).first()
    if found is None:
        raise Outcome(REJECTED, f"{subtask_name(ap.task_id, winner.key)} has no result to select")
    attempt = logical.attempt + 1
    body = spb.SubtaskResult.FromString(found[3])
    body.result_id = uuid.uuid4().hex
    body.attempt = attempt
    await ap.conn.execute(
        text(
            "UPDATE subtasks SET attempt = :a, worker = :w, tool = :tool, update_time = now()"
            " WHERE task_id = :t AND key = :k"
        ),
        {"a": attempt, "w": found[0], "tool": winner.tool, "t": ap.task_id, "k": logical.key},
    )
    await store.insert_results(ap.conn, [{
        "task_id": ap.task_id, "key": logical.key, "attempt": attempt, "result_id": body.result_id,
        "worker": found[0], "outcome": found[1], "duration_ms": found[2], "body": body.SerializeToString(),
    }])  # fmt: skip
    logical.attempt = attempt


__all__ = ["alt_key", "expand", "policy_problems", "select_solution", "solution_index"]
