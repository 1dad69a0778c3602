"""Ending tasks: a task whose subtasks are all done succeeds (or waits for final acceptance), one with a subtask
failed for good fails, and the stop orders for attempts that must not run on are collected for after commit.

Every writer that changes subtask counters (committer, lease keeper, verdicts, rollback) calls
:func:`settle_tasks` in the same transaction.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from maw.agent.v1 import agent_service_pb2 as apb
from sqlalchemy.ext.asyncio import AsyncConnection

from . import store
from .evaluation_link import final_holds
from .events import EventLog
from .states import LEASED, TERMINAL_TASK, SubtaskState, TaskState, task_outcome
from .wire import now_utc

FINAL_ACCEPT_REASON = "every subtask is done; waiting for final acceptance"

# tasks.final_accept: BEFORE_FINAL_ACCEPT not asked yet, waiting for a person, given.
FINAL_ACCEPT_NONE, FINAL_ACCEPT_WAITING, FINAL_ACCEPT_GIVEN = 0, 1, 2


def cancel_leases(out: list[dict[str, Any]], rows: Iterable[store.SubtaskRow], reason: int, message: str) -> None:
    """Collect stop orders for whoever runs these; the engine delivers them after commit."""
    for row in rows:
        if row.state in LEASED and row.worker:
            out.append({"worker": row.worker, "task": row.task_id, "key": row.key, "attempt": row.attempt,
                        "reason": reason, "message": message})  # fmt: skip


async def settle_tasks(
    conn: AsyncConnection, tasks: dict[str, store.TaskRow], events: EventLog, cancels: list[dict[str, Any]]
) -> None:
    """Finish tasks whose subtasks are all done, or fail those with a subtask failed for good.

    A task whose policy has BEFORE_FINAL_ACCEPT waits (WAITING_CHECKPOINT, ``final_accept`` waiting) instead of
    succeeding; the evaluator opens its checkpoint, and the Resume it sends later finishes it (verdicts.py).
    """
    outcomes = {}
    for row in tasks.values():
        if row.state in TERMINAL_TASK:
            continue
        outcome = task_outcome(
            row.subtask_count, row.succeeded_count, row.failed_count, row.cancelled_count, row.excused_count
        )
        if outcome is not None:
            outcomes[row.id] = outcome
    asking = [
        t for t, o in outcomes.items() if o == TaskState.SUCCEEDED and tasks[t].final_accept != FINAL_ACCEPT_GIVEN
    ]
    held = await final_holds(conn, asking) if asking else set()
    for task_id, outcome in outcomes.items():
        row = tasks[task_id]
        if task_id in held:
            if row.final_accept != FINAL_ACCEPT_WAITING:
                await store.update_task(conn, row.id, state=int(TaskState.WAITING_CHECKPOINT),
                                        final_accept=FINAL_ACCEPT_WAITING, state_message=FINAL_ACCEPT_REASON,
                                        running_count=0)  # fmt: skip
                events.move_task(row, TaskState.WAITING_CHECKPOINT, FINAL_ACCEPT_REASON)
                row.final_accept = FINAL_ACCEPT_WAITING
            continue
        reason = "all subtasks succeeded" if outcome == TaskState.SUCCEEDED else "a subtask failed"
        if outcome == TaskState.FAILED:
            cancelled = await store.cancel_live_subtasks(conn, [row.id], "the task failed")
            cancel_leases(cancels, cancelled, apb.CANCEL_REASON_TASK_CANCELLED, "the task failed")
            for sub in cancelled:
                events.subtask_state(sub.task_id, sub.key, sub.state, SubtaskState.CANCELLED, sub.attempt, None, reason)
        await store.update_task(conn, row.id, state=int(outcome), state_message=reason, end_time=now_utc(),
                                running_count=0)  # fmt: skip
        events.move_task(row, outcome, reason)
