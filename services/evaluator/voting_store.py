"""PostgreSQL access for voting rounds, their solutions and ballots (evaluator schema, migration 0005)."""

from __future__ import annotations

import base64
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

UNDECIDED = 1000  # list position of a solution before the round is decided: after every ranked one


@dataclass
class Round:
    """A voting round as stored (the VotingRound body carries no solutions; they are rows of their own)."""

    id: str
    task_id: str
    subtask: str
    state: int
    method: int
    expected: int
    reviewers: int
    body: bytes
    create_time: datetime


@dataclass
class SolutionRow:
    """One competing solution as stored."""

    round_id: str
    id: str
    ordinal: int
    label: str
    subtask: str
    worker: str
    result_id: str
    evaluation_id: str
    usable: bool
    score: float | None
    rank: int
    selected: bool
    body: bytes


_ROUND = "id, task_id, subtask, state, method, expected, reviewers, body, create_time"
_SOLUTION = (
    "round_id, id, ordinal, label, subtask, worker, result_id, evaluation_id, usable, score, rank, selected, body"
)


class Ballot(NamedTuple):
    """One reviewer's ranking in a round."""

    review: str
    reviewer: str
    ranking: list[str]


def _round(row: Any) -> Round:
    return Round(
        row.id, row.task_id, row.subtask, row.state, row.method, row.expected, row.reviewers, bytes(row.body),
        row.create_time,
    )  # fmt: skip


def _solution(row: Any) -> SolutionRow:
    return SolutionRow(
        row.round_id, row.id, row.ordinal, row.label, row.subtask, row.worker, row.result_id, row.evaluation_id,
        row.usable, row.score, row.rank, row.selected, bytes(row.body),
    )  # fmt: skip


async def round_of(conn: AsyncConnection, task_id: str, subtask: str, lock: bool = False) -> Round | None:
    """The active round of a task's logical subtask (`tasks/{task}/subtasks/{subtask}`)."""
    sql = f"SELECT {_ROUND} FROM voting_rounds WHERE task_id = :t AND subtask = :s AND active"
    sql += " FOR UPDATE" if lock else ""
    row = (await conn.execute(text(sql), {"t": task_id, "s": subtask})).first()
    return _round(row) if row else None


async def get_round(conn: AsyncConnection, round_id: str, lock: bool = False) -> Round | None:
    """A round by id."""
    sql = f"SELECT {_ROUND} FROM voting_rounds WHERE id = :i" + (" FOR UPDATE" if lock else "")
    row = (await conn.execute(text(sql), {"i": round_id})).first()
    return _round(row) if row else None


async def insert_round(
    conn: AsyncConnection, round_id: str, task_id: str, subtask: str, state: int, method: int, expected: int,
    body: bytes,
) -> None:  # fmt: skip
    """Start a round (the caller holds the task's lock, so there is no race for one subtask)."""
    await conn.execute(
        text(
            "INSERT INTO voting_rounds (id, task_id, subtask, state, method, expected, body)"
            " VALUES (:i, :t, :s, :st, :m, :e, :b)"
        ),
        {"i": round_id, "t": task_id, "s": subtask, "st": state, "m": method, "e": expected, "b": body},
    )


async def update_round(conn: AsyncConnection, round_id: str, state: int, body: bytes, reviewers: int = 0) -> None:
    """Replace a round's state and body (and the reviewers it waits for)."""
    await conn.execute(
        text("UPDATE voting_rounds SET state = :s, body = :b, reviewers = greatest(reviewers, :k) WHERE id = :i"),
        {"i": round_id, "s": state, "b": body, "k": reviewers},
    )


async def rounds_of_task(conn: AsyncConnection, task_id: str, state: int) -> list[Round]:
    """A task's active rounds in ``state``, locked."""
    rows = await conn.execute(
        text(f"SELECT {_ROUND} FROM voting_rounds WHERE task_id = :t AND state = :s AND active ORDER BY id FOR UPDATE"),
        {"t": task_id, "s": state},
    )
    return [_round(r) for r in rows]


async def retire_rounds(conn: AsyncConnection, task_id: str, subtasks: Sequence[str]) -> None:
    """The rounds of these logical subtasks are history: their next solutions open new rounds."""
    await conn.execute(
        text("UPDATE voting_rounds SET active = false WHERE task_id = :t AND subtask = ANY(:s) AND active"),
        {"t": task_id, "s": list(subtasks)},
    )


async def put_solution(
    conn: AsyncConnection, round_id: str, key: str, ordinal: int, subtask: str, worker: str, result_id: str,
    evaluation_id: str, usable: bool, score: float | None, round_time: datetime, body: bytes,
) -> None:  # fmt: skip
    """Record a solution (a later result of the same solution subtask replaces it)."""
    await conn.execute(
        text(
            "INSERT INTO voting_solutions (round_id, id, ordinal, subtask, worker, result_id, evaluation_id, usable,"
            " score, position, round_time, body) VALUES (:r, :i, :o, :s, :w, :res, :e, :u, :sc, :p, :rt, :b)"
            " ON CONFLICT (round_id, id) DO UPDATE SET worker = excluded.worker, result_id = excluded.result_id,"
            " evaluation_id = excluded.evaluation_id, usable = excluded.usable, score = excluded.score,"
            " body = excluded.body"
        ),
        {
            "r": round_id,
            "i": key,
            "o": ordinal,
            "s": subtask,
            "w": worker,
            "res": result_id,
            "e": evaluation_id,
            "u": usable,
            "sc": score,
            "p": UNDECIDED + ordinal,
            "rt": round_time,
            "b": body,
        },  # fmt: skip
    )


async def solutions_of(conn: AsyncConnection, round_ids: Sequence[str]) -> list[SolutionRow]:
    """The solutions of the rounds, each round's in solution order (logical subtask first)."""
    rows = await conn.execute(
        text(f"SELECT {_SOLUTION} FROM voting_solutions WHERE round_id = ANY(:r) ORDER BY round_id, ordinal"),
        {"r": list(round_ids)},
    )
    return [_solution(r) for r in rows]


async def update_solution(
    conn: AsyncConnection, round_id: str, key: str, label: str, rank: int, selected: bool, body: bytes
) -> None:
    """A solution's label, place and body after labelling or the count."""
    await conn.execute(
        text(
            "UPDATE voting_solutions SET label = :l, rank = :k, selected = :s, body = :b,"
            " position = CASE WHEN :k > 0 THEN :k ELSE position END WHERE round_id = :r AND id = :i"
        ),
        {"r": round_id, "i": key, "l": label, "k": rank, "s": selected, "b": body},
    )


async def add_ballot(conn: AsyncConnection, round_id: str, review: str, reviewer: str, ranking: Sequence[str]) -> bool:
    """Record one reviewer's ranking once; False if this review was counted before."""
    row = await conn.execute(
        text(
            "INSERT INTO voting_ballots (round_id, review, reviewer, ranking) VALUES (:r, :v, :w, :k)"
            " ON CONFLICT DO NOTHING RETURNING review"
        ),
        {"r": round_id, "v": review, "w": reviewer, "k": list(ranking)},
    )
    return row.first() is not None


async def ballots_of(conn: AsyncConnection, round_id: str) -> list[Ballot]:
    """A round's ballots, in arrival order."""
    rows = await conn.execute(
        text("SELECT review, reviewer, ranking FROM voting_ballots WHERE round_id = :r ORDER BY create_time, review"),
        {"r": round_id},
    )
    return [Ballot(r.review, r.reviewer, list(r.ranking)) for r in rows]


async def insert_evaluation_now(
    conn: AsyncConnection, evaluation_id: str, task_id: str, subtask: str, verdict: int, body: bytes
) -> None:
    """Store an evaluation stamped with the statement's own clock, so it is the latest of its subtask even when
    an earlier one was written in the same transaction."""
    await conn.execute(
        text(
            "INSERT INTO evaluations (id, task_id, subtask, root, verdict, body, create_time)"
            " VALUES (:i, :t, :s, :s, :v, :b, clock_timestamp())"
        ),
        {"i": evaluation_id, "t": task_id, "s": subtask, "v": verdict, "b": body},
    )


# -- pages ----------------------------------------------------------------------------------------------------


def token_of(parts: Sequence[object]) -> str:
    """An opaque page token of a keyset position."""
    return base64.urlsafe_b64encode("|".join(str(p) for p in parts).encode()).decode()


def parse_token(token: str, count: int) -> list[str]:
    """The keyset position of a page token (ValueError when it is not one)."""
    parts = base64.urlsafe_b64decode(token.encode()).decode().split("|")
    if len(parts) != count:
        raise ValueError("not a page token")
    return parts


async def list_rounds(
    conn: AsyncConnection, where: dict[str, Any], after: tuple[datetime, str] | None, limit: int
) -> list[Round]:
    """A page of rounds, oldest first; ``where`` maps a column (task_id, subtask, state, method) to its value."""
    clauses = [f"{column} = :{column}" for column in where]
    params = dict(where)
    if after is not None:
        clauses.append("(create_time, id) > (:at, :aid)")
        params.update(at=after[0], aid=after[1])
    sql = f"SELECT {_ROUND} FROM voting_rounds"
    if clauses:
        sql += " WHERE " + " AND ".join(clauses)
    rows = await conn.execute(text(sql + " ORDER BY create_time, id LIMIT :limit"), {**params, "limit": limit})
    return [_round(r) for r in rows]


async def list_solutions(
    conn: AsyncConnection, where: dict[str, Any], after: tuple[datetime, str, int] | None, limit: int
) -> list[tuple[SolutionRow, datetime, int]]:
    """A page of solutions: round by round (oldest first), each round's best first, undecided last.

    ``where`` maps a column (round_id, subtask, worker, selected, rank) to its value.
    """
    clauses = [f"{column} = :{column}" for column in where]
    params = dict(where)
    if after is not None:
        clauses.append("(round_time, round_id, position) > (:at, :aid, :ap)")
        params.update(at=after[0], aid=after[1], ap=after[2])
    sql = f"SELECT {_SOLUTION}, round_time, position FROM voting_solutions"
    if clauses:
        sql += " WHERE " + " AND ".join(clauses)
    sql += " ORDER BY round_time, round_id, position LIMIT :limit"
    rows = await conn.execute(text(sql), {**params, "limit": limit})
    return [(_solution(r), r.round_time, r.position) for r in rows]
