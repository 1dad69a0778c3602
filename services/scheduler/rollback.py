"""Rolling a task back to a checkpoint: the scheduler's half (GetRollbackPlan and the Rollback verdict).

The scheduler is the one that knows subtask states, so it keeps the *mark* of each checkpoint: when it first
applies a Pause for checkpoint C (verdicts.py), it records the task's SUCCEEDED subtasks at that moment, and the
subtasks held at C (the one of that Pause and of every later Pause joining C). Rolling back to C then means:

- *kept*: subtasks of the mark that are SUCCEEDED now (and the competing solutions of a kept voted subtask, as
  the vote left them). Every other subtask of the task's DAG (its own subtasks and, with voting, the competing
  solutions voting.py made at creation) that left PENDING/READY is *reset*: back to PENDING, or READY when its
  dependencies are all SUCCEEDED. Running attempts are cancelled on their agents, and the attempt number moves
  on so a late result of the old attempt is STALE. Evaluation, grade and checkpoint fields are cleared,
  failures start from 0, time limits count afresh. A reset voted subtask votes again: its competitors are reset
  with it.
- Dependents of reset subtasks are PENDING again (their deps_remaining are recomputed); a dependent that began
  running between the evaluator's plan and this verdict is reset as well, since its inputs are gone.
- Corrections (``corrects``) and reviews (``review_of``) made for a reset subtask are CANCELLED and *excused*:
  they no longer decide the task's outcome.
- The task's counters are recomputed from its subtasks' states, and the task runs again (RUNNING from
  WAITING_CHECKPOINT, SUCCEEDED or FAILED). A CANCELLING or CANCELLED task cannot be rolled back.

GetRollbackPlan (read only, for the evaluator's PreviewRollback and RollbackToCheckpoint) computes the same plan
from the same function (:func:`plan_of`), so the preview shows exactly what the verdict does.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from maw.agent.v1 import agent_service_pb2 as apb
from maw.scheduler.v1 import task_service_pb2 as tpb
from maw.scheduler.v1 import verdict_service_pb2 as vpb
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from services.runtime import invalid_argument
from services.runtime.errors import failed_precondition, not_found

from . import store
from .names import subtask_name, try_parse_subtask
from .settle import cancel_leases, settle_tasks
from .states import LEASED, SubtaskState, TaskState
from .verdict_context import REJECTED, Outcome, VerdictContext

S, T = SubtaskState, TaskState
_OPEN = frozenset({S.PENDING, S.READY})
_NOT_ROLLED_BACK = frozenset({T.CANCELLING, T.CANCELLED})
_TASK = re.compile(r"^tasks/([a-z0-9][a-z0-9-]{0,62})$")
_CHECKPOINT = re.compile(r"^checkpoints/[A-Za-z0-9_-]{1,128}$")


# -- the plan (pure) -------------------------------------------------------------------------------------------


def in_dag(row: store.SubtaskRow) -> bool:
    """Part of the task's planned DAG: one of its own subtasks or a competing solution (voting.py makes those at
    creation); not a correction or review made later for one."""
    return not row.corrects and not row.review_of


def _competes(row: store.SubtaskRow) -> bool:
    return bool(row.solution_of) and row.solution_of != row.key


def root_of(row: store.SubtaskRow, rows: dict[str, store.SubtaskRow]) -> str:
    """The DAG subtask an extra subtask was made for (a review of a correction belongs to the corrected one)."""
    key, seen = row.key, set()
    while key in rows and not in_dag(rows[key]) and key not in seen:
        seen.add(key)
        key = rows[key].corrects or rows[key].review_of
    return key


@dataclass
class Plan:
    """What a rollback changes, keyed by subtask key."""

    reset: list[str] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)  # of reset: running now, their attempts are cancelled
    excused: list[str] = field(default_factory=list)  # extras made for reset subtasks: CANCELLED, excused
    kept: list[str] = field(default_factory=list)
    after: dict[str, SubtaskState] = field(default_factory=dict)  # every subtask's state after the rollback
    deps_remaining: dict[str, int] = field(default_factory=dict)  # of DAG subtasks PENDING/READY after it
    counts: dict[str, int] = field(default_factory=dict)  # the task's counters after it
    progress: int = 0
    version: str = ""


def counters_of(rows: Iterable[store.SubtaskRow], states: dict[str, SubtaskState]) -> dict[str, int]:
    """A task's counters from its subtasks' states (the conventions of states.task_outcome).

    SUCCEEDED counts succeeded; FAILED counts failed, except a REVIEW that failed (excused); NOT_SELECTED is
    excused; CANCELLED is excused for a correction or review (cancelled by a rollback, or when its task failed
    before) and cancelled for a subtask of the DAG; ASSIGNED and RUNNING count running.
    """
    out = {"succeeded": 0, "failed": 0, "cancelled": 0, "excused": 0, "running": 0}
    for row in rows:
        state = states[row.key]
        if state == S.SUCCEEDED:
            out["succeeded"] += 1
        elif state == S.FAILED:
            out["excused" if row.review_of else "failed"] += 1
        elif state == S.NOT_SELECTED:
            out["excused"] += 1
        elif state == S.CANCELLED:
            out["cancelled" if in_dag(row) else "excused"] += 1
        elif state in LEASED:
            out["running"] += 1
    return out


def plan_of(
    task_state: int,
    subtask_count: int,
    rows: Sequence[store.SubtaskRow],
    mark: Collection[str],
    listed: Collection[str] | None = None,
) -> Plan:
    """The rollback of a task with ``rows`` to a checkpoint whose mark is ``mark``.

    ``listed`` (a Rollback verdict's explicit subtasks) replaces the reset rule's own choice; dependents of them
    that left PENDING/READY since are reset too.
    """
    by_key = {r.key: r for r in rows}
    dag = [r for r in rows if in_dag(r)]
    kept = {r.key for r in dag if r.key in mark and r.state == S.SUCCEEDED}
    # A competing solution stays as the vote left it while its logical subtask is kept.
    kept |= {r.key for r in dag if _competes(r) and r.solution_of in kept and r.state not in _OPEN}
    if listed is None:
        reset = {r.key for r in dag if r.key not in kept and r.state not in _OPEN}
    else:
        reset = {k for k in listed if k in by_key and in_dag(by_key[k])}
        grown = True
        while grown:  # work that began on top of a reset subtask meanwhile has lost its inputs
            more = {
                r.key for r in dag
                if r.key not in reset and r.key not in kept and r.state not in _OPEN
                and (any(d in reset for d in r.dependencies) or (_competes(r) and r.solution_of in reset))
            }  # fmt: skip
            grown = bool(more)
            reset |= more
    plan = Plan(kept=sorted(kept))
    after = {r.key: S(r.state) for r in rows}
    for r in rows:
        if in_dag(r):
            continue
        ended_excused = r.state == S.CANCELLED or (r.state == S.FAILED and r.review_of)
        if root_of(r, by_key) in reset and not ended_excused:
            plan.excused.append(r.key)
            after[r.key] = S.CANCELLED
    # First every subtask that waits again, then whether each one's dependencies are done.
    for r in dag:
        if r.key in reset or r.state in _OPEN:
            after[r.key] = S.PENDING
    for r in dag:
        if after[r.key] == S.PENDING:
            remaining = sum(after.get(d) != S.SUCCEEDED for d in r.dependencies)
            plan.deps_remaining[r.key] = remaining
            after[r.key] = S.READY if remaining == 0 else S.PENDING
    plan.reset = sorted(reset, key=lambda k: by_key[k].ordinal)
    plan.cancelled = [k for k in plan.reset if by_key[k].state in LEASED]
    plan.excused.sort(key=lambda k: by_key[k].ordinal)
    plan.after = after
    plan.counts = counters_of(rows, after)
    done = sum(plan.counts[c] for c in ("succeeded", "failed", "cancelled", "excused"))
    plan.progress = 100 * done // subtask_count if subtask_count else 0
    digest = hashlib.sha256(f"{task_state}|{sorted(mark)}".encode())
    for r in sorted(rows, key=lambda r: r.key):
        digest.update(f"|{r.key}:{r.state}:{r.attempt}".encode())
    plan.version = digest.hexdigest()[:20]
    return plan


# -- the mark --------------------------------------------------------------------------------------------------


async def record_mark(conn: AsyncConnection, task_id: str, checkpoint: str, held: str = "") -> None:
    """At a Pause for ``checkpoint``: the first one records the task's SUCCEEDED subtasks; every one adds the
    subtask it holds (``held``, a subtask name; the corrected one for a correction), so what a person approves at
    the checkpoint counts as done before it."""
    if not checkpoint:
        return
    pair = try_parse_subtask(held) if held else None
    await conn.execute(
        text(
            "INSERT INTO rollback_marks AS m (task_id, checkpoint, succeeded, held)"
            " SELECT :t, :c, coalesce(array_agg(key ORDER BY key) FILTER (WHERE state = :ok), '{}'),"
            " ARRAY(SELECT coalesce(nullif(corrects, ''), nullif(nullif(solution_of, key), ''), key)"
            "  FROM subtasks WHERE task_id = :t AND key = :h)"
            " FROM subtasks WHERE task_id = :t"
            " ON CONFLICT (task_id, checkpoint) DO UPDATE"
            " SET held = ARRAY(SELECT DISTINCT unnest(m.held || excluded.held) ORDER BY 1)"
        ),
        {"t": task_id, "c": checkpoint, "ok": int(S.SUCCEEDED), "h": pair[1] if pair else ""},
    )


async def mark_of(conn: AsyncConnection, task_id: str, checkpoint: str) -> set[str] | None:
    """The keys the checkpoint's mark keeps, or None when the task never paused there."""
    row = (
        await conn.execute(
            text("SELECT succeeded || held FROM rollback_marks WHERE task_id = :t AND checkpoint = :c"),
            {"t": task_id, "c": checkpoint},
        )
    ).first()
    return set(row[0]) if row else None


# -- GetRollbackPlan ----------------------------------------------------------------------------------------------


async def get_rollback_plan(db: AsyncEngine, request: vpb.GetRollbackPlanRequest) -> vpb.GetRollbackPlanResponse:
    """VerdictService.GetRollbackPlan: the plan from the states now; changes nothing."""
    match = _TASK.match(request.task)
    problems = [] if match else [("task", "must be tasks/{task}")]
    if not _CHECKPOINT.match(request.checkpoint):
        problems.append(("checkpoint", "must be checkpoints/{checkpoint}"))
    if problems:
        raise invalid_argument(problems)
    assert match is not None
    task_id = match.group(1)
    async with db.connect() as conn:
        task = await store.get_task(conn, task_id)
        if task is None:
            raise not_found("maw.scheduler.v1.Task", request.task)
        mark = await mark_of(conn, task_id, request.checkpoint)
        if mark is None:
            raise failed_precondition(
                "NO_ROLLBACK_MARK", request.checkpoint, "the task has not paused at this checkpoint (yet)"
            )
        rows = await store.get_subtasks(conn, task_id)
    plan = plan_of(task.state, task.subtask_count, rows, mark)
    changed = {*plan.reset, *plan.excused}
    return vpb.GetRollbackPlanResponse(
        reset_subtasks=[subtask_name(task_id, k) for k in plan.reset],
        cancelled_subtasks=[subtask_name(task_id, k) for k in plan.cancelled],
        excused_subtasks=[subtask_name(task_id, k) for k in plan.excused],
        completed_subtasks=[subtask_name(task_id, k) for k in plan.kept],
        progress_percent=plan.progress,
        task_state=task.state,  # type: ignore[arg-type]
        version=plan.version,
        attempts={subtask_name(task_id, r.key): r.attempt for r in rows if r.key in changed},
    )


# -- the Rollback verdict -------------------------------------------------------------------------------------


async def apply(ap: VerdictContext, task: store.TaskRow) -> None:
    """Apply a Rollback verdict inside the applier's transaction (see the module docstring)."""

    verdict = ap.v.rollback
    checkpoint = verdict.checkpoint
    reason = f"rolled back to {checkpoint}"
    if task.state in _NOT_ROLLED_BACK:
        raise Outcome(REJECTED, f"the task is {T(task.state).name}; a cancelled task cannot be rolled back")
    mark = await mark_of(ap.conn, task.id, checkpoint)
    if mark is None:
        raise Outcome(REJECTED, f"the task never paused at {checkpoint!r}")
    listed = []
    for name in verdict.reset_subtasks:
        pair = try_parse_subtask(name)
        if pair is None or pair[0] != task.id:
            raise Outcome(REJECTED, f"{name!r} is not a subtask of {ap.v.task!r}")
        listed.append(pair[1])
    rows = await store.get_subtasks(ap.conn, task.id, lock=True)
    by_key = {r.key: r for r in rows}
    if unknown := [k for k in listed if k not in by_key]:
        raise Outcome(REJECTED, f"unknown subtasks {unknown}")
    plan = plan_of(task.state, task.subtask_count, rows, mark, listed)

    leased = [by_key[k] for k in plan.reset + plan.excused if by_key[k].state in LEASED]
    cancel_leases(ap.cancels, leased, apb.CANCEL_REASON_SUBTASK_CANCELLED, reason)
    reset = set(plan.reset)
    moved: list[tuple[str, int, int]] = []  # (key, new state, deps remaining)
    for r in rows:
        new = plan.after[r.key]
        if r.key in reset:
            r.attempt += 1 if r.attempt else 0  # fencing: a late result of the old attempt is STALE
            if new != r.state:
                ap.move(r, new, reason)
            moved.append((r.key, int(new), plan.deps_remaining[r.key]))
        elif r.key in plan.deps_remaining and (new != r.state or plan.deps_remaining[r.key] != r.deps_remaining):
            if new != r.state:
                ap.move(r, new, f"a dependency was {reason}")
            moved.append((r.key, int(new), plan.deps_remaining[r.key]))
    for key in plan.excused:
        ap.move(by_key[key], S.CANCELLED, reason)

    await _write(ap.conn, task.id, plan, moved, reason)
    await ap.conn.execute(
        text("DELETE FROM evaluation_outbox WHERE task_id = :t AND key = ANY(:k)"),
        {"t": task.id, "k": plan.reset + plan.excused},
    )
    waited_at = str(
        (await ap.conn.execute(text("SELECT checkpoint FROM tasks WHERE id = :i"), {"i": task.id})).scalar_one()
    )
    task.succeeded_count, task.failed_count = plan.counts["succeeded"], plan.counts["failed"]
    task.cancelled_count, task.excused_count = plan.counts["cancelled"], plan.counts["excused"]
    task.running_count = plan.counts["running"]
    task.final_accept = 0  # a rolled-back task asks for final acceptance again when it is done again
    fields: dict[str, Any] = {
        "succeeded_count": task.succeeded_count,
        "failed_count": task.failed_count,
        "cancelled_count": task.cancelled_count,
        "excused_count": task.excused_count,
        "running_count": task.running_count,
        "checkpoint": "",
        "final_accept": task.final_accept,
    }
    if task.state in (T.WAITING_CHECKPOINT, T.SUCCEEDED, T.FAILED):
        ap.move_task(task, T.RUNNING, reason)
        fields.update(state=int(T.RUNNING), state_message=reason, end_time=None)
    await store.update_task(ap.conn, task.id, **fields)
    if waited_at:
        ap.events.add(task.id, tpb.TaskEvent(checkpoint_resolved=tpb.CheckpointResolved(checkpoint=waited_at)))
    await settle_tasks(ap.conn, {task.id: task}, ap.events, ap.cancels)
    ap.ready = True


async def _write(
    conn: AsyncConnection, task_id: str, plan: Plan, moved: list[tuple[str, int, int]], reason: str
) -> None:
    reset = set(plan.reset)
    fresh = [m for m in moved if m[0] in reset]
    if fresh:
        await conn.execute(
            text(
                "UPDATE subtasks s SET state = v.state, deps_remaining = v.deps,"
                " attempt = s.attempt + CASE WHEN s.attempt > 0 THEN 1 ELSE 0 END, failures = 0, worker = NULL,"
                " lease_expire_time = NULL, attempt_deadline = NULL, next_attempt_time = NULL, progress_percent = 0,"
                " progress_message = '', start_time = NULL, end_time = NULL, ready_time = now(),"
                " unschedulable_code = 0, unschedulable_message = '', unschedulable_since = NULL,"
                " state_message = :m, evaluation = '', evaluation_score = 0, grade = 0, checkpoint = '',"
                " update_time = now()"
                " FROM unnest(CAST(:k AS text[]), CAST(:s AS smallint[]), CAST(:d AS int[])) AS v(key, state, deps)"
                " WHERE s.task_id = :t AND s.key = v.key"
            ),
            {
                "t": task_id,
                "m": reason[:2000],
                "k": [m[0] for m in fresh],
                "s": [m[1] for m in fresh],
                "d": [m[2] for m in fresh],
            },  # fmt: skip
        )
    waiting = [m for m in moved if m[0] not in reset]
    if waiting:
        await conn.execute(
            text(
                "UPDATE subtasks s SET state = v.state, deps_remaining = v.deps, update_time = now(),"
                " ready_time = CASE WHEN v.state = 2 AND s.state <> 2 THEN now() ELSE s.ready_time END"
                " FROM unnest(CAST(:k AS text[]), CAST(:s AS smallint[]), CAST(:d AS int[])) AS v(key, state, deps)"
                " WHERE s.task_id = :t AND s.key = v.key"
            ),
            {
                "t": task_id,
                "k": [m[0] for m in waiting],
                "s": [m[1] for m in waiting],
                "d": [m[2] for m in waiting],
            },  # fmt: skip
        )
    if plan.excused:
        await conn.execute(
            text(
                "UPDATE subtasks SET state = :s, state_message = :m, end_time = now(), lease_expire_time = NULL,"
                " checkpoint = '', update_time = now() WHERE task_id = :t AND key = ANY(:k)"
            ),
            {"s": int(S.CANCELLED), "m": reason[:2000], "t": task_id, "k": plan.excused},
        )


__all__ = ["Plan", "apply", "counters_of", "get_rollback_plan", "in_dag", "mark_of", "plan_of", "record_mark"]
