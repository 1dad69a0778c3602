"""What applying one verdict shares across its actions (verdicts.py, reviews.py, voting.py, rollback.py).

A verdict is applied in one transaction; :class:`VerdictContext` holds that transaction, the verdict, the
events and stop orders made so far, and the checked transitions. An action that cannot apply raises
:class:`Outcome` with the disposition to report; nothing it did is kept.
"""

from __future__ import annotations

from typing import Any

from maw.scheduler.v1 import verdict_service_pb2 as vpb
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from . import store
from .events import EventLog
from .names import try_parse_subtask
from .settle import settle_tasks
from .states import SubtaskState, TaskState, TransitionError, check_subtask, check_task

S, T = SubtaskState, TaskState
APPLIED, DUPLICATE = vpb.VERDICT_DISPOSITION_APPLIED, vpb.VERDICT_DISPOSITION_DUPLICATE
STALE, REJECTED = vpb.VERDICT_DISPOSITION_STALE, vpb.VERDICT_DISPOSITION_REJECTED
HELD = (S.EVALUATING, S.CORRECTING, S.WAITING_CHECKPOINT)


class Outcome(Exception):
    """Ends applying one verdict with a disposition other than APPLIED (nothing it did is kept)."""

    def __init__(self, disposition: int, message: str) -> None:
        super().__init__(message)
        self.disposition = disposition
        self.message = message


class VerdictContext:
    """One verdict being applied inside one transaction: what it touches, and the writes it made so far."""

    def __init__(self, conn: AsyncConnection, verdict: vpb.Verdict) -> None:
        self.conn = conn
        self.v = verdict
        self.events = EventLog()
        self.cancels: list[dict[str, Any]] = []
        self.created: list[str] = []
        self.ready = False
        self.task_id = verdict.task.removeprefix("tasks/")

    async def task(self) -> store.TaskRow:
        """The verdict's task, locked (REJECTED when unknown)."""
        rows = await store.lock_tasks(self.conn, [self.task_id])
        row = rows.get(self.task_id)
        if row is None:
            raise Outcome(REJECTED, f"unknown task {self.v.task!r}")
        return row

    async def subtask(self) -> store.SubtaskRow:
        """The judged subtask, locked; STALE unless it still waits for a verdict on this attempt."""
        pair = try_parse_subtask(self.v.subtask)
        if pair is None or pair[0] != self.task_id:
            raise Outcome(REJECTED, f"subtask {self.v.subtask!r} is not a subtask of {self.v.task!r}")
        rows = await store.lock_subtasks(self.conn, [pair])
        row = rows.get(pair)
        if row is None:
            raise Outcome(REJECTED, f"unknown subtask {self.v.subtask!r}")
        if row.attempt != self.v.attempt:
            raise Outcome(STALE, f"attempt {self.v.attempt} was superseded by attempt {row.attempt}")
        if row.state not in HELD:
            raise Outcome(STALE, f"the subtask is {S(row.state).name}, not waiting for a verdict")
        return row

    def move(self, row: store.SubtaskRow, new: SubtaskState, reason: str = "") -> None:
        """The checked transition of a subtask; a transition the state machine refuses makes the verdict STALE."""
        try:
            check_subtask(S(row.state), new)
        except TransitionError as exc:
            raise Outcome(STALE, str(exc)) from exc
        self.events.subtask_state(row.task_id, row.key, row.state, new, row.attempt, row.worker, reason)
        row.state = new

    def move_task(self, row: store.TaskRow, new: TaskState, reason: str) -> None:
        """The checked transition of the task (STALE when refused)."""
        try:
            check_task(T(row.state), new)
        except TransitionError as exc:
            raise Outcome(STALE, str(exc)) from exc
        self.events.task_state(row, row.state, new, reason)
        row.state = new

    async def settle(self, deltas: dict[str, int]) -> None:
        """Add to the task's counters and end it if that decides it."""
        tasks = await store.bump_task_counters(self.conn, {self.task_id: deltas})
        await settle_tasks(self.conn, tasks, self.events, self.cancels)

    async def judged(self, row: store.SubtaskRow) -> None:
        """Record the verdict's evaluation on the subtask."""
        await self.conn.execute(
            text(
                "UPDATE subtasks SET evaluation = :e, evaluation_score = :s, grade = :g, update_time = now()"
                " WHERE task_id = :t AND key = :k"
            ),
            {"e": self.v.evaluation, "s": self.v.score, "g": int(self.v.grade), "t": row.task_id, "k": row.key},
        )
