"""maw.evaluator.v1.EvaluationIntakeService: the scheduler's tasks, results and task updates. Thin."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from maw.common.v1 import work_pb2
from maw.evaluator.v1 import evaluation_intake_service_pb2 as ipb
from maw.evaluator.v1 import evaluation_intake_service_pb2_grpc as ipb_grpc
from maw.evaluator.v1 import resources_pb2 as epb
from sqlalchemy.ext.asyncio import AsyncEngine

from services.runtime import invalid_argument

from . import peer_review, policies, store
from .api_common import SUBTASK, TASK, Ctx
from .judge import Judge
from .verdict_context import (
    effective_policy,
    new_verdict,
    now_ts,
    open_or_join_checkpoint,
    task_id_of,
    task_pause,
)


class EvaluationIntakeService(ipb_grpc.EvaluationIntakeServiceServicer):
    """The scheduler's half of the judgement loop: tasks, results and task updates, idempotent by id."""

    def __init__(self, db: AsyncEngine, judge: Judge) -> None:
        self.db = db
        self.judge = judge

    async def RegisterTask(self, request: ipb.RegisterTaskRequest, context: Ctx) -> ipb.RegisterTaskResponse:
        match = TASK.match(request.task)
        problems = [] if match else [("task", "must be tasks/{task}")]
        problems += policies.problems(request.policy)
        if problems:
            raise invalid_argument(problems)
        assert match is not None
        task_id = match.group(1)
        async with self.db.begin() as conn:
            if await store.insert_task(conn, task_id, request.SerializeToString()):
                default = await store.get_policy(conn, policies.DEFAULT_NAME)
                base = epb.Policy.FromString(default.body) if default else policies.default_policy()
                policy = policies.overlay(base, request.policy)
                policy.name = f"tasks/{task_id}/policy"
                policy.etag = uuid.uuid4().hex[:16]
                policy.update_time.CopyFrom(now_ts())
                await store.put_policy(conn, policy.name, policy.SerializeToString(), policy.etag)
                budget = policy.time_budget.ToTimedelta()
                if budget.total_seconds() > 0:
                    given = request.HasField("create_time")
                    start = request.create_time.ToDatetime(UTC) if given else datetime.now(UTC)
                    await store.set_budget(conn, task_id, start + budget)
                if epb.CHECKPOINT_TRIGGER_AFTER_DECOMPOSITION in policy.triggers:
                    await self._confirm_plan(conn, request)
                return ipb.RegisterTaskResponse(policy=policy)
        async with self.db.connect() as conn:
            return ipb.RegisterTaskResponse(policy=await effective_policy(conn, task_id))

    async def _confirm_plan(self, conn: Any, request: ipb.RegisterTaskRequest) -> None:
        """AFTER_DECOMPOSITION: the task waits at a checkpoint until a person confirms its plan."""
        plan = ", ".join(f"{s.key} ({work_pb2.SubtaskType.Name(s.type).removeprefix('SUBTASK_TYPE_').lower()})"
                         for s in request.subtasks)  # fmt: skip
        reason = f"confirm the plan before work starts: {len(request.subtasks)} subtasks: {plan}"[:2000]
        cp, opened = await open_or_join_checkpoint(
            conn, request.task, "", epb.CHECKPOINT_TRIGGER_AFTER_DECOMPOSITION, reason, 0
        )
        if opened:
            await store.enqueue(conn, store.VERDICTS, [(task_id_of(request.task), task_pause(cp).SerializeToString())])
            self.judge.poke(store.VERDICTS)

    async def _final_acceptance(self, conn: Any, task_id: str) -> None:
        """Every subtask is done and the scheduler holds the task: open BEFORE_FINAL_ACCEPT, or let it succeed."""
        task = f"tasks/{task_id}"
        policy = await effective_policy(conn, task_id)
        if epb.CHECKPOINT_TRIGGER_BEFORE_FINAL_ACCEPT not in policy.triggers:  # turned off since: no person is asked
            resume = new_verdict(task, "", 0, "", "")
            resume.resume.checkpoint = ""
            await store.enqueue(conn, store.VERDICTS, [(task_id, resume.SerializeToString())])
        else:
            reason = "every subtask is done; confirm before the task succeeds"
            cp, opened = await open_or_join_checkpoint(
                conn, task, "", epb.CHECKPOINT_TRIGGER_BEFORE_FINAL_ACCEPT, reason, 100
            )
            if opened:
                await store.enqueue(conn, store.VERDICTS, [(task_id, task_pause(cp).SerializeToString())])
        self.judge.poke(store.VERDICTS)

    async def SubmitResults(self, request: ipb.SubmitResultsRequest, context: Ctx) -> ipb.SubmitResultsResponse:
        if len(request.results) > 500:
            raise invalid_argument([("results", "at most 500 per call")])
        acks = []
        async with self.db.begin() as conn:
            for result in request.results:
                ack = ipb.SubmitResultAck(result_id=result.result_id)
                sub = SUBTASK.match(result.subtask)
                why = (
                    "result_id is required" if not result.result_id
                    else "subtask must be tasks/{task}/subtasks/{subtask}" if not sub
                    else "task does not match subtask" if result.task != f"tasks/{sub.group(1)}"
                    else ""
                )  # fmt: skip
                if why:
                    ack.disposition, ack.message = ipb.INTAKE_DISPOSITION_REJECTED, why
                    acks.append(ack)
                    continue
                evaluation_id = uuid.uuid4().hex[:20]
                got = await store.insert_result(
                    conn, result.result_id, task_id_of(result.task), result.subtask, evaluation_id,
                    result.SerializeToString(),
                )  # fmt: skip
                kind = "reviews/" if peer_review.is_review(result) else "evaluations/"  # a REVIEW becomes a review
                if got is None:
                    ack.disposition = ipb.INTAKE_DISPOSITION_DUPLICATE
                    ack.evaluation = f"{kind}{await store.evaluation_of_result(conn, result.result_id)}"
                else:
                    ack.disposition, ack.evaluation = ipb.INTAKE_DISPOSITION_ACCEPTED, f"{kind}{got}"
                acks.append(ack)
        self.judge.poke()
        return ipb.SubmitResultsResponse(acks=acks)

    async def ReportTaskUpdates(
        self, request: ipb.ReportTaskUpdatesRequest, context: Ctx
    ) -> ipb.ReportTaskUpdatesResponse:
        ended = {ipb.TASK_UPDATE_KIND_SUCCEEDED, ipb.TASK_UPDATE_KIND_FAILED, ipb.TASK_UPDATE_KIND_CANCELLED}
        acks = []
        async with self.db.begin() as conn:
            for update in request.updates:
                match = TASK.match(update.task)
                if not match or not update.update_id:
                    why = "update_id and task (tasks/{task}) are required"
                    rejected = ipb.INTAKE_DISPOSITION_REJECTED
                    acks.append(ipb.TaskUpdateAck(update_id=update.update_id, disposition=rejected, message=why))
                    continue
                if update.kind in ended:
                    await store.finish_task(conn, match.group(1), True)
                    while (found := await store.open_checkpoint_of(conn, match.group(1))) is not None:
                        cp = epb.Checkpoint.FromString(found.body)
                        cp.state = epb.CHECKPOINT_STATE_CANCELLED
                        cp.close_time.CopyFrom(now_ts())
                        await store.update_checkpoint(conn, found.id, cp.state, cp.SerializeToString())
                elif update.kind == ipb.TASK_UPDATE_KIND_REOPENED:
                    await store.finish_task(conn, match.group(1), False)
                elif update.kind == ipb.TASK_UPDATE_KIND_AWAITING_ACCEPTANCE and await store.get_task(
                    conn, match.group(1), lock=True
                ):
                    await self._final_acceptance(conn, match.group(1))
                acks.append(ipb.TaskUpdateAck(update_id=update.update_id, disposition=ipb.INTAKE_DISPOSITION_ACCEPTED))
        return ipb.ReportTaskUpdatesResponse(acks=acks)


__all__ = ["EvaluationIntakeService"]
