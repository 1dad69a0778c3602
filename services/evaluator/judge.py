"""The evaluator's core loop: judge submitted results, decide verdicts, and deliver them durably.

- The *judge* takes results SubmitResults recorded (already acknowledged to the scheduler), runs the
  scorers on each (in a worker thread), and in one transaction stores the evaluation, the verdict in the
  outbox, any checkpoint it opens, and marks the result judged. A crash before that commit judges the
  result again after restart; a crash after it finds the verdict in the outbox.
- Two *relays* drain the outbox: verdicts to the scheduler's VerdictService, decisions to the registry's
  activity log. An item leaves the outbox only once acknowledged; both receivers are idempotent by id,
  so a crash between delivery and removal repeats a delivery and never applies it twice. One replica at a
  time relays each target (a PostgreSQL advisory lock held for the round), which keeps per-task order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
import zlib
from collections import defaultdict
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import cast

from google.protobuf import timestamp_pb2
from maw.common.v1 import work_pb2
from maw.evaluator.v1 import evaluation_intake_service_pb2 as ipb
from maw.evaluator.v1 import resources_pb2 as epb
from maw.registry.v1 import activity_intake_service_pb2 as aipb
from maw.registry.v1 import activity_intake_service_pb2_grpc as aipb_grpc
from maw.scheduler.v1 import verdict_service_pb2 as vpb
from maw.scheduler.v1 import verdict_service_pb2_grpc as vpb_grpc
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from services.runtime.internal import internal_channel

from . import _policy, peer_review, store, voting
from .diffs import parse_diff
from .judgement import Decision, Rules, Trigger, Verdict, decide, milestone, with_frequency
from .scorers import Dimension, Finding, Work, registered
from .scoring import Grade, Scorecard, evaluate
from .settings import EvaluatorSettings

_log = logging.getLogger("maw.evaluator.judge")

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
        cp = epb.Checkpoint.FromString(existing[1])
        if subtask not in cp.subtasks or not subtask:
            if subtask:
                cp.subtasks.append(subtask)
            cp.reason = f"{cp.reason}; {reason}"[:2000]
            cp.etag = uuid.uuid4().hex[:16]
            await store.update_checkpoint(conn, existing[0], cp.state, cp.SerializeToString())
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
        return epb.Policy.FromString(stored[0])
    default = await store.get_policy(conn, _policy.DEFAULT_NAME)
    return epb.Policy.FromString(default[0]) if default else _policy.default_policy()


class Judge:
    """Judging and delivery, run in the background of each evaluator process."""

    def __init__(self, settings: EvaluatorSettings, db: AsyncEngine) -> None:
        self.settings = settings
        self.db = db
        self._tasks: list[asyncio.Task[None]] = []
        self._wake_judge = asyncio.Event()
        self._wake: dict[int, asyncio.Event] = defaultdict(asyncio.Event)

    def poke(self, target: int | None = None) -> None:
        """New results to judge (None) or new outbox items for ``target``."""
        (self._wake_judge if target is None else self._wake[target]).set()

    async def start(self) -> None:
        """Start judging and both relays."""
        if self.settings.test_hold_verdicts:
            _log.warning("TEST HOOK: verdicts are held %s", self.settings.test_hold_verdicts.replace("_", " "))
        self._tasks = [
            asyncio.create_task(self._loop(self._wake_judge, self.judge_round)),
            asyncio.create_task(self._loop(self._wake[store.VERDICTS], self._relay_verdicts)),
            asyncio.create_task(self._loop(self._wake[store.ACTIVITY], self._relay_activity)),
            asyncio.create_task(self._loop(asyncio.Event(), self.budget_round)),
        ]

    async def stop(self) -> None:
        """Stop the loops (work in flight is redone after restart)."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _loop(self, wake: asyncio.Event, round_: Callable[[], object]) -> None:
        while True:
            try:
                more = await round_()  # type: ignore[misc]
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a peer or the database is away: nothing moved; retry
                _log.warning("%s failed: %s", getattr(round_, "__name__", "round"), exc)
                more = False
            if not more:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), timeout=1.0)
                wake.clear()

    # -- judging ----------------------------------------------------------------------------------------------

    async def judge_round(self) -> bool:
        """Judge up to one batch of pending results; True if there may be more."""
        async with self.db.connect() as conn:
            pending = await store.pending_results(conn, self.settings.judge_batch)
        for _, task_id, evaluation_id, body in pending:
            result = ipb.SubmittedResult.FromString(body)
            async with self.db.connect() as conn:
                policy = await effective_policy(conn, task_id)
            if peer_review.handles(result, policy):  # a REVIEW output, or a result that waits for reviews
                await peer_review.judge(self.db, result, evaluation_id, policy)
                self.poke(store.VERDICTS)
                continue
            if failed(result):
                card = Scorecard([], None, Grade.UNSPECIFIED)  # a failure is not scored: the ERROR trigger decides
            else:
                card = await asyncio.to_thread(
                    evaluate, work_of(result), registered(), _policy.weights_of(policy), list(policy.scorers)
                )
            if result.solution_of and await voting.commit_solution(self.db, result, evaluation_id, card):
                self.poke(store.VERDICTS)  # one solution of a voting round (voting.py)
                continue
            await self._commit_judgement(result, evaluation_id, card)
        return len(pending) >= self.settings.judge_batch

    async def _commit_judgement(self, result: ipb.SubmittedResult, evaluation_id: str, card: Scorecard) -> None:
        task_id = task_id_of(result.task)
        async with self.db.begin() as conn:
            await store.get_task(conn, task_id, lock=True)  # serialises decisions on one task
            if not await store.claim_result(conn, result.result_id):
                return  # judged meanwhile by another replica
            if await store.superseded(conn, task_id, result.subtask, result.attempt):
                await store.mark_done(conn, result.result_id)  # its subtask was rolled back (rollback.py)
                return
            policy = await effective_policy(conn, task_id)
            rules = _policy.rules_of(policy)
            decision = decide(card.overall, result.correction_cycle, rules)
            decision = with_frequency(decision, rules, result.task_subtasks_succeeded, result.task_subtasks_total)
            if failed(result):
                decision = failure_decision(result, rules)
            state = epb.EVALUATION_STATE_COMPLETED
            if card.broken and card.overall is None and not failed(result):
                state = epb.EVALUATION_STATE_FAILED
                decision = Decision(Verdict.ESCALATE, f"scorers failed: {', '.join(card.broken)}", Trigger.ESCALATION)
            evaluation = evaluation_message(evaluation_id, result, card, decision, policy, state)
            verdicts = self._verdicts_for(result, evaluation, card, decision)
            if decision.verdict == Verdict.CORRECT:
                correct = verdicts[0].correct
                correct.correction_cycle = await store.bump_corrections(
                    conn, task_id, root_of(result), [fb.SerializeToString() for fb in correct.feedback]
                )
            elif decision.verdict == Verdict.ESCALATE:
                cp, _ = await open_or_join_checkpoint(
                    conn, result.task, result.subtask, int(decision.trigger or Trigger.ESCALATION), decision.reason,
                    progress_at(result, decision, rules),
                )  # fmt: skip
                verdicts[0].pause.checkpoint = cp.name
            await store.insert_evaluation(
                conn, evaluation_id, task_id, result.subtask, root_of(result), int(decision.verdict),
                evaluation.SerializeToString(),
            )  # fmt: skip
            await store.enqueue(conn, store.VERDICTS, [(task_id, v.SerializeToString()) for v in verdicts])
            await store.mark_done(conn, result.result_id)
        _log.info(
            "judged",
            extra={"subtask": result.subtask, "score": card.overall, "verdict": decision.verdict.name},
        )
        self.poke(store.VERDICTS)

    @staticmethod
    def _verdicts_for(
        result: ipb.SubmittedResult, evaluation: epb.Evaluation, card: Scorecard, decision: Decision
    ) -> list[vpb.Verdict]:
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

    # -- time budgets ------------------------------------------------------------------------------------------

    async def budget_round(self) -> bool:
        """Pause tasks running past their policy's time budget at a TIME_BUDGET checkpoint (once per task)."""
        paused = False
        async with self.db.begin() as conn:
            due = await store.budgets_due(conn, 100)
            for task_id in due:
                await store.mark_budget_fired(conn, task_id)
                policy = await effective_policy(conn, task_id)
                if Trigger.TIME_BUDGET not in _policy.rules_of(policy).triggers:
                    continue
                budget = policy.time_budget.ToTimedelta()
                reason = f"the task has run longer than its time budget of {budget}"
                cp, opened = await open_or_join_checkpoint(
                    conn, f"tasks/{task_id}", "", int(Trigger.TIME_BUDGET), reason, 0
                )
                if opened:
                    await store.enqueue(conn, store.VERDICTS, [(task_id, task_pause(cp).SerializeToString())])
                    paused = True
        if paused:
            self.poke(store.VERDICTS)
        return len(due) >= 100

    # -- delivery -----------------------------------------------------------------------------------------------

    async def _relay_verdicts(self) -> bool:
        async with internal_channel(self.settings, self.settings.scheduler_addr) as channel:
            stub: vpb_grpc.VerdictServiceAsyncStub = vpb_grpc.VerdictServiceStub(channel)

            async def send(bodies: list[bytes]) -> None:
                verdicts = [vpb.Verdict.FromString(b) for b in bodies]
                reply = await stub.DeliverVerdicts(vpb.DeliverVerdictsRequest(verdicts=verdicts), timeout=30)
                for ack in reply.acks:
                    if ack.disposition in (vpb.VERDICT_DISPOSITION_REJECTED, vpb.VERDICT_DISPOSITION_STALE):
                        _log.warning(
                            "verdict %s %s: %s",
                            ack.verdict_id,
                            vpb.VerdictDisposition.Name(ack.disposition),
                            ack.message,
                        )

            return await self._relay(store.VERDICTS, send, hold=self.settings.test_hold_verdicts)

    async def _relay_activity(self) -> bool:
        async with internal_channel(self.settings, self.settings.registry_addr) as channel:
            stub: aipb_grpc.ActivityIntakeServiceAsyncStub = aipb_grpc.ActivityIntakeServiceStub(channel)

            async def send(bodies: list[bytes]) -> None:
                records = [aipb.ActivityRecord.FromString(b) for b in bodies]
                await stub.AppendActivity(aipb.AppendActivityRequest(records=records), timeout=30)

            return await self._relay(store.ACTIVITY, send)

    async def _relay(self, target: int, send: Callable[[list[bytes]], object], hold: str = "") -> bool:
        """Deliver one batch of ``target``'s outbox; remove it only after the receiver acknowledged it."""
        lock = zlib.crc32(f"maw-evaluator-outbox-{target}".encode())
        async with self.db.begin() as conn:
            if not (await conn.execute(text("SELECT pg_try_advisory_xact_lock(:k)"), {"k": lock})).scalar():
                return False
            batch = await store.outbox_batch(conn, target, self.settings.relay_batch)
            if not batch:
                return False
            if hold == "before_delivery":
                await asyncio.Event().wait()  # TEST ONLY: stay here until killed
            await send([body for _, body in batch])  # type: ignore[misc]
            if hold == "after_delivery":
                await asyncio.Event().wait()  # TEST ONLY: delivered, not yet removed; stay here until killed
            await store.outbox_done(conn, [i for i, _ in batch])
        return len(batch) >= self.settings.relay_batch


__all__ = [
    "Judge",
    "effective_policy",
    "feedback_of",
    "instructions_of",
    "new_verdict",
    "now_ts",
    "open_or_join_checkpoint",
    "progress_at",
    "task_pause",
    "work_of",
]
