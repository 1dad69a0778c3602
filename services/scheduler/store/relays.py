"""What the relays to the other services read and write: their cursors over the event log, and their lock."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection


async def relay_cursor(conn: AsyncConnection, name: str) -> int:
    """The last task event id the relay ``name`` delivered (0 before its first)."""
    found = await conn.execute(text("SELECT last_id FROM relay_cursor WHERE name = :n"), {"n": name})
    return int(found.scalar_one_or_none() or 0)


async def advance_cursor(conn: AsyncConnection, name: str, last_id: int) -> None:
    """Record that the relay ``name`` delivered every event up to ``last_id`` (never moves it back)."""
    await conn.execute(
        text(
            "INSERT INTO relay_cursor (name, last_id) VALUES (:n, :i)"
            " ON CONFLICT (name) DO UPDATE SET last_id = greatest(relay_cursor.last_id, excluded.last_id)"
        ),
        {"n": name, "i": last_id},
    )


async def events_after(conn: AsyncConnection, after: int, kinds: Sequence[int], limit: int) -> list[Any]:
    """Up to ``limit`` task events of ``kinds`` past the id ``after``, oldest first (rows: id, task_id, kind,
    body)."""
    rows = await conn.execute(
        text("SELECT id, task_id, kind, body FROM task_events WHERE id > :c AND kind = ANY(:k) ORDER BY id LIMIT :n"),
        {"c": after, "k": list(kinds), "n": limit},
    )
    return list(rows.all())


async def try_session_lock(conn: AsyncConnection, key: int) -> bool:
    """Take the session-level advisory lock ``key`` on ``conn`` if no other session holds it. The lock lasts
    as long as the connection (no transaction stays open for it): run this on an AUTOCOMMIT connection."""
    return bool((await conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": key})).scalar())


async def still_connected(conn: AsyncConnection) -> None:
    """Raise if ``conn`` (and so a session lock on it) is gone."""
    await conn.execute(text("SELECT 1"))


async def tool_stats(conn: AsyncConnection, workers: Sequence[str]) -> list[Any]:
    """Each of ``workers``' totals per tool (rows: worker, tool, finished, succeeded, total_duration_ms)."""
    rows = await conn.execute(
        text(
            "SELECT worker, tool, finished, succeeded, total_duration_ms FROM worker_tool_stats WHERE worker = ANY(:w)"
        ),
        {"w": list(workers)},
    )
    return list(rows.all())
