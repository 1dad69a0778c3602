"""The per-task event log: sequence numbers reserved per task, events appended and read in order."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection


async def allocate_sequences(conn: AsyncConnection, counts: dict[str, int]) -> dict[str, int]:
    """Reserve ``counts[task]`` event sequence numbers per task; returns the first of each range."""
    if not counts:
        return {}
    ids = sorted(counts)
    rows = await conn.execute(
        text(
            "UPDATE tasks t SET last_event_sequence = t.last_event_sequence + v.n"
            " FROM unnest(CAST(:ids AS text[]), CAST(:ns AS int[])) AS v(id, n) WHERE t.id = v.id"
            " RETURNING t.id, t.last_event_sequence"
        ),
        {"ids": ids, "ns": [counts[i] for i in ids]},
    )
    return {r.id: r.last_event_sequence - counts[r.id] + 1 for r in rows}


async def insert_events(conn: AsyncConnection, rows: Sequence[tuple[str, int, int, bytes]]) -> None:
    """(task, sequence, kind, TaskEvent bytes) rows."""
    if rows:
        await conn.execute(
            text(
                "INSERT INTO task_events (task_id, sequence, kind, body) SELECT * FROM unnest("
                "CAST(:t AS text[]), CAST(:s AS bigint[]), CAST(:k AS smallint[]), CAST(:b AS bytea[]))"
            ),
            {
                "t": [r[0] for r in rows],
                "s": [r[1] for r in rows],
                "k": [r[2] for r in rows],
                "b": [r[3] for r in rows],
            },
        )


async def read_events(conn: AsyncConnection, task_id: str, after: int, limit: int) -> list[tuple[int, int, bytes]]:
    """(sequence, kind, body) of a task's events after ``after``, in order."""
    rows = await conn.execute(
        text(
            "SELECT sequence, kind, body FROM task_events WHERE task_id = :t AND sequence > :a"
            " ORDER BY sequence LIMIT :l"
        ),
        {"t": task_id, "a": after, "l": limit},
    )
    return [(r.sequence, r.kind, r.body) for r in rows]
