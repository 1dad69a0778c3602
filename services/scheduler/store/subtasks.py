"""Queries on subtasks: claims, leases, requeue, dependency release, expiry and limits (batched, arrays in)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from .rows import (
    LEASED_STATES,
    LIVE_STATES,
    SUBTASK_COLS,
    SUBTASK_FIELDS,
    S,
    SubtaskRow,
    T,
    prefixed,
    subtask_rows,
)


async def get_subtasks(
    conn: AsyncConnection, task_id: str, keys: Sequence[str] | None = None, lock: bool = False
) -> list[SubtaskRow]:
    """Subtasks of a task (all, or the given keys), in plan order."""
    sql = f"SELECT {SUBTASK_COLS} FROM subtasks WHERE task_id = :t"
    params: dict[str, Any] = {"t": task_id}
    if keys is not None:
        sql += " AND key = ANY(:keys)"
        params["keys"] = list(keys)
    sql += " ORDER BY " + ("key FOR UPDATE" if lock else "ordinal")
    return subtask_rows((await conn.execute(text(sql), params)).all())


async def page_subtasks(
    conn: AsyncConnection, task_id: str, where: str, params: dict[str, Any], after: int, limit: int
) -> list[SubtaskRow]:
    """A page of one task's subtasks in plan order."""
    sql = f"SELECT {SUBTASK_COLS} FROM subtasks WHERE task_id = :t AND ordinal > :after"
    if where:
        sql += f" AND {where}"
    sql += " ORDER BY ordinal LIMIT :limit"
    rows = await conn.execute(text(sql), {**params, "t": task_id, "after": after, "limit": limit})
    return subtask_rows(rows.all())


async def lock_subtasks(conn: AsyncConnection, pairs: Sequence[tuple[str, str]]) -> dict[tuple[str, str], SubtaskRow]:
    """Lock the given (task, key) subtasks in key order."""
    if not pairs:
        return {}
    rows = await conn.execute(
        text(
            f"SELECT {SUBTASK_COLS} FROM subtasks WHERE (task_id, key) IN"
            " (SELECT * FROM unnest(CAST(:t AS text[]), CAST(:k AS text[])))"
            " ORDER BY task_id, key FOR UPDATE"
        ),
        {"t": [p[0] for p in pairs], "k": [p[1] for p in pairs]},
    )
    return {(s.task_id, s.key): s for s in subtask_rows(rows.all())}


async def claim_candidates(conn: AsyncConnection, limit: int) -> list[dict[str, Any]]:
    """Lock up to ``limit`` READY subtasks whose backoff has passed, best first; skip rows others hold."""
    rows = await conn.execute(
        text(
            "SELECT s.task_id, s.key, s.tool_kind, s.required_labels, s.privacy_level, s.priority,"
            " s.task_priority, s.ready_time, t.running_count, t.max_concurrency, s.attempt_limit_s,"
            " s.avoid_worker, s.avoid_tool, s.avoid_tool_hard"
            " FROM subtasks s JOIN tasks t ON t.id = s.task_id"
            f" WHERE s.state = {S.READY:d} AND t.state <> {T.WAITING_CHECKPOINT:d}"
            " AND (s.next_attempt_time IS NULL OR s.next_attempt_time <= now())"
            " ORDER BY s.task_priority DESC, s.priority DESC, s.ready_time"
            " LIMIT :limit FOR UPDATE OF s SKIP LOCKED"
        ),
        {"limit": limit},
    )
    return [dict(r._mapping) for r in rows]


async def mark_assigned(
    conn: AsyncConnection, rows: Sequence[tuple[str, str, str, int, float]], lease_ttl_s: float
) -> list[SubtaskRow]:
    """(task, key, worker, tool, attempt seconds) → ASSIGNED with attempt+1 and a fresh lease."""
    result = await conn.execute(
        text(
            f"UPDATE subtasks s SET state = {S.ASSIGNED:d}, attempt = s.attempt + 1, worker = v.worker, tool = v.tool,"
            " lease_expire_time = now() + make_interval(secs => :ttl),"
            " attempt_deadline = now() + make_interval(secs => v.secs),"
            " start_time = coalesce(s.start_time, now()), unschedulable_code = 0, unschedulable_message = '',"
            " unschedulable_since = NULL, progress_percent = 0, progress_message = '', update_time = now()"
            " FROM unnest(CAST(:t AS text[]), CAST(:k AS text[]), CAST(:w AS text[]), CAST(:tool AS smallint[]),"
            " CAST(:secs AS float8[])) AS v(task_id, key, worker, tool, secs)"
            f" WHERE s.task_id = v.task_id AND s.key = v.key RETURNING {prefixed('s', SubtaskRow)}"
        ),
        {
            "t": [r[0] for r in rows],
            "k": [r[1] for r in rows],
            "w": [r[2] for r in rows],
            "tool": [r[3] for r in rows],
            "secs": [r[4] for r in rows],
            "ttl": lease_ttl_s,
        },
    )
    return subtask_rows(result.all())


async def set_subtask_states(conn: AsyncConnection, changes: Sequence[dict[str, Any]]) -> None:
    """Apply per-subtask updates: each dict has task_id, key and the columns to set (same keys per call)."""
    if not changes:
        return
    columns = [c for c in changes[0] if c not in ("task_id", "key")]
    sets = ", ".join(f"{c} = :{c}" for c in columns)
    await conn.execute(
        text(f"UPDATE subtasks SET {sets}, update_time = now() WHERE task_id = :task_id AND key = :key"),
        list(changes),
    )


async def requeue(
    conn: AsyncConnection,
    pairs: Sequence[tuple[str, str]],
    count_failure: bool,
    backoff_base_s: float,
    backoff_max_s: float = 300.0,
) -> None:
    """Send leased subtasks back to READY (after backoff when the attempt counts as a failure)."""
    if not pairs:
        return
    await conn.execute(
        text(
            f"UPDATE subtasks s SET state = {S.READY:d}, worker = NULL, lease_expire_time = NULL,"
            " attempt_deadline = NULL,"
            " failures = s.failures + :f, ready_time = now(), update_time = now(),"
            " next_attempt_time = CASE WHEN :f = 1"
            "   THEN now() + make_interval(secs => least(:most, :base * power(2, s.failures))) END"
            " FROM unnest(CAST(:t AS text[]), CAST(:k AS text[])) AS v(task_id, key)"
            " WHERE s.task_id = v.task_id AND s.key = v.key"
        ),
        {
            "t": [p[0] for p in pairs],
            "k": [p[1] for p in pairs],
            "f": 1 if count_failure else 0,
            "base": backoff_base_s,
            "most": backoff_max_s,
        },
    )


async def release_dependents(conn: AsyncConnection, done: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """One dependency of each dependent of ``done`` is satisfied; returns the subtasks now READY."""
    if not done:
        return []
    rows = await conn.execute(
        text(
            "WITH d AS (SELECT s.task_id, unnest(s.dependents) AS key FROM subtasks s"
            "  WHERE (s.task_id, s.key) IN (SELECT * FROM unnest(CAST(:t AS text[]), CAST(:k AS text[])))),"
            " c AS (SELECT task_id, key, count(*) AS n FROM d GROUP BY task_id, key ORDER BY task_id, key)"
            " UPDATE subtasks s SET deps_remaining = s.deps_remaining - c.n,"
            f"  state = CASE WHEN s.deps_remaining - c.n = 0 AND s.state = {S.PENDING:d} THEN {S.READY:d}"
            "   ELSE s.state END,"
            f"  ready_time = CASE WHEN s.deps_remaining - c.n = 0 AND s.state = {S.PENDING:d} THEN now()"
            "   ELSE s.ready_time END,"
            "  update_time = now()"
            " FROM c WHERE s.task_id = c.task_id AND s.key = c.key"
            " RETURNING s.task_id, s.key, s.state"
        ),
        {"t": [p[0] for p in done], "k": [p[1] for p in done]},
    )
    return [(r.task_id, r.key) for r in rows if r.state == S.READY]


async def cancel_live_subtasks(conn: AsyncConnection, task_ids: Sequence[str], message: str) -> list[SubtaskRow]:
    """Cancel every live subtask of the tasks; returns them as they were before."""
    rows = await conn.execute(
        text(
            f"WITH old AS (SELECT {SUBTASK_COLS} FROM subtasks WHERE task_id = ANY(:ids) AND state = ANY(:live)"
            "  ORDER BY task_id, key FOR UPDATE)"
            f" UPDATE subtasks s SET state = {S.CANCELLED:d}, state_message = :m, end_time = now(),"
            " update_time = now(),"
            "  lease_expire_time = NULL FROM old WHERE s.task_id = old.task_id AND s.key = old.key"
            f" RETURNING {prefixed('old', SubtaskRow)}"
        ),
        {"ids": list(task_ids), "live": LIVE_STATES, "m": message},
    )
    return subtask_rows(rows.all())


async def renew_leases(conn: AsyncConnection, workers: Sequence[str], lease_ttl_s: float) -> None:
    """Extend every lease the given (heartbeating) workers hold."""
    if workers:
        await conn.execute(
            text(
                "UPDATE subtasks SET lease_expire_time = now() + make_interval(secs => :ttl)"
                " WHERE worker = ANY(:w) AND state = ANY(:leased)"
            ),
            {"w": list(workers), "ttl": lease_ttl_s, "leased": LEASED_STATES},
        )


async def expired_leases(conn: AsyncConnection, grace_s: float, limit: int = 500) -> list[SubtaskRow]:
    """Lock leased subtasks whose lease expired, or whose attempt deadline passed ``grace_s`` ago."""
    rows = await conn.execute(
        text(
            f"SELECT {SUBTASK_COLS} FROM subtasks WHERE state = ANY(:leased) AND (lease_expire_time < now()"
            "  OR attempt_deadline < now() - make_interval(secs => :grace))"
            " ORDER BY task_id, key LIMIT :limit FOR UPDATE SKIP LOCKED"
        ),
        {"leased": LEASED_STATES, "grace": grace_s, "limit": limit},
    )
    return subtask_rows(rows.all())


async def overdue(conn: AsyncConnection, limit: int = 500) -> list[tuple[SubtaskRow, str]]:
    """Lock live subtasks past their queue-wait or total time limit, with the limit they broke."""
    rows = await conn.execute(
        text(
            f"SELECT {SUBTASK_COLS}, CASE WHEN state = {S.READY:d} AND queue_wait_limit_s > 0"
            "  AND ready_time < now() - make_interval(secs => queue_wait_limit_s) THEN 'queue_wait'"
            " ELSE 'total' END AS broken"
            f" FROM subtasks WHERE (state = {S.READY:d} AND queue_wait_limit_s > 0"
            "  AND ready_time < now() - make_interval(secs => queue_wait_limit_s))"
            " OR (state = ANY(:live) AND total_limit_s > 0"
            "  AND start_time < now() - make_interval(secs => total_limit_s))"
            " ORDER BY task_id, key LIMIT :limit FOR UPDATE SKIP LOCKED"
        ),
        {"live": [int(S.READY), *LEASED_STATES], "limit": limit},
    )
    return [(SubtaskRow(**{c: r._mapping[c] for c in SUBTASK_FIELDS}), r._mapping["broken"]) for r in rows]


async def leases_of(conn: AsyncConnection, workers: Sequence[str]) -> dict[str, dict[tuple[str, str], SubtaskRow]]:
    """The subtasks each of ``workers`` holds now (one query for all of them)."""
    rows = await conn.execute(
        text(f"SELECT {SUBTASK_COLS} FROM subtasks WHERE worker = ANY(:w) AND state = ANY(:leased)"),
        {"w": list(workers), "leased": LEASED_STATES},
    )
    held: dict[str, dict[tuple[str, str], SubtaskRow]] = {w: {} for w in workers}
    for s in subtask_rows(rows.all()):
        held[s.worker or ""][(s.task_id, s.key)] = s
    return held


async def set_unschedulable(conn: AsyncConnection, marks: Sequence[tuple[str, str, int, str]]) -> None:
    """Record (or clear, code 0) why READY subtasks cannot be placed."""
    if not marks:
        return
    await conn.execute(
        text(
            "UPDATE subtasks s SET unschedulable_code = v.code, unschedulable_message = v.msg,"
            " unschedulable_since = CASE WHEN v.code = 0 THEN NULL ELSE coalesce(s.unschedulable_since, now()) END"
            " FROM unnest(CAST(:t AS text[]), CAST(:k AS text[]), CAST(:c AS smallint[]), CAST(:m AS text[]))"
            f" AS v(task_id, key, code, msg) WHERE s.task_id = v.task_id AND s.key = v.key AND s.state = {S.READY:d}"
            " AND s.unschedulable_code IS DISTINCT FROM v.code"
        ),
        {
            "t": [m[0] for m in marks],
            "k": [m[1] for m in marks],
            "c": [m[2] for m in marks],
            "m": [m[3] for m in marks],
        },
    )


async def ready_sample(conn: AsyncConnection, limit: int) -> list[dict[str, Any]]:
    """READY subtasks waiting longest (to judge whether any agent could ever take them)."""
    rows = await conn.execute(
        text(
            "SELECT s.task_id, s.key, s.tool_kind, s.required_labels, s.privacy_level, s.priority,"
            " s.task_priority, s.ready_time, 0 AS running_count, 0 AS max_concurrency,"
            " s.avoid_worker, s.avoid_tool, s.avoid_tool_hard"
            f" FROM subtasks s WHERE s.state = {S.READY:d} ORDER BY s.ready_time LIMIT :limit"
        ),
        {"limit": limit},
    )
    return [dict(r._mapping) for r in rows]
