"""Peer review in the judgement loop: ask for reviews, take each review, combine them when all are in."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from maw.common.v1 import work_pb2
from maw.evaluator.v1 import evaluation_intake_service_pb2 as ipb
from maw.evaluator.v1 import resources_pb2 as epb
from maw.scheduler.v1 import verdict_service_pb2 as vpb
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from . import policies, review_store, store, voting, voting_store
from .judgement import Decision, Trigger, Verdict, with_frequency
from .reviews import FORMAT, ParsedReview, ReviewError, decide_reviewed, measures_of, parse_review
from .scorers import Dimension, Finding, Measure, Severity, registered
from .scoring import combine, run_scorers
from .verdict_context import (
    effective_policy,
    evaluation_message,
    failed,
    finding_message,
    instructions_of,
    new_verdict,
    now_ts,
    open_or_join_checkpoint,
    progress_at,
    root_of,
    task_id_of,
    verdicts_for,
    work_of,
)

_log = logging.getLogger("maw.evaluator.peer_review")

REVIEW = work_pb2.SUBTASK_TYPE_REVIEW
DEFAULT_TYPES = frozenset(
    {
        work_pb2.SUBTASK_TYPE_CODE_GENERATION,
        work_pb2.SUBTASK_TYPE_CODE_FIX,
        work_pb2.SUBTASK_TYPE_REFACTOR,
        work_pb2.SUBTASK_TYPE_TEST,
    }
)


def is_review(result: ipb.SubmittedResult) -> bool:
    """Whether ``result`` is a REVIEW subtask's output about another subtask (parsed, not scored)."""
    return result.subtask_type == REVIEW and bool(result.review_of)


def wants_review(result: ipb.SubmittedResult, policy: epb.Policy) -> bool:
    """Whether ``result`` waits for peer reviews under ``policy`` (voting solutions are judged elsewhere)."""
    peer = policy.peer_review
    types = set(peer.subtask_types) or DEFAULT_TYPES
    return (
        peer.reviewers > 0
        and result.outcome == work_pb2.OUTCOME_SUCCEEDED
        and result.subtask_type != REVIEW
        and result.subtask_type in types
        and not result.solution_of
    )


def handles(result: ipb.SubmittedResult, policy: epb.Policy) -> bool:
    """Whether peer review judges ``result`` (a REVIEW output, or a result that waits for reviews)."""
    return is_review(result) or wants_review(result, policy)


def instructions_for(result: ipb.SubmittedResult, task_description: str) -> str:
    """What a reviewer is asked, with the required output format (the scheduler adds the work and its diff)."""
    lines = [
        f"Review another agent's work on the subtask {result.display_name or result.subtask_key!r}"
        f" ({work_pb2.SubtaskType.Name(result.subtask_type).removeprefix('SUBTASK_TYPE_').lower()}).",
        "Do not change any file: read the change below and judge it.",
    ]
    if task_description:
        lines += ["", "The task:", task_description[:8000]]
    if result.summary:
        lines += ["", "The author's summary:", result.summary[:4000]]
    lines += ["", FORMAT]
    return "\n".join(lines)


async def judge(db: AsyncEngine, result: ipb.SubmittedResult, evaluation_id: str, policy: epb.Policy) -> None:
    """Judge one result that :func:`handles`: a REVIEW output, or a result to send for review."""
    if is_review(result):
        await _take_review(db, result, evaluation_id)
        return
    measures, broken = await asyncio.to_thread(run_scorers, work_of(result), registered(), list(policy.scorers))
    await _request_reviews(db, result, evaluation_id, measures, broken, policy)


async def _request_reviews(
    db: AsyncEngine,
    result: ipb.SubmittedResult,
    evaluation_id: str,
    measures: list[tuple[str, Measure]],
    broken: list[str],
    policy: epb.Policy,
) -> None:
    task_id = task_id_of(result.task)
    card = combine(measures, policies.weights_of(policy))
    async with db.begin() as conn:
        task = await store.get_task(conn, task_id, lock=True)
        if not await store.claim_result(conn, result.result_id):
            return  # judged meanwhile by another replica
        k = policy.peer_review.reviewers
        waiting = Decision(Verdict.ACCEPT, f"waiting for {k} peer review{'s' if k > 1 else ''}")
        evaluation = evaluation_message(evaluation_id, result, card, waiting, policy, epb.EVALUATION_STATE_RUNNING)
        evaluation.verdict = epb.VERDICT_UNSPECIFIED
        evaluation.ClearField("complete_time")
        await store.insert_evaluation(
            conn, evaluation_id, task_id, result.subtask, root_of(result), evaluation.verdict,
            evaluation.SerializeToString(),
        )  # fmt: skip
        await review_store.insert_wait(
            conn, evaluation_id, task_id, result.subtask, result.attempt, result.result_id, k,
            measures, broken,
        )  # fmt: skip
        description = ipb.RegisterTaskRequest.FromString(task.body).description if task else ""
        verdict = new_verdict(result.task, result.subtask, result.attempt, result.result_id, evaluation.name)
        verdict.request_reviews.reviewers = k
        verdict.request_reviews.require_different_tool = policy.peer_review.require_different_tool
        verdict.request_reviews.instructions = instructions_for(result, description)
        await store.enqueue(conn, store.VERDICTS, [(task_id, verdict.SerializeToString())])
        await store.mark_done(conn, result.result_id)
    _log.info("peer review requested", extra={"subtask": result.subtask, "reviewers": k})


def _review_of(
    result: ipb.SubmittedResult, review_id: str, labels: Sequence[str] = ()
) -> tuple[epb.Review, ParsedReview | None]:
    """The Review a REVIEW result makes (VALID, MALFORMED or FAILED), and its parsed form when VALID.

    ``labels`` are the solutions a voting reviewer ranks (its ranking must list each exactly once)."""
    review = epb.Review(
        name=f"reviews/{review_id}",
        task=result.task,
        subtask=result.review_of,
        attempt=result.review_of_attempt,
        review_subtask=result.subtask,
        reviewer=result.worker,
        reviewer_tool=result.tool,
        create_time=now_ts(),
    )
    if failed(result):
        outcome = work_pb2.Outcome.Name(result.outcome).removeprefix("OUTCOME_")
        detail = f": {result.error_message[:500]}" if result.error_message else ""
        review.state = epb.REVIEW_STATE_FAILED
        review.error = f"the review subtask failed ({outcome}){detail}"
        return review, None
    try:
        parsed = parse_review(result.output, result.output_truncated, labels, reviewer=review.name)
    except ReviewError as exc:
        review.state, review.error = epb.REVIEW_STATE_MALFORMED, str(exc)[:2000]
        return review, None
    review.state = epb.REVIEW_STATE_VALID
    review.scores.extend(
        epb.ReviewScore(dimension=int(d), score=s)  # type: ignore[arg-type]
        for d, s in sorted(parsed.scores.items())
    )
    review.overall_score = parsed.overall or 0.0
    if parsed.recommendation is not None:
        review.recommendation = int(parsed.recommendation)  # type: ignore[assignment]
    review.findings.extend(finding_message(f) for f in parsed.findings)
    review.suggestions.extend(parsed.suggestions)
    review.summary = parsed.summary
    review.ranking.extend(parsed.ranking)
    return review, parsed


def parsed_of(review: epb.Review) -> ParsedReview:
    """A stored VALID review back in its domain form."""
    findings = tuple(
        Finding(f.path, f.line, Severity(f.severity or Severity.MEDIUM), f.message, f.rule, f.scorer)
        for f in review.findings
    )
    recommendation = Verdict(review.recommendation) if review.recommendation else None
    return ParsedReview(
        scores={Dimension(s.dimension): s.score for s in review.scores},
        overall=review.overall_score,
        recommendation=recommendation,
        summary=review.summary,
        suggestions=tuple(review.suggestions),
        findings=findings,
        ranking=tuple(review.ranking),
    )


async def _take_review(db: AsyncEngine, result: ipb.SubmittedResult, review_id: str) -> None:
    task_id = task_id_of(result.task)
    async with db.begin() as conn:
        await store.get_task(conn, task_id, lock=True)
        if not await store.claim_result(conn, result.result_id):
            return
        wait = await review_store.wait_for(conn, task_id, result.review_of, result.review_of_attempt)
        labels = () if wait is not None else await _ranked_labels(conn, task_id, result.review_of)
        review, _ = _review_of(result, review_id, labels)
        fresh = await review_store.insert_review(
            conn, review_id, result.result_id, wait.evaluation_id if wait else "", task_id, review.subtask,
            review.attempt, review.review_subtask, review.reviewer, int(review.state), int(review.recommendation),
            review.SerializeToString(),
        )  # fmt: skip
        verdicts: list[vpb.Verdict] = []
        if fresh:
            answer = new_verdict(result.task, result.subtask, result.attempt, result.result_id, "")
            if review.state == epb.REVIEW_STATE_VALID:
                answer.accept.SetInParent()
            else:
                state = epb.ReviewState.Name(review.state).removeprefix("REVIEW_STATE_")
                answer.reject.reason = f"{review.name} is {state}: {review.error}"[:2000]
            verdicts.append(answer)
            if wait is not None and not wait.done:
                stored = [epb.Review.FromString(b) for b in await review_store.reviews_of(conn, wait.evaluation_id)]
                if len(stored) >= wait.expected:
                    verdicts += await _complete(conn, wait, stored)
            elif wait is None:  # a ranking of a voting round's solutions (counted when all K are in)
                verdicts += await voting.review_arrived(conn, review)
        await store.enqueue(conn, store.VERDICTS, [(task_id, v.SerializeToString()) for v in verdicts])
        await store.mark_done(conn, result.result_id)
    _log.info("review taken", extra={"subtask": result.subtask, "state": epb.ReviewState.Name(review.state)})


async def _ranked_labels(conn: AsyncConnection, task_id: str, subtask: str) -> tuple[str, ...]:
    """The labels of the solutions a reviewer of ``subtask`` ranks, when its voting round is VOTING."""
    found = await voting_store.round_of(conn, task_id, subtask)
    if found is None or found.state != voting.VOTING:
        return ()
    return tuple(sorted(s.label for s in await voting_store.solutions_of(conn, [found.id]) if s.label))


def _reviewer_feedback(reviews: Sequence[epb.Review]) -> list[work_pb2.Feedback]:
    """Each valid review asking for a correction, as feedback in its own words."""
    out = []
    for r in reviews:
        if r.state != epb.REVIEW_STATE_VALID or r.recommendation != epb.VERDICT_CORRECT:
            continue
        text = r.summary or "the reviewer asked for a correction"
        if r.suggestions:
            text += "\nSuggestions:\n" + "\n".join(f"- {s}" for s in r.suggestions)
        out.append(
            work_pb2.Feedback(
                type=work_pb2.FEEDBACK_TYPE_OTHER,
                text=f"peer review {r.name}: {text}"[:20_000],
                reference_files=sorted({f.path for f in r.findings if f.path}),
                findings=list(r.findings)[:50],
                author=r.name,
            )
        )
    return out


async def _complete(conn: AsyncConnection, wait: review_store.Wait, reviews: list[epb.Review]) -> list[vpb.Verdict]:
    """Combine the static measures with the reviews and decide the reviewed result (its verdicts)."""
    stored = await store.result_body(conn, wait.result_id)
    result = ipb.SubmittedResult.FromString(stored) if stored else ipb.SubmittedResult()
    policy = await effective_policy(conn, wait.task_id)
    rules = policies.rules_of(policy)
    valid = [(r.name, parsed_of(r)) for r in reviews if r.state == epb.REVIEW_STATE_VALID]
    card = combine([*wait.measures, *measures_of(valid)], policies.weights_of(policy))
    card.broken = wait.broken
    votes = [p.recommendation for _, p in valid if p.recommendation is not None]
    decision = decide_reviewed(card.overall, result.correction_cycle, rules, votes)
    decision = with_frequency(decision, rules, result.task_subtasks_succeeded, result.task_subtasks_total)
    evaluation = evaluation_message(wait.evaluation_id, result, card, decision, policy)
    evaluation.reviews.extend(r.name for r in reviews)
    earlier = await store.get_evaluation(conn, wait.evaluation_id)
    if earlier is not None:
        evaluation.create_time.CopyFrom(epb.Evaluation.FromString(earlier).create_time)
    verdicts = verdicts_for(result, evaluation, card, decision)
    main = verdicts[0]
    if decision.verdict == Verdict.CORRECT:
        main.correct.feedback.extend(_reviewer_feedback(reviews))
        main.correct.instructions = instructions_of(decision.reason, main.correct.feedback)
        main.correct.correction_cycle = await store.bump_corrections(
            conn, wait.task_id, root_of(result), [fb.SerializeToString() for fb in main.correct.feedback]
        )
    elif decision.verdict == Verdict.ESCALATE:
        cp, _ = await open_or_join_checkpoint(
            conn, result.task, result.subtask, int(decision.trigger or Trigger.ESCALATION), decision.reason,
            progress_at(result, decision, rules),
        )  # fmt: skip
        main.pause.checkpoint = cp.name
    body = evaluation.SerializeToString()
    await review_store.update_evaluation(conn, wait.evaluation_id, int(decision.verdict), body)
    await review_store.finish_wait(conn, wait.evaluation_id)
    _log.info(
        "peer reviews combined",
        extra={"subtask": result.subtask, "score": card.overall, "verdict": decision.verdict.name},
    )
    return verdicts


__all__ = ["DEFAULT_TYPES", "handles", "instructions_for", "is_review", "judge", "parsed_of", "wants_review"]
