"""Rolling a task back to a checkpoint: the evaluator's half of PreviewRollback and RollbackToCheckpoint."""

from __future__ import annotations

import hashlib
import uuid
from typing import Any

import grpc
from maw.evaluator.v1 import checkpoint_service_pb2 as cpb
from maw.evaluator.v1 import resources_pb2 as epb
from maw.scheduler.v1 import resources_pb2 as spb
from maw.scheduler.v1 import verdict_service_pb2 as vpb
from maw.scheduler.v1 import verdict_service_pb2_grpc as vpb_grpc
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from services.runtime import invalid_argument, replay
from services.runtime.errors import MawError, failed_precondition, not_found, unavailable
from services.runtime.internal import internal_channel

from . import store, voting
from .activity import checkpoint_activity
from .settings import EvaluatorSettings
from .verdict_context import new_verdict, now_ts, task_id_of

METHOD = "RollbackToCheckpoint"
_CANCELLED = (spb.TASK_STATE_CANCELLING, spb.TASK_STATE_CANCELLED)


async def plan_of(settings: EvaluatorSettings, cp: epb.Checkpoint) -> vpb.GetRollbackPlanResponse:
    """The scheduler's plan for rolling ``cp``'s task back to it; FAILED_PRECONDITION for a cancelled task."""
    async with internal_channel(settings, settings.scheduler_addr) as channel:
        stub: vpb_grpc.VerdictServiceAsyncStub = vpb_grpc.VerdictServiceStub(channel)
        try:
            plan = await stub.GetRollbackPlan(vpb.GetRollbackPlanRequest(task=cp.task, checkpoint=cp.name), timeout=15)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.FAILED_PRECONDITION:
                raise failed_precondition(
                    "NOT_PAUSED_YET", cp.name, "the task has not paused at this checkpoint yet; try again shortly"
                ) from exc
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                raise not_found("maw.scheduler.v1.Task", cp.task) from exc
            raise unavailable(f"the scheduler could not plan the rollback ({exc.code().name})") from exc
    if plan.task_state in _CANCELLED:
        raise failed_precondition("TASK_CANCELLED", cp.task, "the task was cancelled; it cannot be rolled back")
    return plan


def etag_of(cp: epb.Checkpoint, plan: vpb.GetRollbackPlanResponse) -> str:
    """The preview's etag: changes with the checkpoint (its etag) and with the task's subtasks (the plan)."""
    return hashlib.sha256(f"{cp.etag}|{plan.version}".encode()).hexdigest()[:20]


async def effect_of(
    conn: AsyncConnection, ident: str, cp: epb.Checkpoint, plan: vpb.GetRollbackPlanResponse, lock: bool = False
) -> tuple[cpb.RollbackEffect, list[store.CheckpointRow]]:
    """What the rollback changes, and the later checkpoints' rows (for closing them)."""
    later = await store.checkpoints_after(conn, task_id_of(cp.task), ident, lock)
    closed = ([cp.name] if cp.state == epb.CHECKPOINT_STATE_OPEN else []) + [
        epb.Checkpoint.FromString(row.body).name for row in later
    ]
    superseded = await store.evaluations_since(conn, task_id_of(cp.task), plan.reset_subtasks, ident)
    effect = cpb.RollbackEffect(
        reset_subtasks=plan.reset_subtasks,
        cancelled_subtasks=plan.cancelled_subtasks,
        closed_checkpoints=closed,
        superseded_evaluations=[f"evaluations/{i}" for i in superseded],
        progress_percent=plan.progress_percent,
        excused_subtasks=plan.excused_subtasks,
    )
    return effect, later


async def preview(
    db: AsyncEngine, settings: EvaluatorSettings, ident: str, request: cpb.PreviewRollbackRequest
) -> cpb.PreviewRollbackResponse:
    """CheckpointService.PreviewRollback: the effect and its etag; changes nothing."""
    async with db.connect() as conn:
        body = await store.get_checkpoint(conn, ident)
    if body is None:
        raise not_found("maw.evaluator.v1.Checkpoint", request.name)
    cp = epb.Checkpoint.FromString(body)
    plan = await plan_of(settings, cp)
    async with db.connect() as conn:
        effect, _ = await effect_of(conn, ident, cp, plan)
    return cpb.PreviewRollbackResponse(effect=effect, etag=etag_of(cp, plan))


async def roll_back(
    db: AsyncEngine, settings: EvaluatorSettings, ident: str, request: cpb.RollbackToCheckpointRequest,
    caller: str,
) -> cpb.RollbackToCheckpointResponse:  # fmt: skip
    """CheckpointService.RollbackToCheckpoint."""
    problems = []
    if len(request.comment) > 2000:
        problems.append(("comment", "at most 2000 characters"))
    if len(request.request_id) > 128:
        problems.append(("request_id", "at most 128 characters"))
    if problems:
        raise invalid_argument(problems)
    async with db.connect() as conn:
        if earlier := await replay.recall(conn, METHOD, caller, request.request_id, cpb.RollbackToCheckpointResponse):
            return earlier
        body = await store.get_checkpoint(conn, ident)
    if body is None:
        raise not_found("maw.evaluator.v1.Checkpoint", request.name)
    plan = await plan_of(settings, epb.Checkpoint.FromString(body))
    async with db.begin() as conn:
        if earlier := await replay.recall(conn, METHOD, caller, request.request_id, cpb.RollbackToCheckpointResponse):
            return earlier
        task_id = task_id_of(epb.Checkpoint.FromString(body).task)
        # The task first, then its checkpoints: the order judging takes them in (no deadlock with it).
        await store.get_task(conn, task_id, lock=True)
        cp = epb.Checkpoint.FromString(await store.get_checkpoint(conn, ident, lock=True) or body)
        if request.etag and request.etag != etag_of(cp, plan):
            raise MawError(grpc.StatusCode.ABORTED, "the checkpoint or its task changed since the preview (etag)")
        effect, later = await effect_of(conn, ident, cp, plan, lock=True)
        now = now_ts()
        for row in later:
            other = epb.Checkpoint.FromString(row.body)
            if other.state == epb.CHECKPOINT_STATE_OPEN:
                _close(other, now)
                await store.update_checkpoint(conn, row.id, other.state, other.SerializeToString())
        if cp.state == epb.CHECKPOINT_STATE_OPEN:
            _close(cp, now)
        cp.rollback_time.CopyFrom(now)
        cp.etag = uuid.uuid4().hex[:16]
        cp.completed_subtasks[:] = plan.completed_subtasks
        await store.update_checkpoint(conn, ident, cp.state, cp.SerializeToString())
        await _forget(conn, task_id, list(plan.reset_subtasks), list(plan.excused_subtasks))
        await store.supersede_attempts(conn, task_id, dict(plan.attempts))
        verdict = new_verdict(cp.task, "", 0, "", "")
        verdict.rollback.checkpoint = cp.name
        verdict.rollback.reset_subtasks.extend(plan.reset_subtasks)
        await store.enqueue(conn, store.VERDICTS, [(task_id, verdict.SerializeToString())])
        record = checkpoint_activity(cp, caller, "rolled_back", now, request.comment)
        record.entry_id = f"evaluator-rollback-{ident}-{uuid.uuid4().hex[:12]}"
        resets = len(plan.reset_subtasks)
        record.entry.summary = (f"{caller} rolled {cp.task} back to {cp.name} ({resets} subtasks reset)"
                                + (f": {request.comment}" if request.comment else ""))[:2000]  # fmt: skip
        await store.enqueue(conn, store.ACTIVITY, [(task_id, record.SerializeToString())])
        response = cpb.RollbackToCheckpointResponse(checkpoint=cp, effect=effect)
        await replay.keep(conn, METHOD, caller, request.request_id, response)
    return response


def _close(cp: epb.Checkpoint, when: Any) -> None:
    cp.state = epb.CHECKPOINT_STATE_CANCELLED
    cp.close_time.CopyFrom(when)
    cp.etag = uuid.uuid4().hex[:16]


async def _forget(conn: AsyncConnection, task_id: str, reset: list[str], excused: list[str]) -> None:
    """Correction cycles of reset subtasks start again (their feedback stays, as history); their results and
    those of the cancelled extras that wait to be judged are dropped (the scheduler would find them STALE)."""
    await store.reset_corrections(conn, task_id, reset)
    await store.drop_pending(conn, task_id, reset + excused)
    await voting.forget_rounds(conn, task_id, reset)  # the reset solutions vote again, in a new round


__all__ = ["effect_of", "etag_of", "plan_of", "preview", "roll_back"]
