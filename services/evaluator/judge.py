"""The evaluator's core loop: judge submitted results, decide verdicts, and deliver them durably."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import zlib
from collections import defaultdict
from collections.abc import Callable

from maw.evaluator.v1 import evaluation_intake_service_pb2 as ipb
from maw.evaluator.v1 import resources_pb2 as epb
from maw.registry.v1 import activity_intake_service_pb2 as aipb
from maw.registry.v1 import activity_intake_service_pb2_grpc as aipb_grpc
from maw.scheduler.v1 import verdict_service_pb2 as vpb
from maw.scheduler.v1 import verdict_service_pb2_grpc as vpb_grpc
from sqlalchemy.ext.asyncio import AsyncEngine

from services.runtime.internal import internal_channel

from . import peer_review, policies, store, voting
from .judgement import Decision, Trigger, Verdict, decide, with_frequency
from .scorers import registered
from .scoring import Grade, Scorecard, evaluate
from .settings import EvaluatorSettings
from .verdict_context import (
    effective_policy,
    evaluation_message,
    failed,
    failure_decision,
    open_or_join_checkpoint,
    progress_at,
    root_of,
    task_id_of,
    task_pause,
    verdicts_for,
    work_of,
)

_log = logging.getLogger("maw.evaluator.judge")


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
        for row in pending:
            task_id, evaluation_id = row.task_id, row.evaluation_id
            result = ipb.SubmittedResult.FromString(row.body)
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
                    evaluate, work_of(result), registered(), policies.weights_of(policy), list(policy.scorers)
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
            rules = policies.rules_of(policy)
            decision = decide(card.overall, result.correction_cycle, rules)
            decision = with_frequency(decision, rules, result.task_subtasks_succeeded, result.task_subtasks_total)
            if failed(result):
                decision = failure_decision(result, rules)
            state = epb.EVALUATION_STATE_COMPLETED
            if card.broken and card.overall is None and not failed(result):
                state = epb.EVALUATION_STATE_FAILED
                decision = Decision(Verdict.ESCALATE, f"scorers failed: {', '.join(card.broken)}", Trigger.ESCALATION)
            evaluation = evaluation_message(evaluation_id, result, card, decision, policy, state)
            verdicts = verdicts_for(result, evaluation, card, decision)
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

    # -- time budgets ------------------------------------------------------------------------------------------

    async def budget_round(self) -> bool:
        """Pause tasks running past their policy's time budget at a TIME_BUDGET checkpoint (once per task)."""
        paused = False
        async with self.db.begin() as conn:
            due = await store.budgets_due(conn, 100)
            for task_id in due:
                await store.mark_budget_fired(conn, task_id)
                policy = await effective_policy(conn, task_id)
                if Trigger.TIME_BUDGET not in policies.rules_of(policy).triggers:
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
            if not await store.try_lock(conn, lock):
                return False
            batch = await store.outbox_batch(conn, target, self.settings.relay_batch)
            if not batch:
                return False
            if hold == "before_delivery":
                await asyncio.Event().wait()  # TEST ONLY: stay here until killed
            await send([item.body for item in batch])  # type: ignore[misc]
            if hold == "after_delivery":
                await asyncio.Event().wait()  # TEST ONLY: delivered, not yet removed; stay here until killed
            await store.outbox_done(conn, [item.id for item in batch])
        return len(batch) >= self.settings.relay_batch


__all__ = ["Judge"]
