"""PostgreSQL access for the scheduler schema: every query the scheduler runs, batched.

Hot-path statements (claims, result commits, lease renewals, expiry) take arrays and touch many
rows per round trip, so throughput is bounded by PostgreSQL's commit rate divided by the batch
size rather than by per-item round trips. Row locks are always taken subtasks first, then tasks,
each in key order, so concurrent replicas cannot deadlock on each other's batches.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from .states import LEASED, LIVE_SUBTASK, SubtaskState, TaskState

_LEASED = sorted(int(s) for s in LEASED)
_LIVE = sorted(int(s) for s in LIVE_SUBTASK)


@dataclass
class TaskRow:
    """A task as stored."""

    id: str
    creator: str
    body: bytes
    state: int
    state_message: str
    priority: int
    max_concurrency: int
    labels: dict[str, str]
    subtask_count: int
    succeeded_count: int
    failed_count: int
    cancelled_count: int
    running_count: int
    last_event_sequence: int
    create_time: datetime
    start_time: datetime | None
    end_time: datetime | None
    update_time: datetime
    excused_count: int = 0  # subtasks that do not decide the outcome (failed reviews, solutions not selected)
    final_accept: int = 0  # BEFORE_FINAL_ACCEPT: 0 not asked, 1 waiting for a person, 2 given


@dataclass
class SubtaskRow:
    """A subtask as stored."""

    task_id: str
    key: str
    ordinal: int
    body: bytes
    state: int
    state_message: str
    attempt: int
    failures: int
    max_attempts: int
    priority: int
    task_priority: int
    tool_kind: int
    privacy_level: int
    required_labels: dict[str, str]
    dependencies: list[str]
    dependents: list[str]
    deps_remaining: int
    worker: str | None
    tool: int
    lease_expire_time: datetime | None
    attempt_deadline: datetime | None
    next_attempt_time: datetime | None
    progress_percent: int
    progress_message: str
    unschedulable_code: int
    unschedulable_message: str
    unschedulable_since: datetime | None
    create_time: datetime
    ready_time: datetime | None
    start_time: datetime | None
    end_time: datetime | None
    update_time: datetime
    corrects: str = ""
    correction_cycle: int = 0
    feedback: list[bytes] = field(default_factory=list)
    evaluation: str = ""
    evaluation_score: float = 0.0
    grade: int = 0
    checkpoint: str = ""
    review_of: str = ""  # a REVIEW subtask: the key of the subtask it reviews
    solution_of: str = ""  # a voting solution: the key of the logical subtask it competes for


_TASK_COLS = ", ".join(TaskRow.__dataclass_fields__)
_SUBTASK_COLS = ", ".join(SubtaskRow.__dataclass_fields__)


def _prefixed(alias: str, row_type: type[TaskRow] | type[SubtaskRow]) -> str:
    return ", ".join(f"{alias}.{c}" for c in row_type.__dataclass_fields__)


def _tasks(rows: Sequence[Any]) -> list[TaskRow]:
    return [TaskRow(*r) for r in rows]


def _subtasks(rows: Sequence[Any]) -> list[SubtaskRow]:
    return [SubtaskRow(*r) for r in rows]


# -- tasks ----------------------------------------------------------------------------------------------


async def find_task_by_request(conn: AsyncConnection, creator: str, request_id: str) -> TaskRow | None:
    """The task an earlier CreateTask with the same request id made, if any."""
    rows = await conn.execute(
        text(f"SELECT {_TASK_COLS} FROM tasks WHERE creator = :c AND request_id = :r"),
        {"c": creator, "r": request_id},
    )
    found = _tasks(rows.all())
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
            " :deps_remaining, CASE WHEN :state = 2 THEN now() END, :attempt_limit_s, :queue_wait_limit_s,"
            " :total_limit_s, :solution_of)"
        ),
        [{"solution_of": "", **s} for s in subtasks],
    )


async def get_task(conn: AsyncConnection, task_id: str, lock: bool = False) -> TaskRow | None:
    """One task, optionally locked for update."""
    suffix = " FOR UPDATE" if lock else ""
    rows = await conn.execute(text(f"SELECT {_TASK_COLS} FROM tasks WHERE id = :id{suffix}"), {"id": task_id})
    found = _tasks(rows.all())
    return found[0] if found else None


async def lock_tasks(conn: AsyncConnection, task_ids: Sequence[str]) -> dict[str, TaskRow]:
    """Lock several tasks in id order and return them."""
    rows = await conn.execute(
        text(f"SELECT {_TASK_COLS} FROM tasks WHERE id = ANY(:ids) ORDER BY id FOR UPDATE"),
        {"ids": sorted(set(task_ids))},
    )
    return {t.id: t for t in _tasks(rows.all())}


async def list_tasks(
    conn: AsyncConnection, where: str, params: dict[str, Any], limit: int, after: tuple[datetime, str] | None
) -> list[TaskRow]:
    """A page of tasks, newest first, keyset-paginated by (create_time, id)."""
    clauses = [where] if where else []
    if after is not None:
        clauses.append("(create_time, id) < (:after_time, :after_id)")
        params = {**params, "after_time": after[0], "after_id": after[1]}
    sql = f"SELECT {_TASK_COLS} FROM tasks"
    if clauses:
        sql += " WHERE " + " AND ".join(clauses)
    sql += " ORDER BY create_time DESC, id DESC LIMIT :limit"
    rows = await conn.execute(text(sql), {**params, "limit": limit})
    return _tasks(rows.all())


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


# -- subtasks -------------------------------------------------------------------------------------------


async def get_subtasks(
    conn: AsyncConnection, task_id: str, keys: Sequence[str] | None = None, lock: bool = False
) -> list[SubtaskRow]:
    """Subtasks of a task (all, or the given keys), in plan order."""
    sql = f"SELECT {_SUBTASK_COLS} FROM subtasks WHERE task_id = :t"
    params: dict[str, Any] = {"t": task_id}
    if keys is not None:
        sql += " AND key = ANY(:keys)"
        params["keys"] = list(keys)
    sql += " ORDER BY " + ("key FOR UPDATE" if lock else "ordinal")
    return _subtasks((await conn.execute(text(sql), params)).all())


async def page_subtasks(
    conn: AsyncConnection, task_id: str, where: str, params: dict[str, Any], after: int, limit: int
) -> list[SubtaskRow]:
    """A page of one task's subtasks in plan order."""
    sql = f"SELECT {_SUBTASK_COLS} FROM subtasks WHERE task_id = :t AND ordinal > :after"
    if where:
        sql += f" AND {where}"
    sql += " ORDER BY ordinal LIMIT :limit"
    rows = await conn.execute(text(sql), {**params, "t": task_id, "after": after, "limit": limit})
    return _subtasks(rows.all())


async def lock_subtasks(conn: AsyncConnection, pairs: Sequence[tuple[str, str]]) -> dict[tuple[str, str], SubtaskRow]:
    """Lock the given (task, key) subtasks in key order."""
    if not pairs:
        return {}
    rows = await conn.execute(
        text(
            f"SELECT {_SUBTASK_COLS} FROM subtasks WHERE (task_id, key) IN"
            " (SELECT * FROM unnest(CAST(:t AS text[]), CAST(:k AS text[])))"
            " ORDER BY task_id, key FOR UPDATE"
        ),
        {"t": [p[0] for p in pairs], "k": [p[1] for p in pairs]},
    )
    return {(s.task_id, s.key): s for s in _subtasks(rows.all())}


async def claim_candidates(conn: AsyncConnection, limit: int) -> list[dict[str, Any]]:
    """Lock up to ``limit`` READY subtasks whose backoff has passed, best first; skip rows others hold."""
    rows = await conn.execute(
        text(
            "SELECT s.task_id, s.key, s.tool_kind, s.required_labels, s.privacy_level, s.priority,"
            " s.task_priority, s.ready_time, t.running_count, t.max_concurrency, s.attempt_limit_s,"
            " s.avoid_worker, s.avoid_tool, s.avoid_tool_hard"
            " FROM subtasks s JOIN tasks t ON t.id = s.task_id"
            " WHERE s.state = 2 AND t.state <> 3 AND (s.next_attempt_time IS NULL OR s.next_attempt_time <= now())"
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
            "UPDATE subtasks s SET state = 3, attempt = s.attempt + 1, worker = v.worker, tool = v.tool,"
            " lease_expire_time = now() + make_interval(secs => :ttl),"
            " attempt_deadline = now() + make_interval(secs => v.secs),"
            " start_time = coalesce(s.start_time, now()), unschedulable_code = 0, unschedulable_message = '',"
            " unschedulable_since = NULL, progress_percent = 0, progress_message = '', update_time = now()"
            " FROM unnest(CAST(:t AS text[]), CAST(:k AS text[]), CAST(:w AS text[]), CAST(:tool AS smallint[]),"
            " CAST(:secs AS float8[])) AS v(task_id, key, worker, tool, secs)"
            f" WHERE s.task_id = v.task_id AND s.key = v.key RETURNING {_prefixed('s', SubtaskRow)}"
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
    return _subtasks(result.all())


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
    conn: AsyncConnection, pairs: Sequence[tuple[str, str]], count_failure: bool, backoff_base_s: float
) -> None:
    """Send leased subtasks back to READY (after backoff when the attempt counts as a failure)."""
    if not pairs:
        return
    await conn.execute(
        text(
            "UPDATE subtasks s SET state = 2, worker = NULL, lease_expire_time = NULL, attempt_deadline = NULL,"
            " failures = s.failures + :f, ready_time = now(), update_time = now(),"
            " next_attempt_time = CASE WHEN :f = 1"
            "   THEN now() + make_interval(secs => least(300, :base * power(2, s.failures))) END"
            " FROM unnest(CAST(:t AS text[]), CAST(:k AS text[])) AS v(task_id, key)"
            " WHERE s.task_id = v.task_id AND s.key = v.key"
        ),
        {
            "t": [p[0] for p in pairs],
            "k": [p[1] for p in pairs],
            "f": 1 if count_failure else 0,
            "base": backoff_base_s,
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
            "  state = CASE WHEN s.deps_remaining - c.n = 0 AND s.state = 1 THEN 2 ELSE s.state END,"
            "  ready_time = CASE WHEN s.deps_remaining - c.n = 0 AND s.state = 1 THEN now() ELSE s.ready_time END,"
            "  update_time = now()"
            " FROM c WHERE s.task_id = c.task_id AND s.key = c.key"
            " RETURNING s.task_id, s.key, s.state"
        ),
        {"t": [p[0] for p in done], "k": [p[1] for p in done]},
    )
    return [(r[0], r[1]) for r in rows if r[2] == SubtaskState.READY]


async def cancel_live_subtasks(conn: AsyncConnection, task_ids: Sequence[str], message: str) -> list[SubtaskRow]:
    """Cancel every live subtask of the tasks; returns them as they were before."""
    rows = await conn.execute(
        text(
            f"WITH old AS (SELECT {_SUBTASK_COLS} FROM subtasks WHERE task_id = ANY(:ids) AND state = ANY(:live)"
            "  ORDER BY task_id, key FOR UPDATE)"
            " UPDATE subtasks s SET state = 10, state_message = :m, end_time = now(), update_time = now(),"
            "  lease_expire_time = NULL FROM old WHERE s.task_id = old.task_id AND s.key = old.key"
            f" RETURNING {_prefixed('old', SubtaskRow)}"
        ),
        {"ids": list(task_ids), "live": _LIVE, "m": message},
    )
    return _subtasks(rows.all())


async def renew_leases(conn: AsyncConnection, workers: Sequence[str], lease_ttl_s: float) -> None:
    """Extend every lease the given (heartbeating) workers hold."""
    if workers:
        await conn.execute(
            text(
                "UPDATE subtasks SET lease_expire_time = now() + make_interval(secs => :ttl)"
                " WHERE worker = ANY(:w) AND state = ANY(:leased)"
            ),
            {"w": list(workers), "ttl": lease_ttl_s, "leased": _LEASED},
        )


async def expired_leases(conn: AsyncConnection, grace_s: float, limit: int = 500) -> list[SubtaskRow]:
    """Lock leased subtasks whose lease expired, or whose attempt deadline passed ``grace_s`` ago."""
    rows = await conn.execute(
        text(
            f"SELECT {_SUBTASK_COLS} FROM subtasks WHERE state = ANY(:leased) AND (lease_expire_time < now()"
            "  OR attempt_deadline < now() - make_interval(secs => :grace))"
            " ORDER BY task_id, key LIMIT :limit FOR UPDATE SKIP LOCKED"
        ),
        {"leased": _LEASED, "grace": grace_s, "limit": limit},
    )
    return _subtasks(rows.all())


async def overdue(conn: AsyncConnection, limit: int = 500) -> list[tuple[SubtaskRow, str]]:
    """Lock live subtasks past their queue-wait or total time limit, with the limit they broke."""
    rows = await conn.execute(
        text(
            f"SELECT {_SUBTASK_COLS}, CASE WHEN state = 2 AND queue_wait_limit_s > 0"
            "  AND ready_time < now() - make_interval(secs => queue_wait_limit_s) THEN 'queue_wait' ELSE 'total' END"
            " FROM subtasks WHERE (state = 2 AND queue_wait_limit_s > 0"
            "  AND ready_time < now() - make_interval(secs => queue_wait_limit_s))"
            " OR (state = ANY(:live) AND total_limit_s > 0"
            "  AND start_time < now() - make_interval(secs => total_limit_s))"
            " ORDER BY task_id, key LIMIT :limit FOR UPDATE SKIP LOCKED"
        ),
        {"live": [2, *_LEASED], "limit": limit},
    )
    return [(SubtaskRow(*r[:-1]), r[-1]) for r in rows]


async def leases_of(conn: AsyncConnection, workers: Sequence[str]) -> dict[str, dict[tuple[str, str], SubtaskRow]]:
    """The subtasks each of ``workers`` holds now (one query for all of them)."""
    rows = await conn.execute(
        text(f"SELECT {_SUBTASK_COLS} FROM subtasks WHERE worker = ANY(:w) AND state = ANY(:leased)"),
        {"w": list(workers), "leased": _LEASED},
    )
    held: dict[str, dict[tuple[str, str], SubtaskRow]] = {w: {} for w in workers}
    for s in _subtasks(rows.all()):
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
            " AS v(task_id, key, code, msg) WHERE s.task_id = v.task_id AND s.key = v.key AND s.state = 2"
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
            " FROM subtasks s WHERE s.state = 2 ORDER BY s.ready_time LIMIT :limit"
        ),
        {"limit": limit},
    )
    return [dict(r._mapping) for r in rows]


# -- results --------------------------------------------------------------------------------------------


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
    return {(r[0], r[1], r[2]): r[3] for r in rows}


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
    return {r[0]: r[1] for r in rows}


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


# -- task counters and events ----------------------------------------------------------------------------


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
            " state = CASE WHEN t.state = 1 AND v.r > 0 THEN 2 ELSE t.state END,"
            " start_time = CASE WHEN t.start_time IS NULL AND v.r > 0 THEN now() ELSE t.start_time END"
            " FROM unnest(CAST(:ids AS text[]), CAST(:r AS int[]), CAST(:s AS int[]), CAST(:f AS int[]),"
            " CAST(:c AS int[]), CAST(:x AS int[])) AS v(id, r, s, f, c, x) WHERE t.id = v.id"
            f" RETURNING {_prefixed('t', TaskRow)}"
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
    return {t.id: t for t in _tasks(rows.all())}


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
    return {r[0]: r[1] - counts[r[0]] + 1 for r in rows}


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
    return [(r[0], r[1], r[2]) for r in rows]


# -- idempotency and templates ------------------------------------------------------------------------------


async def get_template(conn: AsyncConnection, template_id: str) -> tuple[bytes, str] | None:
    """A saved template's body and etag."""
    row = (await conn.execute(text("SELECT body, etag FROM templates WHERE id = :id"), {"id": template_id})).first()
    return (bytes(row[0]), row[1]) if row else None


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
    return [bytes(r[0]) for r in rows]


# -- stats ------------------------------------------------------------------------------------------------------


async def state_counts(conn: AsyncConnection) -> tuple[dict[int, int], dict[int, int], int, int]:
    """Tasks by state, subtasks by state, unschedulable READY subtasks, leased slots in use."""
    tasks: dict[int, int] = {
        r[0]: r[1] for r in await conn.execute(text("SELECT state, count(*) FROM tasks GROUP BY state"))
    }
    subtasks: dict[int, int] = {
        r[0]: r[1] for r in await conn.execute(text("SELECT state, count(*) FROM subtasks GROUP BY state"))
    }
    unsched = (
        await conn.execute(text("SELECT count(*) FROM subtasks WHERE state = 2 AND unschedulable_code <> 0"))
    ).scalar_one()
    used = subtasks.get(int(SubtaskState.ASSIGNED), 0) + subtasks.get(int(SubtaskState.RUNNING), 0)
    return (
        {int(k): int(v) for k, v in tasks.items()},
        {int(k): int(v) for k, v in subtasks.items()},
        int(unsched),
        int(used),
    )


TERMINAL_TASK_STATES = [int(TaskState.SUCCEEDED), int(TaskState.FAILED), int(TaskState.CANCELLED)]
