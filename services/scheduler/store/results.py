"""Queries on results (the proof of completion) and per-worker tool statistics."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection


async def existing_results(
    conn: AsyncConnection, keys: Sequence[tuple[str, str, int]]
) -> dict[tuple[str, str, int], str]:
    """result_id of already committed results for (task, key, attempt)."""
    if not keys:
        return {}
    rows = await conn.execute(
        text(
            "SELECT task_id, key, attempt, result_id FROM results WHERE (task_id, key, attempt) IN"
            " (SELECT * FROM unnest(CAST(:t AS text[]), CAST(:k AS text[]), CAST(:a AS int[])))"
        ),
        {"t": [k[0] for k in keys], "k": [k[1] for k in keys], "a": [k[2] for k in keys]},
    )
    return {(r.task_id, r.key, r.attempt): r.result_id for r in rows}


async def insert_results(conn: AsyncConnection, rows: Sequence[dict[str, Any]]) -> None:
    """Commit result rows (the proof of completion)."""
    if rows:
        await conn.execute(
            text(
                "INSERT INTO results (task_id, key, attempt, result_id, worker, outcome, duration_ms, body,"
                " commit_time) SELECT *, clock_timestamp() FROM unnest(CAST(:t AS text[]), CAST(:k AS text[]),"
                " CAST(:a AS int[]), CAST(:r AS text[]), CAST(:w AS text[]), CAST(:o AS smallint[]),"
                " CAST(:d AS bigint[]), CAST(:b AS bytea[])) ON CONFLICT DO NOTHING"
            ),
            {
                "t": [r["task_id"] for r in rows],
                "k": [r["key"] for r in rows],
                "a": [r["attempt"] for r in rows],
                "r": [r["result_id"] for r in rows],
                "w": [r["worker"] for r in rows],
                "o": [r["outcome"] for r in rows],
                "d": [r["duration_ms"] for r in rows],
                "b": [r["body"] for r in rows],
            },
        )


async def latest_results(conn: AsyncConnection, task_id: str, keys: Sequence[str]) -> dict[str, bytes]:
    """The result body of each key's current attempt (for subtask views and dependency context)."""
    rows = await conn.execute(
        text(
            "SELECT r.key, r.body FROM results r JOIN subtasks s ON s.task_id = r.task_id AND s.key = r.key"
            " AND s.attempt = r.attempt WHERE r.task_id = :t AND r.key = ANY(:k)"
        ),
        {"t": task_id, "k": list(keys)},
    )
    return {r.key: r.body for r in rows}


async def record_tool_stats(conn: AsyncConnection, rows: Sequence[tuple[str, int, bool, int]]) -> None:
    """(worker, tool, succeeded, duration ms) → per-worker, per-tool success and duration totals."""
    if not rows:
        return
    agg: dict[tuple[str, int], list[int]] = {}
    for worker, tool, ok, ms in rows:
        a = agg.setdefault((worker, tool), [0, 0, 0])
        a[0] += 1
        a[1] += int(ok)
        a[2] += ms
    keys = sorted(agg)
    await conn.execute(
        text(
            "INSERT INTO worker_tool_stats AS w (worker, tool, finished, succeeded, total_duration_ms)"
            " SELECT * FROM unnest(CAST(:w AS text[]), CAST(:t AS smallint[]), CAST(:f AS bigint[]),"
            " CAST(:s AS bigint[]), CAST(:d AS bigint[]))"
            " ON CONFLICT (worker, tool) DO UPDATE SET finished = w.finished + excluded.finished,"
            " succeeded = w.succeeded + excluded.succeeded,"
            " total_duration_ms = w.total_duration_ms + excluded.total_duration_ms"
        ),
        {
            "w": [k[0] for k in keys],
            "t": [k[1] for k in keys],
            "f": [agg[k][0] for k in keys],
            "s": [agg[k][1] for k in keys],
            "d": [agg[k][2] for k in keys],
        },
    )
