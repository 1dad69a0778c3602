"""What the scheduler tells the evaluator: results to judge, through a transactional outbox.

A SUCCEEDED result of a judged subtask (one run by an AI tool) is committed with the subtask in
EVALUATING and, in the same transaction, a row in ``evaluation_outbox`` (:func:`enqueue_results`). The
relay here ships those rows to maw.evaluator.v1.EvaluationIntakeService in batches — RegisterTask for
each task in the batch first (idempotent by task), then SubmitResults (idempotent by result id) — and
deletes the rows only once the evaluator acknowledged them, so a crash of either side repeats a batch
at worst and never loses one. One replica at a time relays (a PostgreSQL advisory lock held for the
round), which keeps the outbox order. The evaluator answers with verdicts (verdicts.py).

A second relay tells the evaluator what it cannot see in results (ReportTaskUpdates): it follows this
schema's task event log with its own cursor (``relay_cursor`` 'evaluation', like the activity relay),
registers each task when its subtasks are planned (so its policy and time budget start at creation, and a
person can open a MANUAL checkpoint before any result), and reports tasks that ended (so open checkpoints
close as CANCELLED and time budgets stop), reopened, or got subtasks. The cursor moves only after the
evaluator acknowledged the batch; every update is idempotent by ``scheduler-event-{id}``.

SHELL and TEST results are not judged: their outcome alone decides, as before.

The ERROR trigger: a judged subtask that fails for good (its last attempt failed) of a task whose effective
policy has CHECKPOINT_TRIGGER_ERROR is not failed by the engine; it goes to EVALUATING with its failed result
in the outbox like a success (:func:`error_holds` decides), and the evaluator holds it at an ERROR
checkpoint. The effective policy is the copy RegisterTask answered (``task_policies``, stored by the relay);
before the task is registered, the triggers the task itself asked for decide.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
import zlib
from collections.abc import Collection, Sequence
from typing import Any

import grpc
from maw.common.v1 import machine_pb2
from maw.evaluator.v1 import evaluation_intake_service_pb2 as ipb
from maw.evaluator.v1 import evaluation_intake_service_pb2_grpc as ipb_grpc
from maw.evaluator.v1 import resources_pb2 as epb
from maw.scheduler.v1 import resources_pb2 as spb
from maw.scheduler.v1 import task_service_pb2 as tpb
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from services.runtime.internal import internal_channel

from . import store
from .names import subtask_name, task_name
from .settings import SchedulerSettings

_log = logging.getLogger("maw.scheduler.evaluation")
RELAY_LOCK = zlib.crc32(b"maw-scheduler-evaluation-relay")
RELAY_BATCH = 500
UPDATES_LOCK = zlib.crc32(b"maw-scheduler-task-update-relay")
UPDATES_BATCH = 1000
UPDATE_KINDS = (tpb.TaskEvent.TASK_STATE_CHANGED_FIELD_NUMBER, tpb.TaskEvent.SUBTASKS_ADDED_FIELD_NUMBER)
_ENDED = {
    spb.TASK_STATE_SUCCEEDED: ipb.TASK_UPDATE_KIND_SUCCEEDED,
    spb.TASK_STATE_FAILED: ipb.TASK_UPDATE_KIND_FAILED,
    spb.TASK_STATE_CANCELLED: ipb.TASK_UPDATE_KIND_CANCELLED,
}


async def with_trigger(conn: AsyncConnection, task_ids: Collection[str], trigger: int) -> set[str]:
    """The tasks among ``task_ids`` whose effective policy has checkpoint ``trigger`` on.

    The effective policy is the copy RegisterTask answered (``task_policies``, kept current by PolicyChanged
    verdicts); before the task is registered, the triggers the task itself asked for decide.
    """
    if not task_ids:
        return set()
    rows = await conn.execute(
        text(
            "SELECT t.id, t.body, p.body FROM tasks t LEFT JOIN task_policies p ON p.task_id = t.id"
            " WHERE t.id = ANY(:i)"
        ),
        {"i": sorted(task_ids)},
    )
    found = set()
    for task_id, body, policy in rows:
        triggers = epb.Policy.FromString(policy).triggers if policy else spb.Task.FromString(body).policy.triggers
        if trigger in triggers:
            found.add(str(task_id))
    return found


async def error_holds(conn: AsyncConnection, task_ids: Collection[str]) -> set[str]:
    """The tasks among ``task_ids`` whose effective policy has the ERROR trigger (their failures wait)."""
    return await with_trigger(conn, task_ids, epb.CHECKPOINT_TRIGGER_ERROR)


async def final_holds(conn: AsyncConnection, task_ids: Collection[str]) -> set[str]:
    """The tasks among ``task_ids`` that wait for a person before they succeed (BEFORE_FINAL_ACCEPT)."""
    return await with_trigger(conn, task_ids, epb.CHECKPOINT_TRIGGER_BEFORE_FINAL_ACCEPT)


FINAL_ACCEPT_REASON = "every subtask is done; waiting for final acceptance"


def lost_attempt(
    task_id: str, key: str, attempt: int, worker: str | None, outcome: int, reason: str
) -> tuple[dict[str, Any], tuple[str, str, int, str]]:
    """A result row for an attempt that ended without one (lease expired, time limit), to hold under ERROR.

    Returns the ``results`` row (store.insert_results) and the outbox item (:func:`enqueue_results`).
    """
    result_id = uuid.uuid4().hex
    body = spb.SubtaskResult(result_id=result_id, attempt=attempt, outcome=outcome, error_message=reason)  # type: ignore[arg-type]
    body.commit_time.GetCurrentTime()
    row = {"task_id": task_id, "key": key, "attempt": attempt, "result_id": result_id, "worker": worker or "",
           "outcome": outcome, "duration_ms": 0, "body": body.SerializeToString()}  # fmt: skip
    return row, (task_id, key, attempt, result_id)


async def enqueue_results(conn: AsyncConnection, items: Sequence[tuple[str, str, int, str]]) -> None:
    """(task, key, attempt, result id) of committed results to judge, in the caller's transaction."""
    if items:
        await conn.execute(
            text(
                "INSERT INTO evaluation_outbox (task_id, key, attempt, result_id) SELECT * FROM"
                " unnest(CAST(:t AS text[]), CAST(:k AS text[]), CAST(:a AS int[]), CAST(:r AS text[]))"
            ),
            {
                "t": [i[0] for i in items],
                "k": [i[1] for i in items],
                "a": [i[2] for i in items],
                "r": [i[3] for i in items],
            },
        )


async def _registration(conn: AsyncConnection, task_id: str) -> ipb.RegisterTaskRequest | None:
    row = (
        await conn.execute(text("SELECT body, creator, create_time FROM tasks WHERE id = :i"), {"i": task_id})
    ).first()
    if row is None:
        return None
    task = spb.Task.FromString(row[0])
    subs = await conn.execute(
        text("SELECT key, body FROM subtasks WHERE task_id = :i ORDER BY ordinal"), {"i": task_id}
    )
    request = ipb.RegisterTaskRequest(
        task=task_name(task_id),
        policy=task.policy,
        description=task.description,
        requirements=task.requirements,
        creator=row[1],
    )
    request.create_time.FromDatetime(row[2])
    for key, body in subs:
        spec = spb.SubtaskSpec.FromString(body)
        request.subtasks.append(
            ipb.RegisteredSubtask(
                name=subtask_name(task_id, key), key=key, type=spec.type, display_name=spec.display_name
            )
        )
    return request


async def _submitted(conn: AsyncConnection, rows: Sequence[Any]) -> list[ipb.SubmittedResult]:
    """The SubmittedResult of each outbox row, from the committed result, subtask and task rows."""
    out = []
    for _, task_id, key, attempt, result_id in rows:
        found = (
            await conn.execute(
                text(
                    "SELECT r.body, r.worker, s.body, s.tool, s.corrects, s.correction_cycle, t.subtask_count,"
                    " t.succeeded_count, s.review_of, s.review_of_attempt, s.solution_of"
                    " FROM results r JOIN subtasks s ON s.task_id = r.task_id AND s.key = r.key"
                    " JOIN tasks t ON t.id = r.task_id WHERE r.task_id = :t AND r.key = :k AND r.attempt = :a"
                ),
                {"t": task_id, "k": key, "a": attempt},
            )
        ).first()
        if found is None:
            continue
        res = spb.SubtaskResult.FromString(found[0])
        spec = spb.SubtaskSpec.FromString(found[2])
        submitted = ipb.SubmittedResult(
            result_id=result_id,
            task=task_name(task_id),
            subtask=subtask_name(task_id, key),
            subtask_key=key,
            display_name=spec.display_name,
            subtask_type=spec.type,
            instructions=spec.description,
            attempt=attempt,
            correction_cycle=found[5],
            corrects=subtask_name(task_id, found[4]) if found[4] else "",
            worker=found[1],
            tool=machine_pb2.ToolChoice(kind=found[3], model=spec.preferred_tool.model),
            outcome=res.outcome,
            exit_code=res.exit_code,
            summary=res.summary,
            output=res.output,
            output_truncated=res.output_truncated,
            diff=res.diff,
            artifacts=res.artifacts,
            token_usage=res.token_usage,
            duration=res.duration,
            error_message=res.error_message,
            task_subtasks_total=found[6],
            task_subtasks_succeeded=found[7],
            review_of=subtask_name(task_id, found[8]) if found[8] else "",
            review_of_attempt=found[9],
            solution_of=subtask_name(task_id, found[10]) if found[10] else "",
        )
        if res.HasField("finish_time"):
            submitted.finish_time.CopyFrom(res.finish_time)
        out.append(submitted)
    return out


def update_of(event_id: int, body: bytes) -> ipb.TaskUpdate | None:
    """The TaskUpdate a task event means for the evaluator (None when it means nothing to it)."""
    event = tpb.TaskEvent.FromString(body)
    update = ipb.TaskUpdate(update_id=f"scheduler-event-{event_id}", task=event.task, time=event.time)
    kind = event.WhichOneof("kind")
    if kind == "task_state_changed":
        change = event.task_state_changed
        if change.task.state in _ENDED:
            update.kind = _ENDED[change.task.state]
        elif change.task.state == spb.TASK_STATE_WAITING_CHECKPOINT and change.reason == FINAL_ACCEPT_REASON:
            update.kind = ipb.TASK_UPDATE_KIND_AWAITING_ACCEPTANCE
        elif change.previous_state in _ENDED:
            update.kind = ipb.TASK_UPDATE_KIND_REOPENED
        else:
            return None
        update.task_subtasks_total = change.task.subtask_count
    elif kind == "subtasks_added":
        update.kind = ipb.TASK_UPDATE_KIND_SUBTASKS_ADDED
        update.subtasks.extend(
            ipb.RegisteredSubtask(name=s.name, key=s.key, type=s.type, display_name=s.display_name)
            for s in event.subtasks_added.subtasks
        )
    else:
        return None
    return update


async def _register(stub: ipb_grpc.EvaluationIntakeServiceAsyncStub, conn: AsyncConnection, task_id: str) -> None:
    """RegisterTask (idempotent by task); a policy the evaluator refuses falls back to the default one."""
    registration = await _registration(conn, task_id)
    if registration is None:
        return
    try:
        reply = await stub.RegisterTask(registration, timeout=30)
    except grpc.aio.AioRpcError as exc:
        if exc.code() != grpc.StatusCode.INVALID_ARGUMENT:
            raise
        # A policy the evaluator refuses must not block the outbox: judge by the default one, keeping the task's
        # own triggers (a task created waiting for AFTER_DECOMPOSITION must still get its checkpoint).
        _log.error("the evaluator refused %s's policy (%s); using the default", task_id, exc.details())
        known = set(epb.CheckpointTrigger.values()) - {epb.CHECKPOINT_TRIGGER_UNSPECIFIED}
        registration.policy.CopyFrom(epb.Policy(triggers=[t for t in registration.policy.triggers if t in known]))
        try:
            reply = await stub.RegisterTask(registration, timeout=30)
        except grpc.aio.AioRpcError as again:
            if again.code() != grpc.StatusCode.INVALID_ARGUMENT:
                raise
            registration.ClearField("policy")
            reply = await stub.RegisterTask(registration, timeout=30)
    # Its own table: the relay's transaction spans RPCs and must not hold the task row's lock meanwhile.
    await store.put_task_policy(conn, task_id, reply.policy.SerializeToString())


class EvaluationLink:
    """The relay of judged results to the evaluator (one per replica; one relays at a time)."""

    def __init__(self, settings: SchedulerSettings, db: AsyncEngine) -> None:
        self.settings = settings
        self.db = db
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def poke(self) -> None:
        """Results may be waiting in the outbox."""
        self._wake.set()

    async def start(self) -> None:
        """Start relaying (it keeps retrying while the evaluator is away)."""
        self._tasks = [asyncio.create_task(self._relay()), asyncio.create_task(self._relay_updates())]

    async def stop(self) -> None:
        """Stop relaying; what is left in the outbox (or after the cursor) goes out after restart."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _relay(self) -> None:
        async with internal_channel(self.settings, self.settings.evaluator_addr) as channel:
            stub: ipb_grpc.EvaluationIntakeServiceAsyncStub = ipb_grpc.EvaluationIntakeServiceStub(channel)
            while True:
                try:
                    shipped = await self.relay_once(stub)
                except Exception as exc:  # evaluator or database away: nothing was removed; retry
                    _log.debug("evaluation relay failed: %s", exc)
                    shipped = 0
                if shipped < RELAY_BATCH:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), timeout=1.0)
                    self._wake.clear()

    async def _relay_updates(self) -> None:
        async with internal_channel(self.settings, self.settings.evaluator_addr) as channel:
            stub: ipb_grpc.EvaluationIntakeServiceAsyncStub = ipb_grpc.EvaluationIntakeServiceStub(channel)
            while True:
                try:
                    shipped = await self.relay_updates_once(stub)
                except Exception as exc:  # evaluator or database away: the cursor did not move; retry
                    _log.debug("task update relay failed: %s", exc)
                    shipped = 0
                if shipped < UPDATES_BATCH:
                    await asyncio.sleep(0.5)

    async def relay_updates_once(self, stub: ipb_grpc.EvaluationIntakeServiceAsyncStub) -> int:
        """Register newly planned tasks and report task updates after the cursor; returns events consumed."""
        async with self.db.begin() as conn:
            if not (await conn.execute(text("SELECT pg_try_advisory_xact_lock(:k)"), {"k": UPDATES_LOCK})).scalar():
                return 0
            cursor = await store.relay_cursor(conn, "evaluation")
            rows = await store.events_after(conn, cursor, UPDATE_KINDS, UPDATES_BATCH)
            if not rows:
                return 0
            for task_id in dict.fromkeys(r.task_id for r in rows if r.kind == UPDATE_KINDS[1]):
                await _register(stub, conn, task_id)
            updates = [u for r in rows if (u := update_of(r.id, r.body)) is not None]
            if updates:
                reply = await stub.ReportTaskUpdates(ipb.ReportTaskUpdatesRequest(updates=updates), timeout=30)
                for ack in reply.acks:
                    if ack.disposition == ipb.INTAKE_DISPOSITION_REJECTED:
                        _log.error("the evaluator rejected task update %s: %s", ack.update_id, ack.message)
            await store.advance_cursor(conn, "evaluation", rows[-1].id)
            return len(rows)

    async def relay_once(self, stub: ipb_grpc.EvaluationIntakeServiceAsyncStub) -> int:
        """Ship one batch; returns how many outbox rows it removed."""
        async with self.db.begin() as conn:
            if not (await conn.execute(text("SELECT pg_try_advisory_xact_lock(:k)"), {"k": RELAY_LOCK})).scalar():
                return 0
            rows = (
                await conn.execute(
                    text("SELECT id, task_id, key, attempt, result_id FROM evaluation_outbox ORDER BY id LIMIT :n"),
                    {"n": RELAY_BATCH},
                )
            ).all()
            if not rows:
                return 0
            for task_id in dict.fromkeys(r[1] for r in rows):
                await _register(stub, conn, task_id)
            results = await _submitted(conn, rows)
            if results:
                reply = await stub.SubmitResults(ipb.SubmitResultsRequest(results=results), timeout=30)
                for ack in reply.acks:
                    if ack.disposition == ipb.INTAKE_DISPOSITION_REJECTED:
                        _log.error("the evaluator rejected result %s: %s", ack.result_id, ack.message)
            await conn.execute(
                text("DELETE FROM evaluation_outbox WHERE id = ANY(:ids)"), {"ids": [r[0] for r in rows]}
            )
            return len(rows)


__all__ = [
    "FINAL_ACCEPT_REASON",
    "EvaluationLink",
    "enqueue_results",
    "error_holds",
    "final_holds",
    "lost_attempt",
    "update_of",
    "with_trigger",
]
