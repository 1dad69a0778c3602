"""PostgreSQL access for the evaluator schema: every query the evaluator runs."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any, NamedTuple

from maw.evaluator.v1 import resources_pb2 as epb
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

VERDICTS, ACTIVITY = 1, 2  # outbox targets: the scheduler's VerdictService, the registry's activity log
OPEN = epb.CHECKPOINT_STATE_OPEN


class PolicyRow(NamedTuple):
    """A stored policy."""

    body: bytes
    etag: str
    update_time: datetime


class TaskRow(NamedTuple):
    """A registered task: its RegisterTaskRequest bytes and whether it finished."""

    body: bytes
    finished: bool


class PendingResult(NamedTuple):
    """A submitted result not yet judged."""

    result_id: str
    task_id: str
    evaluation_id: str
    body: bytes


class CheckpointRow(NamedTuple):
    """A checkpoint's id and body."""

    id: str
    body: bytes


class OutboxItem(NamedTuple):
    """One message waiting in the outbox."""

    id: int
    body: bytes


class PageRow(NamedTuple):
    """One row of a listed page: the resource's body and its keyset position."""

    body: bytes
    create_time: datetime
    id: str


# -- policies and tasks ----------------------------------------------------------------------------------


async def get_policy(conn: AsyncConnection, name: str, lock: bool = False) -> PolicyRow | None:
    """A stored policy."""
    sql = "SELECT body, etag, update_time FROM policies WHERE name = :n" + (" FOR UPDATE" if lock else "")
    row = (await conn.execute(text(sql), {"n": name})).first()
    return PolicyRow(bytes(row.body), row.etag, row.update_time) if row else None


async def put_policy(conn: AsyncConnection, name: str, body: bytes, etag: str) -> None:
    """Insert or replace a policy."""
    await conn.execute(
        text(
            "INSERT INTO policies (name, body, etag) VALUES (:n, :b, :e) ON CONFLICT (name) DO UPDATE"
            " SET body = excluded.body, etag = excluded.etag, update_time = now()"
        ),
        {"n": name, "b": body, "e": etag},
    )


async def insert_task(conn: AsyncConnection, task_id: str, body: bytes) -> bool:
    """Register a task once; False if it was registered before."""
    row = await conn.execute(
        text("INSERT INTO tasks (id, body) VALUES (:i, :b) ON CONFLICT DO NOTHING RETURNING id"),
        {"i": task_id, "b": body},
    )
    return row.first() is not None


async def get_task(conn: AsyncConnection, task_id: str, lock: bool = False) -> TaskRow | None:
    """A registered task; ``lock`` serialises decisions on it."""
    sql = "SELECT body, finished FROM tasks WHERE id = :i" + (" FOR UPDATE" if lock else "")
    row = (await conn.execute(text(sql), {"i": task_id})).first()
    return TaskRow(bytes(row.body), bool(row.finished)) if row else None


async def finish_task(conn: AsyncConnection, task_id: str, finished: bool) -> None:
    """Mark a task finished (or reopened)."""
    await conn.execute(text("UPDATE tasks SET finished = :f WHERE id = :i"), {"f": finished, "i": task_id})


async def set_budget(conn: AsyncConnection, task_id: str, deadline: datetime | None) -> None:
    """When the task's time budget runs out (None: never)."""
    await conn.execute(text("UPDATE tasks SET budget_deadline = :d WHERE id = :i"), {"d": deadline, "i": task_id})


async def budgets_due(conn: AsyncConnection, limit: int) -> list[str]:
    """Lock unfinished tasks whose time budget ran out and has not fired yet."""
    rows = await conn.execute(
        text(
            "SELECT id FROM tasks WHERE NOT finished AND NOT budget_fired AND budget_deadline < now()"
            " ORDER BY budget_deadline LIMIT :l FOR UPDATE SKIP LOCKED"
        ),
        {"l": limit},
    )
    return [str(r.id) for r in rows]


async def mark_budget_fired(conn: AsyncConnection, task_id: str) -> None:
    """The task's time budget was handled."""
    await conn.execute(text("UPDATE tasks SET budget_fired = true WHERE id = :i"), {"i": task_id})


# -- results and evaluations -------------------------------------------------------------------------------


async def insert_result(
    conn: AsyncConnection, result_id: str, task_id: str, subtask: str, evaluation_id: str, body: bytes
) -> str | None:
    """Record a submitted result; returns the evaluation id it got now, or None if it was recorded before."""
    row = await conn.execute(
        text(
            "INSERT INTO results (result_id, task_id, subtask, evaluation_id, body) VALUES (:r, :t, :s, :e, :b)"
            " ON CONFLICT DO NOTHING RETURNING evaluation_id"
        ),
        {"r": result_id, "t": task_id, "s": subtask, "e": evaluation_id, "b": body},
    )
    found = row.first()
    return str(found.evaluation_id) if found else None


async def evaluation_of_result(conn: AsyncConnection, result_id: str) -> str | None:
    """The evaluation id an earlier submission of ``result_id`` got."""
    row = (await conn.execute(text("SELECT evaluation_id FROM results WHERE result_id = :r"), {"r": result_id})).first()
    return str(row.evaluation_id) if row else None


async def pending_results(conn: AsyncConnection, limit: int) -> list[PendingResult]:
    """Results not yet judged, oldest first."""
    rows = await conn.execute(
        text(
            "SELECT result_id, task_id, evaluation_id, body FROM results WHERE NOT done ORDER BY receive_time LIMIT :l"
        ),
        {"l": limit},
    )
    return [PendingResult(r.result_id, r.task_id, r.evaluation_id, bytes(r.body)) for r in rows]


async def claim_result(conn: AsyncConnection, result_id: str) -> bool:
    """Lock a pending result for judging; False if another worker judged (or is judging) it."""
    row = await conn.execute(
        text("SELECT 1 FROM results WHERE result_id = :r AND NOT done FOR UPDATE SKIP LOCKED"), {"r": result_id}
    )
    return row.first() is not None


async def result_body(conn: AsyncConnection, result_id: str) -> bytes | None:
    """The stored SubmittedResult of ``result_id``."""
    row = (await conn.execute(text("SELECT body FROM results WHERE result_id = :r"), {"r": result_id})).first()
    return bytes(row.body) if row else None


async def mark_done(conn: AsyncConnection, result_id: str) -> None:
    """The result is judged."""
    await conn.execute(text("UPDATE results SET done = true WHERE result_id = :r"), {"r": result_id})


async def insert_evaluation(
    conn: AsyncConnection, evaluation_id: str, task_id: str, subtask: str, root: str, verdict: int, body: bytes
) -> None:
    """Store a completed evaluation."""
    await conn.execute(
        text("INSERT INTO evaluations (id, task_id, subtask, root, verdict, body) VALUES (:i, :t, :s, :r, :v, :b)"),
        {"i": evaluation_id, "t": task_id, "s": subtask, "r": root, "v": verdict, "b": body},
    )


async def get_evaluation(conn: AsyncConnection, evaluation_id: str) -> bytes | None:
    """An evaluation's body."""
    row = (await conn.execute(text("SELECT body FROM evaluations WHERE id = :i"), {"i": evaluation_id})).first()
    return bytes(row.body) if row else None


async def page(
    conn: AsyncConnection, table: str, where: dict[str, Any], after: tuple[datetime, str] | None, limit: int
) -> list[PageRow]:
    """A keyset page of ``table`` (code-chosen name and columns), oldest first, values always bound."""
    clauses = [f"{column} = :{column}" for column in where]
    params = dict(where)
    if after is not None:
        clauses.append("(create_time, id) > (:at, :aid)")
        params.update(at=after[0], aid=after[1])
    sql = f"SELECT body, create_time, id FROM {table}"
    if clauses:
        sql += " WHERE " + " AND ".join(clauses)
    sql += " ORDER BY create_time, id LIMIT :limit"
    rows = await conn.execute(text(sql), {**params, "limit": limit})
    return [PageRow(bytes(r.body), r.create_time, r.id) for r in rows]


async def list_evaluations(
    conn: AsyncConnection, where: dict[str, Any], after: tuple[datetime, str] | None, limit: int
) -> list[PageRow]:
    """A page of evaluations, oldest first; ``where`` maps a column (task_id, subtask, root) to its value."""
    return await page(conn, "evaluations", where, after, limit)


async def bump_corrections(conn: AsyncConnection, task_id: str, root: str, feedback: Sequence[bytes]) -> int:
    """One more correction cycle of ``root`` with its feedback; returns the new cycle number."""
    row = await conn.execute(
        text(
            "INSERT INTO corrections AS c (task_id, root, cycles, feedback) VALUES (:t, :r, 1, CAST(:f AS bytea[]))"
            " ON CONFLICT (task_id, root) DO UPDATE SET cycles = c.cycles + 1,"
            " feedback = c.feedback || excluded.feedback"
            " RETURNING cycles"
        ),
        {"t": task_id, "r": root, "f": list(feedback)},
    )
    return int(row.scalar_one())


async def corrections_of(conn: AsyncConnection, task_id: str, root: str) -> tuple[int, list[bytes]]:
    """(cycles so far, Feedback bytes given so far) of ``root``."""
    row = (
        await conn.execute(
            text("SELECT cycles, feedback FROM corrections WHERE task_id = :t AND root = :r"), {"t": task_id, "r": root}
        )
    ).first()
    return (int(row.cycles), [bytes(b) for b in row.feedback]) if row else (0, [])


# -- checkpoints -----------------------------------------------------------------------------------------------


async def insert_checkpoint(conn: AsyncConnection, checkpoint_id: str, task_id: str, state: int, body: bytes) -> None:
    """Store a new checkpoint (its assignee and trigger are columns too, for the inbox filters)."""
    cp = epb.Checkpoint.FromString(body)
    await conn.execute(
        text("INSERT INTO checkpoints (id, task_id, state, body, assignee, trigger) VALUES (:i, :t, :s, :b, :a, :g)"),
        {"i": checkpoint_id, "t": task_id, "s": state, "b": body, "a": cp.assignee, "g": int(cp.trigger)},
    )


async def update_checkpoint(conn: AsyncConnection, checkpoint_id: str, state: int, body: bytes) -> None:
    """Replace a checkpoint's state and body."""
    await conn.execute(
        text("UPDATE checkpoints SET state = :s, body = :b, assignee = :a WHERE id = :i"),
        {"i": checkpoint_id, "s": state, "b": body, "a": epb.Checkpoint.FromString(body).assignee},
    )


async def get_checkpoint(conn: AsyncConnection, checkpoint_id: str, lock: bool = False) -> bytes | None:
    """A checkpoint's body."""
    sql = "SELECT body FROM checkpoints WHERE id = :i" + (" FOR UPDATE" if lock else "")
    row = (await conn.execute(text(sql), {"i": checkpoint_id})).first()
    return bytes(row.body) if row else None


async def open_checkpoint_of(conn: AsyncConnection, task_id: str) -> CheckpointRow | None:
    """The task's OPEN checkpoint, locked, if any."""
    row = (
        await conn.execute(
            text(
                "SELECT id, body FROM checkpoints WHERE task_id = :t AND state = :s ORDER BY create_time"
                " LIMIT 1 FOR UPDATE"
            ),
            {"t": task_id, "s": OPEN},
        )
    ).first()
    return CheckpointRow(row.id, bytes(row.body)) if row else None


async def list_checkpoints(
    conn: AsyncConnection, where: dict[str, Any], after: tuple[datetime, str] | None, limit: int
) -> list[PageRow]:
    """A page of checkpoints, oldest first; ``where`` maps a column (state, task_id, assignee, trigger) to its value."""
    return await page(conn, "checkpoints", where, after, limit)


# -- outbox and request ids -------------------------------------------------------------------------------------


async def enqueue(conn: AsyncConnection, target: int, items: Sequence[tuple[str, bytes]]) -> None:
    """Add (task id, message bytes) items for ``target``, in order."""
    if items:
        await conn.execute(
            text("INSERT INTO outbox (target, task_id, body) VALUES (:g, :t, :b)"),
            [{"g": target, "t": t, "b": b} for t, b in items],
        )


async def outbox_batch(conn: AsyncConnection, target: int, limit: int) -> list[OutboxItem]:
    """The oldest items for ``target``."""
    rows = await conn.execute(
        text("SELECT id, body FROM outbox WHERE target = :g ORDER BY id LIMIT :l"), {"g": target, "l": limit}
    )
    return [OutboxItem(int(r.id), bytes(r.body)) for r in rows]


async def outbox_done(conn: AsyncConnection, ids: Sequence[int]) -> None:
    """Remove acknowledged items."""
    if ids:
        await conn.execute(text("DELETE FROM outbox WHERE id = ANY(:ids)"), {"ids": list(ids)})


async def try_lock(conn: AsyncConnection, key: int) -> bool:
    """Take the transaction-scoped advisory lock ``key`` if no one holds it (released at commit)."""
    return bool((await conn.execute(text("SELECT pg_try_advisory_xact_lock(:k)"), {"k": key})).scalar())


# -- rollback ---------------------------------------------------------------------------------------------------


async def supersede_attempts(conn: AsyncConnection, task_id: str, attempts: dict[str, int]) -> None:
    """Results of these subtasks (name → attempt) up to that attempt no longer count: they were rolled back."""
    if attempts:
        names = sorted(attempts)
        await conn.execute(
            text(
                "INSERT INTO superseded_attempts AS s (task_id, subtask, through_attempt)"
                " SELECT :t, * FROM unnest(CAST(:n AS text[]), CAST(:a AS int[]))"
                " ON CONFLICT (task_id, subtask) DO UPDATE"
                " SET through_attempt = greatest(s.through_attempt, excluded.through_attempt)"
            ),
            {"t": task_id, "n": names, "a": [attempts[n] for n in names]},
        )


async def superseded(conn: AsyncConnection, task_id: str, subtask: str, attempt: int) -> bool:
    """Whether a result of ``subtask``'s ``attempt`` was rolled back (see :func:`supersede_attempts`)."""
    row = await conn.execute(
        text("SELECT 1 FROM superseded_attempts WHERE task_id = :t AND subtask = :s AND through_attempt >= :a"),
        {"t": task_id, "s": subtask, "a": attempt},
    )
    return row.first() is not None


async def checkpoints_after(conn: AsyncConnection, task_id: str, checkpoint_id: str, lock: bool) -> list[CheckpointRow]:
    """The task's checkpoints opened after ``checkpoint_id``, oldest first (``lock``: FOR UPDATE)."""
    rows = await conn.execute(
        text(
            "SELECT id, body FROM checkpoints WHERE task_id = :t AND id <> :i"
            " AND create_time > (SELECT create_time FROM checkpoints WHERE id = :i) ORDER BY create_time, id"
            + (" FOR UPDATE" if lock else "")
        ),
        {"t": task_id, "i": checkpoint_id},
    )
    return [CheckpointRow(str(r.id), bytes(r.body)) for r in rows]


async def evaluations_since(conn: AsyncConnection, task_id: str, roots: Sequence[str], checkpoint_id: str) -> list[str]:
    """Ids of the evaluations of these correction chains made since ``checkpoint_id`` opened, oldest first."""
    rows = await conn.execute(
        text(
            "SELECT id FROM evaluations WHERE task_id = :t AND root = ANY(:r)"
            " AND create_time >= (SELECT create_time FROM checkpoints WHERE id = :i) ORDER BY create_time, id"
        ),
        {"t": task_id, "r": list(roots), "i": checkpoint_id},
    )
    return [str(r.id) for r in rows]


async def reset_corrections(conn: AsyncConnection, task_id: str, roots: Sequence[str]) -> None:
    """The correction cycles of these chains start again (their feedback stays, as history)."""
    await conn.execute(
        text("UPDATE corrections SET cycles = 0 WHERE task_id = :t AND root = ANY(:r)"),
        {"t": task_id, "r": list(roots)},
    )


async def drop_pending(conn: AsyncConnection, task_id: str, subtasks: Sequence[str]) -> None:
    """Results of these subtasks still waiting to be judged are not judged."""
    await conn.execute(
        text("UPDATE results SET done = true WHERE task_id = :t AND subtask = ANY(:s) AND NOT done"),
        {"t": task_id, "s": list(subtasks)},
    )
