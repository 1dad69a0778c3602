"""Applying the evaluator's verdicts (maw.scheduler.v1.VerdictService), each once, in order.

Each verdict is applied in its own transaction that first records its ``verdict_id`` in
``applied_verdicts``; a repeat finds the id and changes nothing (DUPLICATE). A verdict about an attempt
or state that moved on is STALE; one that cannot apply (unknown task, unsupported action) is REJECTED.
State changes go through the one transition table (states.py) and are logged with EventLog like the
engine's, so watchers and the activity log see them.

- Accept: the subtask SUCCEEDS, and with it every subtask of its correction chain (the original waits
  CORRECTING while corrections run); the original's dependents are released as for any success.
- Correct: a correction subtask (type CODE_FIX, ``corrects`` = the original) joins the DAG READY, carrying
  the feedback in its instructions with the previous diff; the judged subtask waits CORRECTING.
- Pause: the subtask waits WAITING_CHECKPOINT and the task WAITING_CHECKPOINT (no new assignments). A pause
  without a subtask (MANUAL, TIME_BUDGET checkpoints) holds only the task; running work finishes.
- Resume: the task runs again. Reject: the subtask FAILS. CancelTask: as TaskService.CancelTask.
"""

from __future__ import annotations

import uuid
from typing import Any

import grpc
from maw.agent.v1 import agent_service_pb2 as apb
from maw.common.v1 import work_pb2
from maw.scheduler.v1 import resources_pb2 as spb
from maw.scheduler.v1 import task_service_pb2 as tpb
from maw.scheduler.v1 import verdict_service_pb2 as vpb
from maw.scheduler.v1 import verdict_service_pb2_grpc as vpb_grpc
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from services.runtime import invalid_argument

from . import _convert as conv
from . import reviews, rollback, store, voting
from .engine import Engine
from .names import subtask_name
from .settle import FINAL_ACCEPT_GIVEN, FINAL_ACCEPT_WAITING, cancel_leases
from .states import TERMINAL_TASK, SubtaskState, TaskState
from .verdict_context import APPLIED, DUPLICATE, HELD, REJECTED, STALE, Outcome, VerdictContext
from .wire import now_utc

Ctx = grpc.aio.ServicerContext[Any, Any]
S, T = SubtaskState, TaskState


class _Applier(VerdictContext):
    """Applies one verdict: dispatches on its action."""

    async def run(self) -> None:
        action = self.v.WhichOneof("action")
        task = await self.task()
        if action == "rollback":  # reopens a finished task, so before the check below (rollback.py)
            return await rollback.apply(self, task)
        if task.state in TERMINAL_TASK:
            raise Outcome(STALE, f"the task is {T(task.state).name}")
        if action == "accept":
            await self.accept(task)
        elif action == "correct":
            await self.correct(task)
        elif action == "pause":
            await self.pause(task)
        elif action == "reject":
            await self.reject()
        elif action == "resume":
            await self.resume(task)
        elif action == "cancel_task":
            await self.cancel(task)
        elif action == "policy_changed":
            await self.policy_changed(task)
        elif action == "request_reviews":
            await reviews.request_reviews(self, task)
        elif action == "select_solution":
            await voting.select_solution(self)
        else:
            raise Outcome(REJECTED, f"action {action or 'none'} is not supported by this scheduler")

    async def _judged(self, row: store.SubtaskRow) -> None:
        await self.conn.execute(
            text(
                "UPDATE subtasks SET evaluation = :e, evaluation_score = :s, grade = :g, update_time = now()"
                " WHERE task_id = :t AND key = :k"
            ),
            {"e": self.v.evaluation, "s": self.v.score, "g": int(self.v.grade), "t": row.task_id, "k": row.key},
        )

    async def accept(self, task: store.TaskRow) -> None:
        row = await self.subtask()
        await self.judged(row)
        root = (await self._corrects(row)) or row.key
        chain = await self.conn.execute(
            text(
                "SELECT key FROM subtasks WHERE task_id = :t AND (key = :r OR corrects = :r) AND key <> :k"
                " AND state = ANY(:held) ORDER BY key FOR UPDATE"
            ),
            {"t": row.task_id, "r": root, "k": row.key, "held": [int(s) for s in HELD]},
        )
        keys = [row.key] + [r[0] for r in chain]
        rows = await store.lock_subtasks(self.conn, [(row.task_id, k) for k in keys])
        rows[(row.task_id, row.key)] = row
        for key in keys:
            self.move(rows[(row.task_id, key)], S.SUCCEEDED, "accepted" if key == row.key else f"{row.key} accepted")
        await self.conn.execute(
            text(
                "UPDATE subtasks SET state = :s, checkpoint = '', end_time = now(), update_time = now()"
                " WHERE task_id = :t AND key = ANY(:keys)"
            ),
            {"s": int(S.SUCCEEDED), "t": row.task_id, "keys": keys},
        )
        ready = await store.release_dependents(self.conn, [(row.task_id, root)])
        for ready_task, ready_key in ready:
            self.events.subtask_state(ready_task, ready_key, S.PENDING, S.READY, 0)
        self.ready = bool(ready)
        await self.settle({"succeeded": len(keys)})

    async def _corrects(self, row: store.SubtaskRow) -> str:
        found = await self.conn.execute(
            text("SELECT corrects FROM subtasks WHERE task_id = :t AND key = :k"), {"t": row.task_id, "k": row.key}
        )
        return str(found.scalar_one())

    async def correct(self, task: store.TaskRow) -> None:
        row = await self.subtask()
        await self.judged(row)
        root_key = (await self._corrects(row)) or row.key
        root = (await store.get_subtasks(self.conn, row.task_id, [root_key]))[0]
        spec = spb.SubtaskSpec.FromString(root.body)
        cycle = max(1, self.v.correct.correction_cycle)
        key = f"{root_key[:48]}-fix-{cycle}"
        existing = {r.key for r in await store.get_subtasks(self.conn, row.task_id)}
        while key in existing:
            key = f"{root_key[:40]}-fix-{cycle}-{uuid.uuid4().hex[:6]}"
        result = await store.latest_results(self.conn, row.task_id, [row.key])
        previous = spb.SubtaskResult.FromString(result[row.key]) if row.key in result else spb.SubtaskResult()
        parts = [self.v.correct.instructions, "", "The original instructions:", spec.description]
        if previous.diff.unified_diff:
            parts += ["", "Your previous change (fix it; deliver the complete corrected change):", "```diff",
                      previous.diff.unified_diff[:32_000], "```"]  # fmt: skip
        new = spb.SubtaskSpec()
        new.CopyFrom(spec)
        new.key = key
        new.display_name = f"{spec.display_name or root_key} (correction {cycle})"
        new.type = work_pb2.SUBTASK_TYPE_CODE_FIX
        new.description = "\n".join(parts)
        if self.v.correct.HasField("preferred_tool") and self.v.correct.preferred_tool.kind:
            new.preferred_tool.CopyFrom(self.v.correct.preferred_tool)
        self.move(row, S.CORRECTING, f"correction {cycle} requested ({key})")
        await store.set_subtask_states(self.conn, [{"task_id": row.task_id, "key": row.key,
                                                    "state": int(S.CORRECTING)}])  # fmt: skip
        await self.conn.execute(
            text(
                "INSERT INTO subtasks (task_id, key, ordinal, body, state, max_attempts, priority, task_priority,"
                " tool_kind, privacy_level, required_labels, dependencies, dependents, deps_remaining, ready_time,"
                " corrects, correction_cycle, feedback)"
                " SELECT :t, :k, (SELECT max(ordinal) + 1 FROM subtasks WHERE task_id = :t), :b, :s, max_attempts,"
                " priority, task_priority, :tool, privacy_level, required_labels, dependencies, '{}', 0, now(),"
                " :root, :cycle, CAST(:fb AS bytea[]) FROM subtasks WHERE task_id = :t AND key = :root"
            ),
            {
                "t": row.task_id,
                "k": key,
                "b": new.SerializeToString(),
                "s": int(S.READY),
                "tool": int(new.preferred_tool.kind),
                "root": root_key,
                "cycle": cycle,
                "fb": [f.SerializeToString() for f in self.v.correct.feedback],
            },  # fmt: skip
        )
        await store.update_task(self.conn, row.task_id, subtask_count=task.subtask_count + 1)
        if self.v.correct.apply_to_future and self.v.correct.feedback:
            # The person's words also reach every subtask that has not run yet (assignments.py adds them).
            await self.conn.execute(
                text(
                    "UPDATE subtasks SET feedback = feedback || CAST(:fb AS bytea[]), update_time = now()"
                    " WHERE task_id = :t AND state = ANY(:s) AND attempt = 0 AND corrects = '' AND review_of = ''"
                ),
                {
                    "fb": [f.SerializeToString() for f in self.v.correct.feedback],
                    "t": row.task_id,
                    "s": [int(S.PENDING), int(S.READY)],
                },  # fmt: skip
            )
        added = await store.get_subtasks(self.conn, row.task_id, [key])
        self.events.add(
            row.task_id,
            tpb.TaskEvent(
                subtasks_added=tpb.SubtasksAdded(
                    subtasks=[conv.subtask_message(r) for r in added], reason=f"correction {cycle} of {root_key}"
                )
            ),
        )
        self.created.append(subtask_name(row.task_id, key))
        self.ready = True

    async def pause(self, task: store.TaskRow) -> None:
        checkpoint = self.v.pause.checkpoint
        await rollback.record_mark(self.conn, task.id, checkpoint, self.v.subtask)  # what a rollback keeps
        if self.v.subtask:
            row = await self.subtask()
            await self.judged(row)
            self.move(row, S.WAITING_CHECKPOINT, self.v.pause.reason)
            await self.conn.execute(
                text(
                    "UPDATE subtasks SET state = :s, checkpoint = :c, update_time = now()"
                    " WHERE task_id = :t AND key = :k"
                ),
                {"s": int(S.WAITING_CHECKPOINT), "c": checkpoint, "t": row.task_id, "k": row.key},
            )
        if task.state == T.PENDING:  # paused before anything ran (MANUAL, TIME_BUDGET, or a queue-wait ERROR)
            self.move_task(task, T.RUNNING, "paused before its first assignment")
        if task.state != T.WAITING_CHECKPOINT:
            self.move_task(task, T.WAITING_CHECKPOINT, self.v.pause.reason)
            await store.update_task(self.conn, task.id, state=int(T.WAITING_CHECKPOINT), checkpoint=checkpoint,
                                    state_message=self.v.pause.reason[:2000])  # fmt: skip
        elif not await self._current_checkpoint(task):
            # Waiting without a checkpoint yet: created waiting for its plan to be confirmed (AFTER_DECOMPOSITION),
            # or all done and waiting for final acceptance (BEFORE_FINAL_ACCEPT). This checkpoint is the one.
            await store.update_task(self.conn, task.id, checkpoint=checkpoint, state_message=self.v.pause.reason[:2000])
        self.events.add(
            task.id,
            tpb.TaskEvent(
                checkpoint_reached=tpb.CheckpointReached(
                    checkpoint=checkpoint,
                    trigger=self.v.pause.trigger,
                    reason=self.v.pause.reason,
                    subtasks=list(self.v.pause.subtasks),
                )  # fmt: skip
            ),
        )

    async def reject(self) -> None:
        row = await self.subtask()
        await self.judged(row)
        self.move(row, S.FAILED, self.v.reject.reason)
        await store.set_subtask_states(self.conn, [{"task_id": row.task_id, "key": row.key, "state": int(S.FAILED),
                                                    "end_time": now_utc(),
                                                    "state_message": self.v.reject.reason[:2000]}])  # fmt: skip
        await self.settle({"excused": 1} if row.review_of else {"failed": 1})  # a failed review never fails its task

    async def _current_checkpoint(self, task: store.TaskRow) -> str:
        found = await self.conn.execute(text("SELECT checkpoint FROM tasks WHERE id = :i"), {"i": task.id})
        return str(found.scalar_one())

    async def resume(self, task: store.TaskRow) -> None:
        current = await self._current_checkpoint(task)
        if task.state != T.WAITING_CHECKPOINT or current != self.v.resume.checkpoint:
            raise Outcome(STALE, f"the task does not wait at {self.v.resume.checkpoint or 'final acceptance'}")
        self.move_task(task, T.RUNNING, f"{self.v.resume.checkpoint or 'final acceptance'} decided")
        await store.update_task(self.conn, task.id, state=int(T.RUNNING), checkpoint="", state_message="")
        if self.v.resume.checkpoint:
            self.events.add(task.id, tpb.TaskEvent(checkpoint_resolved=tpb.CheckpointResolved(
                checkpoint=self.v.resume.checkpoint)))  # fmt: skip
        if task.final_accept == FINAL_ACCEPT_WAITING:  # it waited for final acceptance: given now, so the task succeeds
            await store.update_task(self.conn, task.id, final_accept=FINAL_ACCEPT_GIVEN)
            task.final_accept = FINAL_ACCEPT_GIVEN
            await self.settle({})
        self.ready = True

    async def policy_changed(self, task: store.TaskRow) -> None:
        """Replace the scheduler's copy of the task's effective policy (ERROR, BEFORE_FINAL_ACCEPT read it)."""
        await store.put_task_policy(self.conn, task.id, self.v.policy_changed.policy.SerializeToString())

    async def cancel(self, task: store.TaskRow) -> None:
        reason = self.v.cancel_task.reason or "rejected at a checkpoint"
        rows = await store.cancel_live_subtasks(self.conn, [task.id], reason)
        for sub in rows:
            self.events.subtask_state(sub.task_id, sub.key, sub.state, S.CANCELLED, sub.attempt, None, reason)
        cancel_leases(self.cancels, rows, apb.CANCEL_REASON_TASK_CANCELLED, reason)
        self.move_task(task, T.CANCELLED, reason)
        await store.update_task(self.conn, task.id, state=int(T.CANCELLED), state_message=reason[:2000],
                                end_time=now_utc(), running_count=0, checkpoint="",
                                cancelled_count=task.cancelled_count + len(rows))  # fmt: skip
        if self.v.cancel_task.checkpoint:
            self.events.add(task.id, tpb.TaskEvent(checkpoint_resolved=tpb.CheckpointResolved(
                checkpoint=self.v.cancel_task.checkpoint)))  # fmt: skip


async def apply_verdict(db: AsyncEngine, engine: Engine, verdict: vpb.Verdict) -> vpb.VerdictAck:
    """Apply one verdict exactly once (its id is recorded in the same transaction as its effects)."""
    ack = vpb.VerdictAck(verdict_id=verdict.verdict_id)
    cancels: list[dict[str, Any]] = []
    touched: dict[str, int] = {}
    ready = False
    async with db.begin() as conn:
        fresh = await conn.execute(
            text(
                "INSERT INTO applied_verdicts (verdict_id, task_id) VALUES (:v, :t) ON CONFLICT DO NOTHING"
                " RETURNING verdict_id"
            ),
            {"v": verdict.verdict_id, "t": verdict.task.removeprefix("tasks/")},
        )
        if fresh.first() is None:
            ack.disposition = DUPLICATE
            return ack
        applier = _Applier(conn, verdict)
        savepoint = await conn.begin_nested()
        try:
            await applier.run()
            await savepoint.commit()
            ack.disposition = APPLIED
            ack.created_subtasks.extend(applier.created)
            touched = await applier.events.flush(conn)
            cancels, ready = applier.cancels, applier.ready
        except Outcome as out:
            await savepoint.rollback()
            ack.disposition, ack.message = out.disposition, out.message  # type: ignore[assignment]
        await conn.execute(
            text("UPDATE applied_verdicts SET disposition = :d, message = :m, created = :c WHERE verdict_id = :v"),
            {"d": int(ack.disposition), "m": ack.message, "c": list(ack.created_subtasks), "v": verdict.verdict_id},
        )
    await engine.after_commit(touched, ready, cancels)
    return ack


class VerdictService(vpb_grpc.VerdictServiceServicer):
    """The evaluator's half of the judgement loop."""

    def __init__(self, db: AsyncEngine, engine: Engine) -> None:
        self.db = db
        self.engine = engine

    async def DeliverVerdicts(self, request: vpb.DeliverVerdictsRequest, context: Ctx) -> vpb.DeliverVerdictsResponse:
        problems = [] if len(request.verdicts) <= 1000 else [("verdicts", "at most 1000 per call")]
        problems += [(f"verdicts[{i}].verdict_id", "is required")
                     for i, v in enumerate(request.verdicts) if not v.verdict_id]  # fmt: skip
        if problems:
            raise invalid_argument(problems)
        acks = [await apply_verdict(self.db, self.engine, v) for v in request.verdicts]
        return vpb.DeliverVerdictsResponse(acks=acks)

    async def GetRollbackPlan(self, request: vpb.GetRollbackPlanRequest, context: Ctx) -> vpb.GetRollbackPlanResponse:
        return await rollback.get_rollback_plan(self.db, request)


__all__ = ["VerdictService", "apply_verdict"]
