"""Voting rounds in the judgement loop: collect competing solutions, count the vote, let the best one continue."""

from __future__ import annotations

import re
import uuid
from collections.abc import Sequence

from maw.evaluator.v1 import checkpoint_service_pb2 as cpb
from maw.evaluator.v1 import evaluation_intake_service_pb2 as ipb
from maw.evaluator.v1 import resources_pb2 as epb
from maw.scheduler.v1 import verdict_service_pb2 as vpb
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from services.runtime import invalid_argument

from . import policies, store, voting_store
from .judgement import Decision, Trigger, Verdict, decide, with_frequency
from .scoring import Scorecard
from .tally import Entry, Method, tally
from .verdict_context import (
    effective_policy,
    evaluation_message,
    failed,
    new_verdict,
    now_ts,
    open_or_join_checkpoint,
    progress_at,
    root_of,
    task_id_of,
    verdicts_for,
)
from .voting_rules import (
    COLLECTING,
    DECIDED,
    LABELS,
    OVERRIDDEN,
    TIED,
    VOTING,
    card_of,
    expected_solutions,
    key_of,
    method_of,
    ordinal_of,
    ranking_instructions,
)

_SOLUTION = re.compile(r"^votingRounds/([A-Za-z0-9_-]{1,128})/solutions/([a-z0-9_-]{1,63})$")


# -- collecting ----------------------------------------------------------------------------------------------


async def commit_solution(db: AsyncEngine, result: ipb.SubmittedResult, evaluation_id: str, card: Scorecard) -> bool:
    """Record one solution (and count the vote when it is the last); False when its round is already decided,
    so the caller judges the result as ordinary work (e.g. a logical subtask retried by an operator)."""
    task_id = task_id_of(result.task)
    async with db.begin() as conn:
        task = await store.get_task(conn, task_id, lock=True)
        found = await voting_store.round_of(conn, task_id, result.solution_of, lock=True)
        if found is not None and found.state != COLLECTING:
            return False
        if not await store.claim_result(conn, result.result_id):
            return True  # judged meanwhile by another replica
        policy = await effective_policy(conn, task_id)
        if found is None:
            registration = ipb.RegisterTaskRequest.FromString(task.body) if task else None
            round_id = uuid.uuid4().hex[:16]
            body = epb.VotingRound(
                name=f"votingRounds/{round_id}", task=result.task, subtask=result.solution_of,
                method=int(method_of(policy)), state=COLLECTING, create_time=now_ts(),  # type: ignore[arg-type]
            )  # fmt: skip
            expected = expected_solutions(registration, key_of(result.solution_of), max(2, policy.voting.solutions))
            await voting_store.insert_round(
                conn, round_id, task_id, result.solution_of, COLLECTING, body.method, expected, body.SerializeToString()
            )
            found = await voting_store.round_of(conn, task_id, result.solution_of, lock=True)
            assert found is not None
        round_ = epb.VotingRound.FromString(found.body)
        usable = not failed(result)
        waiting = Decision(Verdict.ACCEPT, f"solution of {round_.name}; waiting for the vote")
        evaluation = evaluation_message(evaluation_id, result, card, waiting, policy, epb.EVALUATION_STATE_RUNNING)
        evaluation.verdict = epb.VERDICT_UNSPECIFIED
        evaluation.verdict_reason = waiting.reason if usable else f"{waiting.reason}; this solution failed"
        evaluation.ClearField("complete_time")
        await store.insert_evaluation(
            conn, evaluation_id, task_id, result.subtask, root_of(result), evaluation.verdict,
            evaluation.SerializeToString(),
        )  # fmt: skip
        key = result.subtask_key or key_of(result.subtask)
        solution = epb.Solution(
            name=f"{round_.name}/solutions/{key}", subtask=result.subtask, attempt=result.attempt,
            worker=result.worker, tool=result.tool, evaluation=evaluation.name,
            score=card.overall or 0.0, summary=result.summary[:4000], diff=result.diff,
        )  # fmt: skip
        await voting_store.put_solution(
            conn, found.id, key, ordinal_of(key, key_of(result.solution_of)), result.subtask, result.worker,
            result.result_id, evaluation_id, usable, card.overall if usable else None, found.create_time,
            solution.SerializeToString(),
        )  # fmt: skip
        await store.mark_done(conn, result.result_id)
        verdicts = await _advance(conn, found, policy)
        await store.enqueue(conn, store.VERDICTS, [(task_id, v.SerializeToString()) for v in verdicts])
    return True


async def _advance(conn: AsyncConnection, found: voting_store.Round, policy: epb.Policy) -> list[vpb.Verdict]:
    """When every solution is in: ask reviewers to rank them, or count at once."""
    solutions = await voting_store.solutions_of(conn, [found.id])
    if len(solutions) < found.expected:
        return []
    round_ = epb.VotingRound.FromString(found.body)
    usable = [s for s in solutions if s.usable]
    for label, s in zip(LABELS, usable, strict=False):
        s.label = label
        await voting_store.update_solution(conn, found.id, s.id, label, 0, False, s.body)
    k = min(policy.voting.reviewers, policies.MAX_REVIEWERS)
    if k <= 0 or len(usable) < 2:
        return await _count(conn, found, solutions, [], policy)
    logical = _logical(solutions)
    task = await store.get_task(conn, found.task_id)
    description = ipb.RegisterTaskRequest.FromString(task.body).description if task else ""
    verdict = new_verdict(
        round_.task, logical.subtask, _attempt(logical), logical.result_id, f"evaluations/{logical.evaluation_id}"
    )
    ask = verdict.request_reviews
    ask.reviewers = k
    ask.require_different_tool = policy.peer_review.require_different_tool
    ask.compare_subtasks.extend(s.subtask for s in usable)
    ask.voting_round = round_.name
    ask.instructions = ranking_instructions(round_, usable, description)
    round_.state = VOTING
    await voting_store.update_round(conn, found.id, VOTING, round_.SerializeToString(), reviewers=k)
    return [verdict]


def _logical(solutions: Sequence[voting_store.SolutionRow]) -> voting_store.SolutionRow:
    return next((s for s in solutions if s.ordinal == 0), solutions[0])


def _attempt(solution: voting_store.SolutionRow) -> int:
    return epb.Solution.FromString(solution.body).attempt


# -- votes ----------------------------------------------------------------------------------------------------


async def review_arrived(conn: AsyncConnection, review: epb.Review) -> list[vpb.Verdict]:
    """A review of a logical subtask whose round is VOTING: count its ranking as one ballot (a MALFORMED or FAILED
    review counts as an empty ballot); when all K are in, count the vote. Returns the verdicts to send.

    Runs in the caller's transaction, which holds the task's lock (peer_review takes each review that way).
    """
    task_id = task_id_of(review.task)
    found = await voting_store.round_of(conn, task_id, review.subtask, lock=True)
    if found is None or found.state != VOTING:
        return []
    solutions = await voting_store.solutions_of(conn, [found.id])
    names = {s.label: s.label for s in solutions if s.label}
    for s in solutions:
        if s.label:
            names[epb.Solution.FromString(s.body).name] = s.label
            names[s.subtask] = s.label
    ranking = [names.get(x.strip().upper() if len(x.strip()) == 1 else x.strip(), "?") for x in review.ranking]
    if review.state != epb.REVIEW_STATE_VALID:
        ranking = []
    await voting_store.add_ballot(conn, found.id, review.name, review.reviewer, ranking)
    ballots = await voting_store.ballots_of(conn, found.id)
    if len(ballots) < found.reviewers:
        return []
    policy = await effective_policy(conn, task_id)
    return await _count(conn, found, solutions, ballots, policy)


async def _count(
    conn: AsyncConnection,
    found: voting_store.Round,
    solutions: list[voting_store.SolutionRow],
    ballots: list[voting_store.Ballot],
    policy: epb.Policy,
) -> list[vpb.Verdict]:
    """Count the vote and record the ranking: DECIDED (select + decide the winner) or TIED (a checkpoint)."""
    round_ = epb.VotingRound.FromString(found.body)
    method = Method(found.method) if found.method in {int(m) for m in Method} else Method.WEIGHTED
    entries = [Entry(s.label or s.id, s.score, s.usable) for s in solutions]
    outcome = tally(entries, [b.ranking for b in ballots], method)
    placed = {p.label: p for p in outcome.placed}
    by_label = {s.label or s.id: s for s in solutions}
    winner = by_label[outcome.winner] if outcome.winner is not None else None
    for label, s in by_label.items():
        p = placed[label]
        body = epb.Solution.FromString(s.body)
        del body.votes[:]
        n = sum(1 for x in solutions if x.usable)
        for i, rank in sorted(p.votes.items()):
            points = float(n - rank) if method == Method.WEIGHTED else float(rank == 1)
            body.votes.append(
                epb.Vote(review=ballots[i].review, reviewer=ballots[i].reviewer, rank=rank, points=points)
            )
        body.total_points, body.rank, body.selected = p.points, p.rank, s is winner
        s.body, s.rank, s.selected = body.SerializeToString(), p.rank, s is winner
        await voting_store.update_solution(conn, found.id, s.id, s.label, p.rank, s is winner, s.body)
    round_.decision_reason = outcome.reason
    logical = _logical(solutions)
    if winner is None:
        return await _tie(conn, found, round_, logical, outcome.reason)
    verdicts = await _select(conn, found, round_, solutions, winner, DECIDED, outcome.reason)
    return verdicts + await _decide_winner(conn, round_, logical, winner, policy)


async def _tie(
    conn: AsyncConnection,
    found: voting_store.Round,
    round_: epb.VotingRound,
    logical: voting_store.SolutionRow,
    reason: str,
) -> list[vpb.Verdict]:
    """A tie the rules cannot break: a person decides at an ESCALATION checkpoint that holds the logical subtask."""
    result = await _result(conn, logical.result_id)
    why = f"the vote on {key_of(round_.subtask)} tied: {reason}"
    cp, _ = await open_or_join_checkpoint(
        conn, round_.task, round_.subtask, int(Trigger.ESCALATION), why, progress_at(result)
    )
    if not cp.voting_round:
        cp.voting_round = round_.name
        await store.update_checkpoint(conn, cp.name.removeprefix("checkpoints/"), cp.state, cp.SerializeToString())
    round_.state, round_.checkpoint = TIED, cp.name
    await voting_store.update_round(conn, found.id, TIED, round_.SerializeToString())
    verdict = new_verdict(
        round_.task, round_.subtask, _attempt(logical), logical.result_id, f"evaluations/{logical.evaluation_id}"
    )
    verdict.pause.trigger = epb.CHECKPOINT_TRIGGER_ESCALATION
    verdict.pause.reason = why
    verdict.pause.subtasks.append(round_.subtask)
    verdict.pause.checkpoint = cp.name
    return [verdict]


async def _select(
    conn: AsyncConnection,
    found: voting_store.Round,
    round_: epb.VotingRound,
    solutions: Sequence[voting_store.SolutionRow],
    winner: voting_store.SolutionRow,
    state: int,
    reason: str,
) -> list[vpb.Verdict]:
    """Record the winner and tell the scheduler (SelectSolution on the logical subtask's current attempt)."""
    logical = _logical(solutions)
    chosen = epb.Solution.FromString(winner.body)
    round_.state, round_.winner, round_.decision_reason = state, chosen.name, reason  # type: ignore[assignment]
    round_.decide_time.CopyFrom(now_ts())
    await voting_store.update_round(conn, found.id, state, round_.SerializeToString())
    verdict = new_verdict(round_.task, round_.subtask, _attempt(logical), logical.result_id, chosen.evaluation)
    verdict.score = chosen.score
    verdict.select_solution.voting_round = round_.name
    verdict.select_solution.winner = winner.subtask
    verdict.select_solution.not_selected.extend(s.subtask for s in solutions if s is not winner)
    return [verdict]


async def _result(conn: AsyncConnection, result_id: str) -> ipb.SubmittedResult:
    body = await store.result_body(conn, result_id)
    return ipb.SubmittedResult.FromString(body) if body else ipb.SubmittedResult()


async def _as_logical(
    conn: AsyncConnection, round_: epb.VotingRound, logical: voting_store.SolutionRow, winner: voting_store.SolutionRow
) -> tuple[ipb.SubmittedResult, Scorecard]:
    """The winner's result as the logical subtask's next attempt (what the scheduler makes of it), and its card."""
    result = await _result(conn, winner.result_id)
    result.subtask, result.subtask_key = round_.subtask, key_of(round_.subtask)
    result.attempt = _attempt(logical) + (0 if winner is logical else 1)
    result.solution_of = ""
    body = await store.get_evaluation(conn, winner.evaluation_id)
    return result, card_of(epb.Evaluation.FromString(body) if body else epb.Evaluation())


async def _decide_winner(
    conn: AsyncConnection,
    round_: epb.VotingRound,
    logical: voting_store.SolutionRow,
    winner: voting_store.SolutionRow,
    policy: epb.Policy,
) -> list[vpb.Verdict]:
    """The usual decision on the winner's score, for the logical subtask (stored as its new evaluation)."""
    result, card = await _as_logical(conn, round_, logical, winner)
    rules = policies.rules_of(policy)
    decision = decide(card.overall, 0, rules)
    decision = with_frequency(decision, rules, result.task_subtasks_succeeded, result.task_subtasks_total)
    decision = Decision(decision.verdict, f"{decision.reason} ({key_of(winner.subtask)} won {round_.name})",
                        decision.trigger)  # fmt: skip
    evaluation_id = uuid.uuid4().hex[:20]
    evaluation = evaluation_message(evaluation_id, result, card, decision, policy)
    verdicts = verdicts_for(result, evaluation, card, decision)
    main = verdicts[0]
    if decision.verdict == Verdict.CORRECT:
        main.correct.correction_cycle = await store.bump_corrections(
            conn, round_.task.removeprefix("tasks/"), round_.subtask,
            [fb.SerializeToString() for fb in main.correct.feedback],
        )  # fmt: skip
    elif decision.verdict == Verdict.ESCALATE:
        cp, _ = await open_or_join_checkpoint(
            conn, round_.task, round_.subtask, int(decision.trigger or Trigger.ESCALATION), decision.reason,
            progress_at(result, decision, rules),
        )  # fmt: skip
        main.pause.checkpoint = cp.name
    await voting_store.insert_evaluation_now(
        conn, evaluation_id, round_.task.removeprefix("tasks/"), round_.subtask, int(decision.verdict),
        evaluation.SerializeToString(),
    )  # fmt: skip
    return verdicts


async def forget_rounds(conn: AsyncConnection, task_id: str, reset: Sequence[str]) -> None:
    """A rollback reset these subtasks (names): the rounds they are the logical subtask of become history, so
    the solutions that run again form a new round (rollback.py; the scheduler resets the competitors too)."""
    await voting_store.retire_rounds(conn, task_id, reset)


# -- people ---------------------------------------------------------------------------------------------------


async def decide_at_checkpoint(
    conn: AsyncConnection, cp: epb.Checkpoint, request: cpb.DecideCheckpointRequest, who: str
) -> list[vpb.Verdict]:
    """A person's decision on a checkpoint that holds tied rounds: the SelectSolution verdicts to send first.

    ``selected_solution`` must name a usable solution of ``cp.voting_round`` (INVALID_ARGUMENT otherwise,
    nothing changed): that round becomes OVERRIDDEN. Every other tied round the checkpoint holds, or that one
    without a selection, takes its best solution by score (DECIDED). For APPROVE and CORRECT the winner's result
    is stored as the logical subtask's new evaluation, so the checkpoint's per-subtask verdicts address it.
    """
    task_id = task_id_of(cp.task)
    chosen = request.selected_solution
    if chosen and not cp.voting_round:
        raise invalid_argument([("selected_solution", "this checkpoint has no voting round")])
    if request.decision == epb.CHECKPOINT_DECISION_REJECT:
        if chosen:
            raise invalid_argument([("selected_solution", "REJECT cancels the task; leave selected_solution empty")])
        return []
    tied = [r for r in await voting_store.rounds_of_task(conn, task_id, TIED) if r.subtask in cp.subtasks]
    target = cp.voting_round.removeprefix("votingRounds/")
    picked: str | None = None
    if chosen:
        match = _SOLUTION.match(chosen)
        if not match or match.group(1) != target:
            raise invalid_argument([("selected_solution", f"must be {cp.voting_round}/solutions/{{solution}}")])
        if target not in {r.id for r in tied}:
            raise invalid_argument([("selected_solution", f"{cp.voting_round} is not waiting for a choice")])
        picked = match.group(2)
    out: list[vpb.Verdict] = []
    policy = await effective_policy(conn, task_id)
    everything = await voting_store.solutions_of(conn, [r.id for r in tied])
    for found in tied:
        solutions = [s for s in everything if s.round_id == found.id]
        round_ = epb.VotingRound.FromString(found.body)
        if found.id == target and picked is not None:
            winner = next((s for s in solutions if s.id == picked), None)
            if winner is None:
                raise invalid_argument([("selected_solution", f"not a solution of {cp.voting_round}")])
            if not winner.usable:
                raise invalid_argument([("selected_solution", f"{picked} failed; it cannot continue")])
            state, reason = OVERRIDDEN, f"{who} chose {picked} at {cp.name}"
        else:
            usable = [s for s in solutions if s.usable]
            if not usable:
                # Every solution failed: like an ERROR checkpoint, APPROVE accepts the logical subtask's failure
                # and CORRECT sends it back with the person's words; the competitors are not selected.
                word = "corrected" if request.decision == epb.CHECKPOINT_DECISION_CORRECT else "accepted"
                reason = f"no solution was usable; the failure was {word} at {cp.name}"
                out += await _select(conn, found, round_, solutions, _logical(solutions), DECIDED, reason)
                continue
            winner = max(usable, key=lambda s: (s.score is not None, s.score or 0.0, -s.ordinal))
            state, reason = DECIDED, f"the best by score ({winner.id}) was approved at {cp.name}"
        for s in solutions:
            body = epb.Solution.FromString(s.body)
            body.selected = s is winner
            await voting_store.update_solution(conn, found.id, s.id, s.label, s.rank, s is winner,
                                               body.SerializeToString())  # fmt: skip
            s.body = body.SerializeToString()
        out += await _select(conn, found, round_, solutions, winner, state, reason)
        logical = _logical(solutions)
        result, card = await _as_logical(conn, round_, logical, winner)
        verdict = Verdict.CORRECT if request.decision == epb.CHECKPOINT_DECISION_CORRECT else Verdict.ACCEPT
        decision = Decision(verdict, reason)
        evaluation_id = uuid.uuid4().hex[:20]
        evaluation = evaluation_message(evaluation_id, result, card, decision, policy)
        await voting_store.insert_evaluation_now(
            conn, evaluation_id, task_id, round_.subtask, int(verdict), evaluation.SerializeToString()
        )
    return out


async def round_message(conn: AsyncConnection, name: str) -> epb.VotingRound | None:
    """A round with its solutions, best first once decided (solution order before)."""
    found = await voting_store.get_round(conn, name.removeprefix("votingRounds/"))
    if found is None:
        return None
    return (await messages(conn, [found]))[0]


async def messages(conn: AsyncConnection, rounds: Sequence[voting_store.Round]) -> list[epb.VotingRound]:
    """Rounds as served: each with its solutions, ranked best first (undecided ones after, in solution order)."""
    solutions = await voting_store.solutions_of(conn, [r.id for r in rounds])
    out = []
    for found in rounds:
        round_ = epb.VotingRound.FromString(found.body)
        mine = [s for s in solutions if s.round_id == found.id]
        mine.sort(key=lambda s: (s.rank == 0, s.rank, s.ordinal))
        round_.solutions.extend(epb.Solution.FromString(s.body) for s in mine)
        out.append(round_)
    return out


__all__ = [
    "COLLECTING",
    "DECIDED",
    "OVERRIDDEN",
    "TIED",
    "VOTING",
    "commit_solution",
    "decide_at_checkpoint",
    "forget_rounds",
    "messages",
    "review_arrived",
    "round_message",
]
