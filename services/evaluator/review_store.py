"""PostgreSQL access for peer review (migration 0004): evaluations waiting for their reviews, and the reviews."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from . import store
from .scorers import Dimension, Finding, Measure, Severity


@dataclass
class Wait:
    """An evaluation waiting for ``expected`` peer reviews of one attempt."""

    evaluation_id: str
    task_id: str
    subtask: str
    attempt: int
    result_id: str
    expected: int
    measures: list[tuple[str, Measure]]
    broken: list[str]
    done: bool


def measures_json(measures: Sequence[tuple[str, Measure]]) -> str:
    """(scorer, measure) pairs as JSON, to combine with the reviews later."""
    return json.dumps(
        [
            {
                "scorer": name,
                "dimension": int(m.dimension),
                "score": m.score,
                "summary": m.summary,
                "findings": [
                    {
                        "path": f.path,
                        "line": f.line,
                        "severity": int(f.severity),
                        "message": f.message,
                        "rule": f.rule,
                        "scorer": f.scorer,
                    }
                    for f in m.findings
                ],  # fmt: skip
            }
            for name, m in measures
        ]
    )


def _measures(raw: Any) -> list[tuple[str, Measure]]:
    items = json.loads(raw) if isinstance(raw, str) else raw
    return [
        (
            item["scorer"],
            Measure(
                Dimension(item["dimension"]),
                float(item["score"]),
                item["summary"],
                tuple(
                    Finding(f["path"], f["line"], Severity(f["severity"]), f["message"], f["rule"], f["scorer"])
                    for f in item["findings"]
                ),
            ),
        )
        for item in items
    ]


async def insert_wait(
    conn: AsyncConnection,
    evaluation_id: str,
    task_id: str,
    subtask: str,
    attempt: int,
    result_id: str,
    expected: int,
    measures: Sequence[tuple[str, Measure]],
    broken: Sequence[str],
) -> None:
    """An evaluation now waits for ``expected`` reviews."""
    await conn.execute(
        text(
            "INSERT INTO review_waits (evaluation_id, task_id, subtask, attempt, result_id, expected, measures, broken)"
            " VALUES (:e, :t, :s, :a, :r, :x, CAST(:m AS jsonb), CAST(:b AS text[]))"
        ),
        {
            "e": evaluation_id,
            "t": task_id,
            "s": subtask,
            "a": attempt,
            "r": result_id,
            "x": expected,
            "m": measures_json(measures),
            "b": list(broken),
        },  # fmt: skip
    )


async def wait_for(conn: AsyncConnection, task_id: str, subtask: str, attempt: int) -> Wait | None:
    """The evaluation of ``subtask``'s ``attempt`` that waits for reviews (locked), newest first."""
    row = (
        await conn.execute(
            text(
                "SELECT evaluation_id, task_id, subtask, attempt, result_id, expected, measures, broken, done"
                " FROM review_waits WHERE task_id = :t AND subtask = :s AND attempt = :a"
                " ORDER BY create_time DESC LIMIT 1 FOR UPDATE"
            ),
            {"t": task_id, "s": subtask, "a": attempt},
        )
    ).first()
    if row is None:
        return None
    return Wait(
        row.evaluation_id, row.task_id, row.subtask, row.attempt, row.result_id, row.expected, _measures(row.measures),
        list(row.broken), bool(row.done),
    )  # fmt: skip


async def finish_wait(conn: AsyncConnection, evaluation_id: str) -> None:
    """Every review of the evaluation is in and it is decided."""
    await conn.execute(text("UPDATE review_waits SET done = true WHERE evaluation_id = :e"), {"e": evaluation_id})


async def insert_review(
    conn: AsyncConnection,
    review_id: str,
    result_id: str,
    evaluation_id: str,
    task_id: str,
    subtask: str,
    attempt: int,
    review_subtask: str,
    reviewer: str,
    state: int,
    recommendation: int,
    body: bytes,
) -> bool:
    """Store a review once per REVIEW result; False if that result was recorded before."""
    row = await conn.execute(
        text(
            "INSERT INTO reviews (id, result_id, evaluation_id, task_id, subtask, attempt, review_subtask, reviewer,"
            " state, recommendation, body) VALUES (:i, :r, :e, :t, :s, :a, :rs, :w, :st, :rc, :b)"
            " ON CONFLICT DO NOTHING RETURNING id"
        ),
        {
            "i": review_id,
            "r": result_id,
            "e": evaluation_id,
            "t": task_id,
            "s": subtask,
            "a": attempt,
            "rs": review_subtask,
            "w": reviewer,
            "st": state,
            "rc": recommendation,
            "b": body,
        },  # fmt: skip
    )
    return row.first() is not None


async def reviews_of(conn: AsyncConnection, evaluation_id: str) -> list[bytes]:
    """The reviews fed into an evaluation, oldest first."""
    rows = await conn.execute(
        text("SELECT body FROM reviews WHERE evaluation_id = :e ORDER BY create_time, id"), {"e": evaluation_id}
    )
    return [bytes(r.body) for r in rows]


async def reviews_of_attempt(conn: AsyncConnection, task_id: str, subtask: str, attempt: int) -> list[bytes]:
    """The reviews of one attempt of a subtask, oldest first."""
    rows = await conn.execute(
        text("SELECT body FROM reviews WHERE task_id = :t AND subtask = :s AND attempt = :a ORDER BY create_time, id"),
        {"t": task_id, "s": subtask, "a": attempt},
    )
    return [bytes(r.body) for r in rows]


async def get_review(conn: AsyncConnection, review_id: str) -> bytes | None:
    """A review's body."""
    row = (await conn.execute(text("SELECT body FROM reviews WHERE id = :i"), {"i": review_id})).first()
    return bytes(row.body) if row else None


async def list_reviews(
    conn: AsyncConnection, where: dict[str, Any], after: tuple[datetime, str] | None, limit: int
) -> list[store.PageRow]:
    """A page of reviews, oldest first; ``where`` maps a column (task_id, subtask, attempt, review_subtask,
    reviewer, state, recommendation) to its value."""
    return await store.page(conn, "reviews", where, after, limit)


async def update_evaluation(conn: AsyncConnection, evaluation_id: str, verdict: int, body: bytes) -> None:
    """Complete an evaluation that waited for its reviews."""
    await conn.execute(
        text("UPDATE evaluations SET verdict = :v, body = :b WHERE id = :i"),
        {"v": verdict, "b": body, "i": evaluation_id},
    )
