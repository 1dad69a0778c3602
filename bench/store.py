"""What the benchmarks read back from the scheduler's tables (the only SQL of bench/), rows by column name."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import psycopg
from google.protobuf.timestamp_pb2 import Timestamp
from maw.common.v1 import work_pb2
from maw.scheduler.v1 import resources_pb2 as spb
from maw.scheduler.v1 import task_service_pb2 as tpb
from psycopg.rows import dict_row

__all__ = ["Progress", "Timings", "progress", "timings"]

_ENDED_UNSUCCESSFULLY = [spb.SUBTASK_STATE_FAILED, spb.SUBTASK_STATE_CANCELLED]


@dataclass(frozen=True)
class Progress:
    """How far a set of tasks got: only SUCCEEDED results of each subtask's current attempt count."""

    succeeded: int
    failed_subtasks: int
    failed_results: int
    duplicates: int

    @property
    def ended(self) -> int:
        """Subtasks that will not change any more (succeeded or ended otherwise)."""
        return self.succeeded + self.failed_subtasks


def progress(conn: psycopg.Connection[object], task_ids: Sequence[str]) -> Progress:
    """Counts over the tasks ``task_ids`` (``tasks.id``)."""
    args = {
        "t": list(task_ids),
        "ok": work_pb2.OUTCOME_SUCCEEDED,
        "succeeded": spb.SUBTASK_STATE_SUCCEEDED,
        "ended": _ENDED_UNSUCCESSFULLY,
    }
    with conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(
            "SELECT"
            " (SELECT count(*) FROM scheduler.results r JOIN scheduler.subtasks s"
            "   ON s.task_id = r.task_id AND s.key = r.key AND s.attempt = r.attempt"
            "   WHERE r.task_id = ANY(%(t)s) AND r.outcome = %(ok)s AND s.state = %(succeeded)s) AS succeeded,"
            " (SELECT count(*) FROM scheduler.subtasks WHERE task_id = ANY(%(t)s) AND state = ANY(%(ended)s))"
            "   AS failed_subtasks,"
            " (SELECT count(*) FROM scheduler.results WHERE task_id = ANY(%(t)s) AND outcome <> %(ok)s)"
            "   AS failed_results,"
            " (SELECT count(*) FROM (SELECT 1 FROM scheduler.results WHERE task_id = ANY(%(t)s) AND outcome = %(ok)s"
            "   GROUP BY task_id, key HAVING count(*) > 1) d) AS duplicates",
            args,
        ).fetchone()
    assert row is not None
    return Progress(
        succeeded=int(row["succeeded"]),
        failed_subtasks=int(row["failed_subtasks"]),
        failed_results=int(row["failed_results"]),
        duplicates=int(row["duplicates"]),
    )


@dataclass(frozen=True)
class Timings:
    """Epoch seconds of what happened to the counted subtasks of a set of tasks (one clock: this machine's)."""

    first_create: float
    last_commit: float
    # Per task: when it was committed (tasks.create_time).
    created: dict[str, float]
    # Per counted result: (task id, key, the agent's start of the execution, the tool's finish, committed).
    results: list[tuple[str, str, float, float, float]]
    # (task id, key) → when the scheduler assigned its first attempt (the TaskEvent's own time).
    assigned: dict[tuple[str, str], float]


def timings(conn: psycopg.Connection[object], task_ids: Sequence[str]) -> Timings:
    """Read the figures of the tasks ``task_ids`` once they ended."""
    args = {"t": list(task_ids), "ok": work_pb2.OUTCOME_SUCCEEDED, "succeeded": spb.SUBTASK_STATE_SUCCEEDED}
    with conn.cursor(row_factory=dict_row) as cur:
        tasks = cur.execute(
            "SELECT id, extract(epoch FROM create_time) AS created FROM scheduler.tasks WHERE id = ANY(%(t)s)", args
        ).fetchall()
        rows = cur.execute(
            "SELECT r.task_id, r.key, r.body, extract(epoch FROM r.commit_time) AS committed FROM scheduler.results r"
            " JOIN scheduler.subtasks s ON s.task_id = r.task_id AND s.key = r.key AND s.attempt = r.attempt"
            " WHERE r.task_id = ANY(%(t)s) AND r.outcome = %(ok)s AND s.state = %(succeeded)s",
            args,
        ).fetchall()
        events = cur.execute(
            "SELECT task_id, body FROM scheduler.task_events WHERE task_id = ANY(%(t)s)", args
        ).fetchall()
    results = []
    for row in rows:
        body = spb.SubtaskResult.FromString(bytes(row["body"]))
        results.append(
            (row["task_id"], row["key"], _epoch(body.start_time), _epoch(body.finish_time), float(row["committed"]))
        )
    assigned: dict[tuple[str, str], float] = {}
    for row in events:
        event = tpb.TaskEvent.FromString(bytes(row["body"]))
        if event.WhichOneof("kind") != "subtask_state_changed":
            continue
        subtask = event.subtask_state_changed.subtask
        if subtask.state == spb.SUBTASK_STATE_ASSIGNED and subtask.attempt == 1:
            key = subtask.name.rsplit("/", 1)[-1]
            assigned.setdefault((row["task_id"], key), _epoch(event.time))
    created = {row["id"]: float(row["created"]) for row in tasks}
    return Timings(
        first_create=min(created.values(), default=float("nan")),
        last_commit=max((r[4] for r in results), default=float("nan")),
        created=created,
        results=results,
        assigned=assigned,
    )


def _epoch(stamp: Timestamp) -> float:
    """Epoch seconds of a Timestamp; NaN when it is unset."""
    return stamp.seconds + stamp.nanos / 1e9 if stamp.seconds or stamp.nanos else float("nan")
