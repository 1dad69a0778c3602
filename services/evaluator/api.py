"""The evaluator's servicers: intake from the scheduler, evaluations, checkpoints and policies (thin)."""

from __future__ import annotations

import base64
import re
import uuid
from datetime import UTC, datetime
from typing import Any

import grpc
from google.protobuf import struct_pb2
from maw.common.v1 import work_pb2
from maw.evaluator.v1 import checkpoint_service_pb2 as cpb
from maw.evaluator.v1 import checkpoint_service_pb2_grpc as cpb_grpc
from maw.evaluator.v1 import evaluation_intake_service_pb2 as ipb
from maw.evaluator.v1 import evaluation_intake_service_pb2_grpc as ipb_grpc
from maw.evaluator.v1 import evaluation_service_pb2 as evpb
from maw.evaluator.v1 import evaluation_service_pb2_grpc as evpb_grpc
from maw.evaluator.v1 import policy_service_pb2 as ppb
from maw.evaluator.v1 import policy_service_pb2_grpc as ppb_grpc
from maw.evaluator.v1 import resources_pb2 as epb
from maw.registry.v1 import activity_intake_service_pb2 as aipb
from maw.registry.v1 import resources_pb2 as rpb
from maw.scheduler.v1 import verdict_service_pb2 as vpb
from sqlalchemy.ext.asyncio import AsyncEngine

from services.runtime import invalid_argument, replay
from services.runtime.errors import MawError, failed_precondition, not_found, permission_denied
from services.runtime.principal import current_principal

from . import _policy, peer_review, review_store, rollback, store, voting
from .judge import Judge
from .verdict_context import (
    effective_policy,
    failed,
    new_verdict,
    now_ts,
    open_or_join_checkpoint,
    task_id_of,
    task_pause,
)

Ctx = grpc.aio.ServicerContext[Any, Any]

_ID = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
_TASK = re.compile(r"^tasks/([a-z0-9][a-z0-9-]{0,62})$")
_SUBTASK = re.compile(r"^tasks/([a-z0-9][a-z0-9-]{0,62})/subtasks/([a-z0-9_-]{1,63})$")
_CLAUSE = re.compile(r'^\s*([a-z_]+)\s*=\s*(?:"([^"]*)"|([A-Za-z0-9_/-]+))\s*$')
MAX_PAGE, DEFAULT_PAGE = 1000, 100


def _name_id(name: str, prefix: str, field: str = "name") -> str:
    ident = name.removeprefix(prefix)
    if not name.startswith(prefix) or not _ID.match(ident):
        raise invalid_argument([(field, f"must be {prefix}{{id}}")])
    return ident


def _filter(text: str, allowed: dict[str, str]) -> dict[str, Any]:
    """`a = "x" AND b = Y` over ``allowed`` fields → {column: value}; anything else is INVALID_ARGUMENT."""
    out: dict[str, Any] = {}
    if not text.strip():
        return out
    for clause in re.split(r"\s+AND\s+", text.strip()):
        match = _CLAUSE.match(clause)
        if not match or match.group(1) not in allowed:
            raise invalid_argument(
                [("filter", f"supported: {' AND '.join(f'{k} = ...' for k in allowed)}; got {clause!r}")]
            )
        out[allowed[match.group(1)]] = match.group(2) if match.group(2) is not None else match.group(3)
    return out


def _page(request_size: int, token: str) -> tuple[int, tuple[datetime, str] | None]:
    if request_size < 0:
        raise invalid_argument([("page_size", "must be 0 or more")])
    size = min(request_size or DEFAULT_PAGE, MAX_PAGE)
    if not token:
        return size, None
    try:
        when, ident = base64.urlsafe_b64decode(token.encode()).decode().split("|", 1)
        return size, (datetime.fromisoformat(when), ident)
    except Exception as exc:
        raise invalid_argument([("page_token", "not a token this list returned")]) from exc


def _token(rows: list[tuple[bytes, datetime, str]], size: int) -> str:
    if len(rows) < size:
        return ""
    _, when, ident = rows[-1]
    return base64.urlsafe_b64encode(f"{when.isoformat()}|{ident}".encode()).decode()


# -- intake (scheduler → evaluator) ------------------------------------------------------------------------------


class EvaluationIntakeService(ipb_grpc.EvaluationIntakeServiceServicer):
    """The scheduler's half of the judgement loop: tasks, results and task updates, idempotent by id."""

    def __init__(self, db: AsyncEngine, judge: Judge) -> None:
        self.db = db
        self.judge = judge

    async def RegisterTask(self, request: ipb.RegisterTaskRequest, context: Ctx) -> ipb.RegisterTaskResponse:
        match = _TASK.match(request.task)
        problems = [] if match else [("task", "must be tasks/{task}")]
        problems += _policy.problems(request.policy)
        if problems:
            raise invalid_argument(problems)
        assert match is not None
        task_id = match.group(1)
        async with self.db.begin() as conn:
            if await store.insert_task(conn, task_id, request.SerializeToString()):
                default = await store.get_policy(conn, _policy.DEFAULT_NAME)
                base = epb.Policy.FromString(default[0]) if default else _policy.default_policy()
                policy = _policy.overlay(base, request.policy)
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
                sub = _SUBTASK.match(result.subtask)
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
                match = _TASK.match(update.task)
                if not match or not update.update_id:
                    why = "update_id and task (tasks/{task}) are required"
                    rejected = ipb.INTAKE_DISPOSITION_REJECTED
                    acks.append(ipb.TaskUpdateAck(update_id=update.update_id, disposition=rejected, message=why))
                    continue
                if update.kind in ended:
                    await store.finish_task(conn, match.group(1), True)
                    while (found := await store.open_checkpoint_of(conn, match.group(1))) is not None:
                        cp = epb.Checkpoint.FromString(found[1])
                        cp.state = epb.CHECKPOINT_STATE_CANCELLED
                        cp.close_time.CopyFrom(now_ts())
                        await store.update_checkpoint(conn, found[0], cp.state, cp.SerializeToString())
                elif update.kind == ipb.TASK_UPDATE_KIND_REOPENED:
                    await store.finish_task(conn, match.group(1), False)
                elif update.kind == ipb.TASK_UPDATE_KIND_AWAITING_ACCEPTANCE and await store.get_task(
                    conn, match.group(1), lock=True
                ):
                    await self._final_acceptance(conn, match.group(1))
                acks.append(ipb.TaskUpdateAck(update_id=update.update_id, disposition=ipb.INTAKE_DISPOSITION_ACCEPTED))
        return ipb.ReportTaskUpdatesResponse(acks=acks)


# -- evaluations -------------------------------------------------------------------------------------------------


class EvaluationService(evpb_grpc.EvaluationServiceServicer):
    """Reading evaluations."""

    def __init__(self, db: AsyncEngine) -> None:
        self.db = db

    async def GetEvaluation(self, request: evpb.GetEvaluationRequest, context: Ctx) -> evpb.GetEvaluationResponse:
        ident = _name_id(request.name, "evaluations/")
        async with self.db.connect() as conn:
            body = await store.get_evaluation(conn, ident)
        if body is None:
            raise not_found("maw.evaluator.v1.Evaluation", request.name)
        return evpb.GetEvaluationResponse(evaluation=epb.Evaluation.FromString(body))

    async def ListEvaluations(self, request: evpb.ListEvaluationsRequest, context: Ctx) -> evpb.ListEvaluationsResponse:
        where = _filter(request.filter, {"task": "task_id", "subtask": "subtask"})
        if "task_id" in where:
            where["task_id"] = task_id_of(where["task_id"])
        size, after = _page(request.page_size, request.page_token)
        async with self.db.connect() as conn:
            rows = await store.list_evaluations(conn, where, after, size)
        return evpb.ListEvaluationsResponse(
            evaluations=[epb.Evaluation.FromString(r[0]) for r in rows], next_page_token=_token(rows, size)
        )


# -- checkpoints -------------------------------------------------------------------------------------------------


_CHECKPOINT_STATES = {
    "OPEN": epb.CHECKPOINT_STATE_OPEN,
    "APPROVED": epb.CHECKPOINT_STATE_APPROVED,
    "REJECTED": epb.CHECKPOINT_STATE_REJECTED,
    "CORRECTED": epb.CHECKPOINT_STATE_CORRECTED,
    "CANCELLED": epb.CHECKPOINT_STATE_CANCELLED,
}
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
        where = _filter(
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
        size, after = _page(request.page_size, request.page_token)
        async with self.db.connect() as conn:
            rows = await store.list_checkpoints(conn, where, after, size)
        return cpb.ListCheckpointsResponse(
            checkpoints=[epb.Checkpoint.FromString(r[0]) for r in rows], next_page_token=_token(rows, size)
        )

    async def GetCheckpoint(self, request: cpb.GetCheckpointRequest, context: Ctx) -> cpb.GetCheckpointResponse:
        ident = _name_id(request.name, "checkpoints/")
        async with self.db.connect() as conn:
            body = await store.get_checkpoint(conn, ident)
            if body is None:
                raise not_found("maw.evaluator.v1.Checkpoint", request.name)
            cp = epb.Checkpoint.FromString(body)
            task_id = task_id_of(cp.task)
            subjects = []
            for subtask in cp.subtasks:
                rows = await store.list_evaluations(conn, {"task_id": task_id, "subtask": subtask}, None, 1000)
                evals = [epb.Evaluation.FromString(r[0]) for r in rows]
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
                            e for e in (epb.Evaluation.FromString(r[0]) for r in history) if e.name != latest.name
                        )
                        _, feedback = await store.corrections_of(conn, task_id, root)
                        subject.previous_feedback.extend(work_feedback(b) for b in feedback)
                subjects.append(subject)
            others = await store.list_checkpoints(conn, {"task_id": task_id}, None, 1000)
            voted = await voting.round_message(conn, cp.voting_round) if cp.voting_round else None
        return cpb.GetCheckpointResponse(
            checkpoint=cp,
            subjects=subjects,
            history=[c for c in (epb.Checkpoint.FromString(r[0]) for r in others) if c.name != cp.name],
            voting_round=voted,
        )

    async def DecideCheckpoint(
        self, request: cpb.DecideCheckpointRequest, context: Ctx
    ) -> cpb.DecideCheckpointResponse:
        caller = current_principal()
        ident = _name_id(request.name, "checkpoints/")
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
            await store.enqueue(conn, store.ACTIVITY, [(task_id, _activity(cp, caller.name, word).SerializeToString())])
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
        match = _TASK.match(given.task)
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
            if task[1]:
                raise failed_precondition("TASK_FINISHED", given.task, "the task has finished")
            if (found := await store.open_checkpoint_of(conn, task_id)) is not None:
                name = epb.Checkpoint.FromString(found[1]).name
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
            opened = _activity(cp, caller.name, "opened", cp.create_time, reason)
            await store.enqueue(conn, store.ACTIVITY, [(task_id, opened.SerializeToString())])
            response = cpb.CreateCheckpointResponse(checkpoint=cp)
            await replay.keep(conn, method, caller.name, request.request_id, response)
        self.judge.poke(store.VERDICTS)
        self.judge.poke(store.ACTIVITY)
        return response

    async def PreviewRollback(self, request: cpb.PreviewRollbackRequest, context: Ctx) -> cpb.PreviewRollbackResponse:
        ident = _name_id(request.name, "checkpoints/")
        return await rollback.preview(self.db, self.judge.settings, ident, request)

    async def RollbackToCheckpoint(
        self, request: cpb.RollbackToCheckpointRequest, context: Ctx
    ) -> cpb.RollbackToCheckpointResponse:
        ident = _name_id(request.name, "checkpoints/")
        caller = current_principal().name
        response = await rollback.roll_back(self.db, self.judge.settings, ident, request, caller, _activity)
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
            latest = epb.Evaluation.FromString(rows[-1][0]) if rows else epb.Evaluation()
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


def _activity(
    cp: epb.Checkpoint, who: str, word: str, when: Any = None, comment: str | None = None
) -> aipb.ActivityRecord:
    comment = cp.decision.comment if comment is None else comment
    details = struct_pb2.Struct()
    details.update({"checkpoint": cp.name, "decision": word, "comment": comment[:2000]})
    entry = rpb.ActivityEntry(
        time=cp.close_time if when is None else when,
        actor=rpb.Actor(kind=rpb.ACTOR_KIND_USER, name=who),
        verb=f"checkpoint.{word}",
        resource=cp.name,
        task=cp.task,
        level=rpb.ACTIVITY_LEVEL_INFO,
        summary=f"{who} {word} {cp.name}" + (f": {comment}" if comment else ""),
        details=details,
        service="evaluator",
    )
    entry.summary = entry.summary[:2000]
    ident = cp.name.removeprefix("checkpoints/")
    kind = "opened" if word == "opened" else "decision"
    return aipb.ActivityRecord(entry_id=f"evaluator-{kind}-{ident}", entry=entry)


# -- policies ---------------------------------------------------------------------------------------------------


class PolicyService(ppb_grpc.PolicyServiceServicer):
    """The default policy and each task's policy (a task's changes reach the scheduler as PolicyChanged)."""

    def __init__(self, db: AsyncEngine, judge: Judge) -> None:
        self.db = db
        self.judge = judge

    @staticmethod
    def _check_name(name: str, field: str) -> None:
        if name != _policy.DEFAULT_NAME and not re.match(r"^tasks/[a-z0-9][a-z0-9-]{0,62}/policy$", name):
            raise invalid_argument([(field, "must be policies/default or tasks/{task}/policy")])

    async def _get(self, conn: Any, name: str) -> epb.Policy:
        stored = await store.get_policy(conn, name)
        if stored is not None:
            return epb.Policy.FromString(stored[0])
        if name == _policy.DEFAULT_NAME:
            return _policy.default_policy()
        raise not_found("maw.evaluator.v1.Policy", name)

    async def GetPolicy(self, request: ppb.GetPolicyRequest, context: Ctx) -> ppb.GetPolicyResponse:
        self._check_name(request.name, "name")
        async with self.db.connect() as conn:
            return ppb.GetPolicyResponse(policy=await self._get(conn, request.name))

    async def UpdatePolicy(self, request: ppb.UpdatePolicyRequest, context: Ctx) -> ppb.UpdatePolicyResponse:
        name = request.policy.name
        self._check_name(name, "policy.name")
        if name == _policy.DEFAULT_NAME and current_principal().role != "admin":
            raise permission_denied("only an admin may change policies/default", "ADMIN_ONLY")
        fields = list(request.update_mask.paths)
        settable = {"weights", "acceptance_threshold", "review_threshold", "max_correction_cycles",
                    "checkpoint_frequency", "triggers", "time_budget", "peer_review", "voting", "scorers"}  # fmt: skip
        bad = [(f"update_mask.paths[{i}]", "not an updatable field") for i, p in enumerate(fields) if p not in settable]
        if not fields:
            bad.append(("update_mask", "name the fields to change"))
        if bad:
            raise invalid_argument(bad)
        problems = _policy.problems(request.policy)
        if problems:
            raise invalid_argument(problems)
        async with self.db.begin() as conn:
            current = await self._get(conn, name)
            if request.policy.etag and request.policy.etag != current.etag:
                raise MawError(grpc.StatusCode.ABORTED, "the policy changed since you read it (etag mismatch)")
            for path in fields:
                current.ClearField(path)  # type: ignore[arg-type]
                value = getattr(request.policy, path)
                if path in ("weights", "triggers", "scorers"):
                    getattr(current, path).extend(value)
                elif path in ("time_budget", "peer_review", "voting"):
                    getattr(current, path).CopyFrom(value)
                else:
                    setattr(current, path, value)
            if current.review_threshold < current.acceptance_threshold:
                raise invalid_argument([("policy.review_threshold", "must not be below acceptance_threshold")])
            current.etag = uuid.uuid4().hex[:16]
            current.update_time.CopyFrom(now_ts())
            await store.put_policy(conn, name, current.SerializeToString(), current.etag)
            if name != _policy.DEFAULT_NAME:  # the scheduler's copy (ERROR, BEFORE_FINAL_ACCEPT) follows, in order
                task_id = name.removeprefix("tasks/").removesuffix("/policy")
                changed = new_verdict(f"tasks/{task_id}", "", 0, "", "")
                changed.policy_changed.policy.CopyFrom(current)
                await store.enqueue(conn, store.VERDICTS, [(task_id, changed.SerializeToString())])
        if name != _policy.DEFAULT_NAME:
            self.judge.poke(store.VERDICTS)
        return ppb.UpdatePolicyResponse(policy=current)


__all__ = ["CheckpointService", "EvaluationIntakeService", "EvaluationService", "PolicyService"]
