"""maw.evaluator.v1.CheckpointService: the inbox of human decisions, and rollback. Thin."""

from __future__ import annotations

import re
import uuid
from typing import Any

import grpc
from maw.common.v1 import work_pb2
from maw.evaluator.v1 import checkpoint_service_pb2 as cpb
from maw.evaluator.v1 import checkpoint_service_pb2_grpc as cpb_grpc
from maw.evaluator.v1 import evaluation_intake_service_pb2 as ipb
from maw.evaluator.v1 import resources_pb2 as epb
from maw.scheduler.v1 import verdict_service_pb2 as vpb
from sqlalchemy.ext.asyncio import AsyncEngine

from services.runtime import invalid_argument, replay
from services.runtime.errors import MawError, failed_precondition, not_found
from services.runtime.principal import current_principal

from . import review_store, rollback, store, voting
from .activity import checkpoint_activity
from .api_common import TASK, Ctx, enum_words, name_id, next_token, page_of, parse_filter
from .judge import Judge
from .verdict_context import (
    failed,
    new_verdict,
    now_ts,
    open_or_join_checkpoint,
    task_id_of,
    task_pause,
)

_CHECKPOINT_STATES = enum_words(epb.CheckpointState, "CHECKPOINT_STATE_")
_DECIDED = {
    epb.CHECKPOINT_DECISION_APPROVE: (epb.CHECKPOINT_STATE_APPROVED, "approved"),
    epb.CHECKPOINT_DECISION_REJECT: (epb.CHECKPOINT_STATE_REJECTED, "rejected"),
    epb.CHECKPOINT_DECISION_CORRECT: (epb.CHECKPOINT_STATE_CORRECTED, "corrected"),
}


class CheckpointService(cpb_grpc.CheckpointServiceServicer):
    """The inbox of human decisions, and rollback to a checkpoint (rollback.py)."""

    def __init__(self, db: AsyncEngine, judge: Judge) -> None:
        self.db = db
        self.judge = judge

    async def ListCheckpoints(self, request: cpb.ListCheckpointsRequest, context: Ctx) -> cpb.ListCheckpointsResponse:
        where = parse_filter(
            request.filter, {"state": "state", "task": "task_id", "assignee": "assignee", "trigger": "trigger"}
        )
        if "state" in where:
            if where["state"] not in _CHECKPOINT_STATES:
                raise invalid_argument([("filter", f"state is one of {', '.join(_CHECKPOINT_STATES)}")])
            where["state"] = int(_CHECKPOINT_STATES[where["state"]])
        if "trigger" in where:
            triggers = [t.removeprefix("CHECKPOINT_TRIGGER_") for t in epb.CheckpointTrigger.keys()[1:]]
            if where["trigger"] not in triggers:
                raise invalid_argument([("filter", f"trigger is one of {', '.join(triggers)}")])
            where["trigger"] = epb.CheckpointTrigger.Value(f"CHECKPOINT_TRIGGER_{where['trigger']}")
        if "task_id" in where:
            where["task_id"] = task_id_of(where["task_id"])
        size, after = page_of(request.page_size, request.page_token)
        async with self.db.connect() as conn:
            rows = await store.list_checkpoints(conn, where, after, size)
        return cpb.ListCheckpointsResponse(
            checkpoints=[epb.Checkpoint.FromString(r.body) for r in rows], next_page_token=next_token(rows, size)
        )

    async def GetCheckpoint(self, request: cpb.GetCheckpointRequest, context: Ctx) -> cpb.GetCheckpointResponse:
        ident = name_id(request.name, "checkpoints/")
        async with self.db.connect() as conn:
            body = await store.get_checkpoint(conn, ident)
            if body is None:
                raise not_found("maw.evaluator.v1.Checkpoint", request.name)
            cp = epb.Checkpoint.FromString(body)
            task_id = task_id_of(cp.task)
            subjects = []
            for subtask in cp.subtasks:
                rows = await store.list_evaluations(conn, {"task_id": task_id, "subtask": subtask}, None, 1000)
                evals = [epb.Evaluation.FromString(r.body) for r in rows]
                subject = cpb.CheckpointSubject(subtask=subtask)
                if evals:
                    latest = evals[-1]
                    subject.evaluation.CopyFrom(latest)
                    subject.attempt = latest.attempt
                    reviews = await review_store.reviews_of_attempt(conn, task_id, subtask, latest.attempt)
                    subject.reviews.extend(epb.Review.FromString(b) for b in reviews)
                    result_body = await store.result_body(conn, latest.result_id)
                    if result_body is not None:
                        res = ipb.SubmittedResult.FromString(result_body)
                        subject.display_name, subject.subtask_type = res.display_name, res.subtask_type
                        subject.worker, subject.outcome, subject.summary = res.worker, res.outcome, res.summary
                        subject.tool.CopyFrom(res.tool)
                        subject.diff.CopyFrom(res.diff)
                        root = res.corrects or res.subtask
                        history = await store.list_evaluations(conn, {"task_id": task_id, "root": root}, None, 1000)
                        subject.history.extend(
                            e for e in (epb.Evaluation.FromString(r.body) for r in history) if e.name != latest.name
                        )
                        _, feedback = await store.corrections_of(conn, task_id, root)
                        subject.previous_feedback.extend(work_feedback(b) for b in feedback)
                subjects.append(subject)
            others = await store.list_checkpoints(conn, {"task_id": task_id}, None, 1000)
            voted = await voting.round_message(conn, cp.voting_round) if cp.voting_round else None
        return cpb.GetCheckpointResponse(
            checkpoint=cp,
            subjects=subjects,
            history=[c for c in (epb.Checkpoint.FromString(r.body) for r in others) if c.name != cp.name],
            voting_round=voted,
        )

    async def DecideCheckpoint(
        self, request: cpb.DecideCheckpointRequest, context: Ctx
    ) -> cpb.DecideCheckpointResponse:
        caller = current_principal()
        ident = name_id(request.name, "checkpoints/")
        problems = []
        if request.decision not in _DECIDED:
            problems.append(("decision", "must be APPROVE, REJECT or CORRECT"))
        if request.decision == epb.CHECKPOINT_DECISION_CORRECT and not any(f.text.strip() for f in request.feedback):
            problems.append(("feedback", "CORRECT needs at least one feedback entry with text"))
        for i, fb in enumerate(request.feedback):
            if len(fb.text) > 20_000:
                problems.append((f"feedback[{i}].text", "at most 20000 characters"))
        if len(request.request_id) > 128:
            problems.append(("request_id", "at most 128 characters"))
        if problems:
            raise invalid_argument(problems)
        method = "DecideCheckpoint"
        async with self.db.begin() as conn:
            if earlier := await replay.recall(
                conn, method, caller.name, request.request_id, cpb.DecideCheckpointResponse
            ):
                return earlier
            body = await store.get_checkpoint(conn, ident, lock=True)
            if body is None:
                raise not_found("maw.evaluator.v1.Checkpoint", request.name)
            cp = epb.Checkpoint.FromString(body)
            if request.etag and request.etag != cp.etag:
                raise MawError(grpc.StatusCode.ABORTED, "the checkpoint changed since you read it (etag mismatch)")
            if cp.state != epb.CHECKPOINT_STATE_OPEN:
                closed = epb.CheckpointState.Name(cp.state).removeprefix("CHECKPOINT_STATE_")
                raise failed_precondition("CHECKPOINT_CLOSED", request.name, f"the checkpoint is already {closed}")
            bad = [(f"correct_subtasks[{i}]", "not one of the checkpoint's subtasks")
                   for i, s in enumerate(request.correct_subtasks) if s not in cp.subtasks]  # fmt: skip
            if request.decision == epb.CHECKPOINT_DECISION_CORRECT and not cp.subtasks:
                bad.append(("decision", "this checkpoint holds no results to correct; APPROVE or REJECT it"))
            if bad:
                raise invalid_argument(bad)
            task_id = task_id_of(cp.task)
            state, word = _DECIDED[request.decision]
            feedback = [work_feedback(f.SerializeToString()) for f in request.feedback]
            for fb in feedback:
                fb.author = fb.author or caller.name
            # A tied vote's choice (voting.py) goes first: SelectSolution, then the per-subtask verdicts below.
            verdicts = await voting.decide_at_checkpoint(conn, cp, request, caller.name)
            verdicts += await self._verdicts(conn, cp, request, feedback)
            cp.state = state
            cp.close_time.CopyFrom(now_ts())
            cp.etag = uuid.uuid4().hex[:16]
            cp.decision.CopyFrom(
                epb.Decision(
                    decision=request.decision,
                    feedback=feedback,
                    apply_to_future=request.apply_to_future,
                    correct_subtasks=request.correct_subtasks,
                    selected_solution=request.selected_solution,
                    comment=request.comment,
                    decided_by=caller.name,
                    decide_time=cp.close_time,
                )
            )
            await store.update_checkpoint(conn, ident, cp.state, cp.SerializeToString())
            await store.enqueue(conn, store.VERDICTS, [(task_id, v.SerializeToString()) for v in verdicts])
            await store.enqueue(
                conn, store.ACTIVITY, [(task_id, checkpoint_activity(cp, caller.name, word).SerializeToString())]
            )
            response = cpb.DecideCheckpointResponse(checkpoint=cp)
            await replay.keep(conn, method, caller.name, request.request_id, response)
        self.judge.poke(store.VERDICTS)
        self.judge.poke(store.ACTIVITY)
        return response

    async def CreateCheckpoint(
        self, request: cpb.CreateCheckpointRequest, context: Ctx
    ) -> cpb.CreateCheckpointResponse:
        caller = current_principal()
        given = request.checkpoint
        match = TASK.match(given.task)
        problems = [] if match else [("checkpoint.task", "must be tasks/{task}")]
        if len(given.reason) > 2000:
            problems.append(("checkpoint.reason", "at most 2000 characters"))
        if given.subtasks:
            problems.append(("checkpoint.subtasks", "a manual checkpoint pauses the whole task; leave subtasks empty"))
        if given.assignee and not re.match(r"^users/[A-Za-z0-9_.@-]{1,128}$", given.assignee):
            problems.append(("checkpoint.assignee", "must be users/{user}"))
        if len(request.request_id) > 128:
            problems.append(("request_id", "at most 128 characters"))
        if problems:
            raise invalid_argument(problems)
        assert match is not None
        task_id = match.group(1)
        method = "CreateCheckpoint"
        async with self.db.begin() as conn:
            if earlier := await replay.recall(
                conn, method, caller.name, request.request_id, cpb.CreateCheckpointResponse
            ):
                return earlier
            task = await store.get_task(conn, task_id, lock=True)
            if task is None:
                raise not_found("maw.scheduler.v1.Task", given.task)
            if task.finished:
                raise failed_precondition("TASK_FINISHED", given.task, "the task has finished")
            if (found := await store.open_checkpoint_of(conn, task_id)) is not None:
                name = epb.Checkpoint.FromString(found.body).name
                raise failed_precondition("CHECKPOINT_OPEN", given.task, f"the task already waits at {name}")
            reason = given.reason or f"opened by {caller.name}"
            cp, _ = await open_or_join_checkpoint(
                conn, given.task, "", epb.CHECKPOINT_TRIGGER_MANUAL, reason, 0, creator=caller.name
            )
            if given.assignee:
                cp.assignee = given.assignee
                await store.update_checkpoint(conn, cp.name.removeprefix("checkpoints/"), cp.state,
                                              cp.SerializeToString())  # fmt: skip
            await store.enqueue(conn, store.VERDICTS, [(task_id, task_pause(cp).SerializeToString())])
            opened = checkpoint_activity(cp, caller.name, "opened", cp.create_time, reason)
            await store.enqueue(conn, store.ACTIVITY, [(task_id, opened.SerializeToString())])
            response = cpb.CreateCheckpointResponse(checkpoint=cp)
            await replay.keep(conn, method, caller.name, request.request_id, response)
        self.judge.poke(store.VERDICTS)
        self.judge.poke(store.ACTIVITY)
        return response

    async def PreviewRollback(self, request: cpb.PreviewRollbackRequest, context: Ctx) -> cpb.PreviewRollbackResponse:
        ident = name_id(request.name, "checkpoints/")
        return await rollback.preview(self.db, self.judge.settings, ident, request)

    async def RollbackToCheckpoint(
        self, request: cpb.RollbackToCheckpointRequest, context: Ctx
    ) -> cpb.RollbackToCheckpointResponse:
        ident = name_id(request.name, "checkpoints/")
        caller = current_principal().name
        response = await rollback.roll_back(self.db, self.judge.settings, ident, request, caller)
        self.judge.poke(store.VERDICTS)
        self.judge.poke(store.ACTIVITY)
        return response

    async def _verdicts(
        self, conn: Any, cp: epb.Checkpoint, request: cpb.DecideCheckpointRequest, feedback: list[Any]
    ) -> list[vpb.Verdict]:
        """The verdicts a decision sends: one per held subtask, then Resume (or CancelTask for REJECT)."""
        task_id = task_id_of(cp.task)
        if request.decision == epb.CHECKPOINT_DECISION_REJECT:
            verdict = new_verdict(cp.task, "", 0, "", "")
            verdict.cancel_task.checkpoint = cp.name
            verdict.cancel_task.reason = request.comment or f"rejected at {cp.name}"
            return [verdict]
        out = []
        to_correct = set(request.correct_subtasks or cp.subtasks)
        for subtask in cp.subtasks:
            rows = await store.list_evaluations(conn, {"task_id": task_id, "subtask": subtask}, None, 1000)
            latest = epb.Evaluation.FromString(rows[-1].body) if rows else epb.Evaluation()
            verdict = new_verdict(cp.task, subtask, latest.attempt, latest.result_id, latest.name)
            verdict.score, verdict.grade = latest.overall_score, latest.grade
            if request.decision == epb.CHECKPOINT_DECISION_CORRECT and subtask in to_correct:
                result_body = await store.result_body(conn, latest.result_id) if latest.result_id else None
                res = ipb.SubmittedResult.FromString(result_body) if result_body else ipb.SubmittedResult()
                root = res.corrects or subtask
                verdict.correct.feedback.extend(feedback)
                verdict.correct.apply_to_future = request.apply_to_future
                verdict.correct.checkpoint = cp.name
                verdict.correct.instructions = "\n".join(
                    ["A reviewer asked for a revision of your previous result:"] + [f"- {f.text}" for f in feedback]
                )
                verdict.correct.correction_cycle = await store.bump_corrections(
                    conn, task_id, root, [f.SerializeToString() for f in feedback]
                )
            elif await self._held_failure(conn, latest.result_id):
                # APPROVE at an ERROR checkpoint accepts the failure: the subtask fails (and the task with it).
                verdict.reject.reason = f"the failure was accepted at {cp.name}"
            else:
                verdict.accept.SetInParent()
            out.append(verdict)
        resume = new_verdict(cp.task, "", 0, "", "")
        resume.resume.checkpoint = cp.name
        out.append(resume)
        return out

    @staticmethod
    async def _held_failure(conn: Any, result_id: str) -> bool:
        """Whether the held result is a failure (ERROR trigger) rather than a scored success."""
        body = await store.result_body(conn, result_id) if result_id else None
        return body is not None and failed(ipb.SubmittedResult.FromString(body))


def work_feedback(body: bytes) -> Any:
    """A Feedback message from its bytes."""
    return work_pb2.Feedback.FromString(body)


__all__ = ["CheckpointService", "work_feedback"]
