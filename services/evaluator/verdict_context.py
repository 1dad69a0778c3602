"""What judging, peer review, voting, rollback and the servicers share: verdict messages, policy, checkpoints."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import cast

from google.protobuf import timestamp_pb2
from maw.common.v1 import work_pb2
from maw.evaluator.v1 import evaluation_intake_service_pb2 as ipb
from maw.evaluator.v1 import resources_pb2 as epb
from maw.scheduler.v1 import verdict_service_pb2 as vpb
from sqlalchemy.ext.asyncio import AsyncConnection

from . import policies, store
from .diffs import parse_diff
from .judgement import Decision, Rules, Trigger, Verdict, milestone
from .scorers import Dimension, Finding, Work
from .scoring import Scorecard

_FEEDBACK_TYPE = {
    Dimension.CODE_QUALITY: work_pb2.FEEDBACK_TYPE_STYLE,
    Dimension.COMPLETENESS: work_pb2.FEEDBACK_TYPE_INCOMPLETE,
    Dimension.SECURITY: work_pb2.FEEDBACK_TYPE_BUG,
    Dimension.ARCHITECTURE: work_pb2.FEEDBACK_TYPE_WRONG_APPROACH,
    Dimension.TESTABILITY: work_pb2.FEEDBACK_TYPE_INCOMPLETE,
}


def now_ts() -> timestamp_pb2.Timestamp:
    """Now as a Timestamp."""
    out = timestamp_pb2.Timestamp()
    out.FromDatetime(datetime.now(UTC))
    return out


def task_id_of(task: str) -> str:
    """`tasks/{task}` → task id."""
    return task.removeprefix("tasks/")


def root_of(result: ipb.SubmittedResult) -> str:
    """The original subtask a result's correction chain belongs to."""
    return result.corrects or result.subtask


def work_of(result: ipb.SubmittedResult) -> Work:
    """What the scorers see of a submitted result."""
    return Work(
        files=tuple(parse_diff(result.diff.unified_diff)),
        subtask_type=int(result.subtask_type),
        instructions=result.instructions,
        summary=result.summary,
    )


def finding_message(f: Finding) -> work_pb2.Finding:
    """A domain finding as the proto."""
    severity = cast("work_pb2.Severity.ValueType", int(f.severity))
    return work_pb2.Finding(
        path=f.path, line=f.line, severity=severity, message=f.message, scorer=f.scorer, rule=f.rule
    )


def evaluation_message(
    evaluation_id: str,
    result: ipb.SubmittedResult,
    card: Scorecard,
    decision: Decision,
    policy: epb.Policy,
    state: int = epb.EVALUATION_STATE_COMPLETED,
) -> epb.Evaluation:
    """The stored and served Evaluation."""
    stamp = now_ts()
    return epb.Evaluation(
        name=f"evaluations/{evaluation_id}",
        task=result.task,
        subtask=result.subtask,
        attempt=result.attempt,
        result_id=result.result_id,
        state=state,  # type: ignore[arg-type]
        dimensions=[
            epb.DimensionScore(
                dimension=int(d.dimension),  # type: ignore[arg-type]
                weight=round(d.weight, 4),
                score=round(d.score, 1) if d.measured else 0.0,
                measured=d.measured,
                evidence=[finding_message(f) for f in d.evidence],
                scorers=d.scorers,
                summary=d.summary,
            )
            for d in card.dimensions
        ],
        overall_score=card.overall or 0.0,
        grade=int(card.grade),  # type: ignore[arg-type]
        verdict=int(decision.verdict),  # type: ignore[arg-type]
        verdict_reason=decision.reason,
        correction_cycle=result.correction_cycle,
        acceptance_threshold=policy.acceptance_threshold,
        strengths=card.strengths,
        weaknesses=card.weaknesses,
        create_time=stamp,
        complete_time=stamp,
    )


def feedback_of(card: Scorecard) -> list[work_pb2.Feedback]:
    """Typed feedback from a scorecard: one entry per weak dimension, with its findings and files."""
    out = []
    for d in card.dimensions:
        if not d.measured or d.score >= 8:
            continue
        kind = _FEEDBACK_TYPE[d.dimension]
        if any(f.rule == "invalid-syntax" for f in d.evidence):
            kind = work_pb2.FEEDBACK_TYPE_BUG
        findings = sorted(d.evidence, key=lambda f: (-f.severity, f.path, f.line))[:50]
        out.append(
            work_pb2.Feedback(
                type=kind,
                text=f"{d.dimension.name.lower().replace('_', ' ')} {d.score:.1f}/10: {d.summary}",
                reference_files=sorted({f.path for f in findings if f.path}),
                findings=[finding_message(f) for f in findings],
                author="evaluator",
            )
        )
    return out


def instructions_of(reason: str, feedback: Sequence[work_pb2.Feedback]) -> str:
    """Correction instructions composed from the feedback, findings first (worst first)."""
    lines = [f"Your previous result was sent back: {reason}.", "Fix the following and deliver the complete change:"]
    for fb in feedback:
        lines.append(f"- [{work_pb2.FeedbackType.Name(fb.type).removeprefix('FEEDBACK_TYPE_')}] {fb.text}")
        for f in fb.findings[:20]:
            where = f"{f.path}:{f.line}" if f.line else f.path
            sev = work_pb2.Severity.Name(f.severity).removeprefix("SEVERITY_")
            lines.append(f"    {sev} {where} {f.message}" + (f" ({f.rule})" if f.rule else ""))
    return "\n".join(lines)


def new_verdict(result_task: str, subtask: str, attempt: int, result_id: str, evaluation: str) -> vpb.Verdict:
    """A verdict with a fresh id (its idempotency key at the scheduler)."""
    return vpb.Verdict(
        verdict_id=uuid.uuid4().hex,
        task=result_task,
        subtask=subtask,
        attempt=attempt,
        result_id=result_id,
        evaluation=evaluation,
        decide_time=now_ts(),
    )


async def open_or_join_checkpoint(
    conn: AsyncConnection,
    task: str,
    subtask: str,
    trigger: int,
    reason: str,
    progress: int,
    creator: str = "evaluator",
) -> tuple[epb.Checkpoint, bool]:
    """Open a checkpoint for ``subtask`` (empty: the whole task), or join the task's open one.

    One open checkpoint per task; returns it and whether it was opened now.
    """
    task_id = task_id_of(task)
    existing = await store.open_checkpoint_of(conn, task_id)
    if existing is not None:
        cp = epb.Checkpoint.FromString(existing.body)
        if subtask not in cp.subtasks or not subtask:
            if subtask:
                cp.subtasks.append(subtask)
            cp.reason = f"{cp.reason}; {reason}"[:2000]
            cp.etag = uuid.uuid4().hex[:16]
            await store.update_checkpoint(conn, existing.id, cp.state, cp.SerializeToString())
        return cp, False
    checkpoint_id = uuid.uuid4().hex[:16]
    cp = epb.Checkpoint(
        name=f"checkpoints/{checkpoint_id}",
        task=task,
        trigger=trigger,  # type: ignore[arg-type]
        reason=reason,
        state=epb.CHECKPOINT_STATE_OPEN,
        subtasks=[subtask] if subtask else [],
        progress_percent=progress,
        creator=creator,
        create_time=now_ts(),
        etag=uuid.uuid4().hex[:16],
    )
    await store.insert_checkpoint(conn, checkpoint_id, task_id, cp.state, cp.SerializeToString())
    return cp, True


def progress_at(result: ipb.SubmittedResult, decision: Decision | None = None, rules: Rules | None = None) -> int:
    """The task's progress (0–100) recorded on a checkpoint opened for ``result``.

    At a FREQUENCY stop it is the milestone the held result reaches; otherwise the share of the task's subtasks
    that had succeeded before it.
    """
    if decision is not None and rules is not None and decision.trigger == Trigger.FREQUENCY:
        reached = milestone(rules.frequency, result.task_subtasks_succeeded, result.task_subtasks_total)
        if reached is not None:
            return reached
    return 100 * result.task_subtasks_succeeded // max(1, result.task_subtasks_total)


def task_pause(cp: epb.Checkpoint) -> vpb.Verdict:
    """The verdict that pauses a whole task at ``cp`` (no subtask is held: MANUAL, TIME_BUDGET)."""
    verdict = new_verdict(cp.task, "", 0, "", "")
    verdict.pause.trigger = cp.trigger
    verdict.pause.reason = cp.reason
    verdict.pause.checkpoint = cp.name
    return verdict


def failure_decision(result: ipb.SubmittedResult, rules: Rules) -> Decision:
    """A subtask that failed for good: held at an ERROR checkpoint when the trigger is on, else rejected."""
    outcome = work_pb2.Outcome.Name(result.outcome).removeprefix("OUTCOME_")
    detail = f": {result.error_message[:300]}" if result.error_message else ""
    reason = f"{result.subtask_key or result.subtask} failed ({outcome}) after {result.attempt} attempts{detail}"
    if Trigger.ERROR in rules.triggers:
        return Decision(Verdict.ESCALATE, reason, Trigger.ERROR)
    return Decision(Verdict.REJECT, reason)


def failed(result: ipb.SubmittedResult) -> bool:
    """Whether a submitted result is a failure (held for the ERROR trigger) rather than work to score."""
    return result.outcome != work_pb2.OUTCOME_SUCCEEDED


async def effective_policy(conn: AsyncConnection, task_id: str) -> epb.Policy:
    """The task's policy (the default one for a task never registered)."""
    stored = await store.get_policy(conn, f"tasks/{task_id}/policy")
    if stored is not None:
        return epb.Policy.FromString(stored.body)
    default = await store.get_policy(conn, policies.DEFAULT_NAME)
    return epb.Policy.FromString(default.body) if default else policies.default_policy()


def verdicts_for(
    result: ipb.SubmittedResult, evaluation: epb.Evaluation, card: Scorecard, decision: Decision
) -> list[vpb.Verdict]:
    """The verdicts a decision sends for ``result``: one, carrying the decision and its feedback."""
    verdict = new_verdict(result.task, result.subtask, result.attempt, result.result_id, evaluation.name)
    verdict.score = evaluation.overall_score
    verdict.grade = evaluation.grade
    if decision.verdict == Verdict.ACCEPT:
        verdict.accept.SetInParent()
    elif decision.verdict == Verdict.CORRECT:
        feedback = feedback_of(card)
        verdict.correct.feedback.extend(feedback)
        verdict.correct.instructions = instructions_of(decision.reason, feedback)
    elif decision.verdict == Verdict.ESCALATE:
        verdict.pause.trigger = int(decision.trigger or Trigger.ESCALATION)  # type: ignore[assignment]
        verdict.pause.reason = decision.reason
        verdict.pause.subtasks.append(result.subtask)
    else:
        verdict.reject.reason = decision.reason
    return [verdict]


__all__ = [
    "effective_policy",
    "evaluation_message",
    "failed",
    "failure_decision",
    "feedback_of",
    "finding_message",
    "instructions_of",
    "new_verdict",
    "now_ts",
    "open_or_join_checkpoint",
    "progress_at",
    "root_of",
    "task_id_of",
    "task_pause",
    "verdicts_for",
    "work_of",
]
