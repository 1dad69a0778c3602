"""Saved templates and the counts StatsService reports."""

from __future__ import annotations

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from .rows import (
    S,
)


async def get_template(conn: AsyncConnection, template_id: str) -> tuple[bytes, str] | None:
    """A saved template's body and etag."""
    row = (await conn.execute(text("SELECT body, etag FROM templates WHERE id = :id"), {"id": template_id})).first()
    return (bytes(row.body), row.etag) if row else None


async def update_template(conn: AsyncConnection, template_id: str, body: bytes, etag: str) -> None:
    """Replace a saved template's body."""
    await conn.execute(
        text("UPDATE templates SET body = :b, etag = :e, update_time = now() WHERE id = :id"),
        {"id": template_id, "b": body, "e": etag},
    )


async def insert_template(conn: AsyncConnection, template_id: str, body: bytes, creator: str, etag: str) -> bool:
    """Insert a new saved template; False if the id is taken."""
    result = await conn.execute(
        text(
            "INSERT INTO templates (id, body, creator, etag) VALUES (:id, :b, :c, :e)"
            " ON CONFLICT DO NOTHING RETURNING id"
        ),
        {"id": template_id, "b": body, "c": creator, "e": etag},
    )
    return result.first() is not None


async def delete_template(conn: AsyncConnection, template_id: str) -> bool:
    """Delete a saved template; False if there was none."""
    result = await conn.execute(text("DELETE FROM templates WHERE id = :id RETURNING id"), {"id": template_id})
    return result.first() is not None


async def list_templates(conn: AsyncConnection) -> list[bytes]:
    """Every saved template's body, by id."""
    rows = await conn.execute(text("SELECT body FROM templates ORDER BY id"))
    return [bytes(r.body) for r in rows]


async def state_counts(conn: AsyncConnection) -> tuple[dict[int, int], dict[int, int], int, int]:
    """Tasks by state, subtasks by state, unschedulable READY subtasks, leased slots in use."""
    tasks: dict[int, int] = {
        r.state: r.n for r in await conn.execute(text("SELECT state, count(*) AS n FROM tasks GROUP BY state"))
    }
    subtasks: dict[int, int] = {
        r.state: r.n for r in await conn.execute(text("SELECT state, count(*) AS n FROM subtasks GROUP BY state"))
    }
    unsched = (
        await conn.execute(text(f"SELECT count(*) FROM subtasks WHERE state = {S.READY:d} AND unschedulable_code <> 0"))
    ).scalar_one()
    used = subtasks.get(int(S.ASSIGNED), 0) + subtasks.get(int(S.RUNNING), 0)
    return (
        {int(k): int(v) for k, v in tasks.items()},
        {int(k): int(v) for k, v in subtasks.items()},
        int(unsched),
        int(used),
    )
