"""Queries on tasks: create, read, page, lock, update, and the counters that decide a task's outcome."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from .rows import (
    TASK_COLS,
    S,
    T,
    TaskRow,
    prefixed,
    task_rows,
)


async def find_task_by_request(conn: AsyncConnection, creator: str, request_id: str) -> TaskRow | None:
    """The task an earlier CreateTask with the same request id made, if any."""
    rows = await conn.execute(
        text(f"SELECT {TASK_COLS} FROM tasks WHERE creator = :c AND request_id = :r"),
        {"c": creator, "r": request_id},
    )
    found = task_rows(rows.all())
    return found[0] if found else None


async def insert_task(conn: AsyncConnection, task: dict[str, Any], subtasks: Sequence[dict[str, Any]]) -> None:
    """Insert a task and all its subtasks (one statement each)."""
    await conn.execute(
        text(
            "INSERT INTO tasks (id, creator, request_id, body, state, priority, max_concurrency, labels,"
            " subtask_count) VALUES (:id, :creator, :request_id, :body, :state, :priority, :max_concurrency,"
            " CAST(:labels AS jsonb), :subtask_count)"
        ),
        task,
    )
    await conn.execute(
        text(
            "INSERT INTO subtasks (task_id, key, ordinal, body, state, max_attempts, priority, task_priority,"
            " tool_kind, privacy_level, required_labels, dependencies, dependents, deps_remaining, ready_time,"
            " attempt_limit_s, queue_wait_limit_s, total_limit_s, solution_of)"
            " VALUES (:task_id, :key, :ordinal, :body, :state, :max_attempts, :priority, :task_priority,"
            " :tool_kind, :privacy_level, CAST(:required_labels AS jsonb), :dependencies, :dependents,"
            f" :deps_remaining, CASE WHEN :state = {S.READY:d} THEN now() END, :attempt_limit_s, :queue_wait_limit_s,"
            " :total_limit_s, :solution_of)"
        ),
        [{"solution_of": "", **s} for s in subtasks],
    )


async def get_task(conn: AsyncConnection, task_id: str, lock: bool = False) -> TaskRow | None:
    """One task, optionally locked for update."""
    suffix = " FOR UPDATE" if lock else ""
    rows = await conn.execute(text(f"SELECT {TASK_COLS} FROM tasks WHERE id = :id{suffix}"), {"id": task_id})
    found = task_rows(rows.all())
    return found[0] if found else None


async def lock_tasks(conn: AsyncConnection, task_ids: Sequence[str]) -> dict[str, TaskRow]:
    """Lock several tasks in id order and return them."""
    rows = await conn.execute(
        text(f"SELECT {TASK_COLS} FROM tasks WHERE id = ANY(:ids) ORDER BY id FOR UPDATE"),
        {"ids": sorted(set(task_ids))},
    )
    return {t.id: t for t in task_rows(rows.all())}


async def list_tasks(
    conn: AsyncConnection, where: str, params: dict[str, Any], limit: int, after: tuple[datetime, str] | None
) -> list[TaskRow]:
    """A page of tasks, newest first, keyset-paginated by (create_time, id)."""
    clauses = [where] if where else []
    if after is not None:
        clauses.append("(create_time, id) < (:after_time, :after_id)")
        params = {**params, "after_time": after[0], "after_id": after[1]}
    sql = f"SELECT {TASK_COLS} FROM tasks"
    if clauses:
        sql += " WHERE " + " AND ".join(clauses)
    sql += " ORDER BY create_time DESC, id DESC LIMIT :limit"
    rows = await conn.execute(text(sql), {**params, "limit": limit})
    return task_rows(rows.all())


async def count_tasks(conn: AsyncConnection, where: str, params: dict[str, Any]) -> int:
    """How many tasks match."""
    sql = "SELECT count(*) FROM tasks" + (f" WHERE {where}" if where else "")
    return int((await conn.execute(text(sql), params)).scalar_one())


async def put_task_policy(conn: AsyncConnection, task_id: str, body: bytes) -> None:
    """Store the scheduler's copy of a task's effective policy (RegisterTask's answer, then PolicyChanged)."""
    await conn.execute(
        text(
            "INSERT INTO task_policies (task_id, body) VALUES (:i, :p)"
            " ON CONFLICT (task_id) DO UPDATE SET body = excluded.body"
        ),
        {"i": task_id, "p": body},
    )


async def update_task(conn: AsyncConnection, task_id: str, **fields: Any) -> None:
    """Set columns of one task (column names come from code, never from callers)."""
    sets = ", ".join(f"{k} = :{k}" for k in fields)
    await conn.execute(text(f"UPDATE tasks SET {sets}, update_time = now() WHERE id = :id"), {**fields, "id": task_id})


async def set_labels(conn: AsyncConnection, task_id: str, labels_json: str) -> None:
    """Replace a task's labels."""
    await conn.execute(
        text("UPDATE tasks SET labels = CAST(:l AS jsonb), update_time = now() WHERE id = :id"),
        {"l": labels_json, "id": task_id},
    )


async def set_priorities(conn: AsyncConnection, task_ids: Sequence[str], priority: int) -> None:
    """Change the priority of tasks and of their subtasks' queue position."""
    await conn.execute(
        text("UPDATE tasks SET priority = :p, update_time = now() WHERE id = ANY(:ids)"),
        {"p": priority, "ids": list(task_ids)},
    )
    await conn.execute(
        text("UPDATE subtasks SET task_priority = :p WHERE task_id = ANY(:ids)"),
        {"p": priority, "ids": list(task_ids)},
    )


async def bump_task_counters(conn: AsyncConnection, deltas: dict[str, dict[str, int]]) -> dict[str, TaskRow]:
    """Add to tasks' counters (running/succeeded/failed/cancelled/excused); returns the updated rows."""
    if not deltas:
        return {}
    ids = sorted(deltas)
    rows = await conn.execute(
        text(
            "UPDATE tasks t SET running_count = greatest(0, t.running_count + v.r),"
            " succeeded_count = t.succeeded_count + v.s, failed_count = t.failed_count + v.f,"
            " cancelled_count = t.cancelled_count + v.c, excused_count = t.excused_count + v.x, update_time = now(),"
            f" state = CASE WHEN t.state = {T.PENDING:d} AND v.r > 0 THEN {T.RUNNING:d} ELSE t.state END,"
            " start_time = CASE WHEN t.start_time IS NULL AND v.r > 0 THEN now() ELSE t.start_time END"
            " FROM unnest(CAST(:ids AS text[]), CAST(:r AS int[]), CAST(:s AS int[]), CAST(:f AS int[]),"
            " CAST(:c AS int[]), CAST(:x AS int[])) AS v(id, r, s, f, c, x) WHERE t.id = v.id"
            f" RETURNING {prefixed('t', TaskRow)}"
        ),
        {
            "ids": ids,
            "r": [deltas[i].get("running", 0) for i in ids],
            "s": [deltas[i].get("succeeded", 0) for i in ids],
            "f": [deltas[i].get("failed", 0) for i in ids],
            "c": [deltas[i].get("cancelled", 0) for i in ids],
            "x": [deltas[i].get("excused", 0) for i in ids],
        },
    )
    return {t.id: t for t in task_rows(rows.all())}
