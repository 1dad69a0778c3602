"""The scheduler's row types and the column lists its queries select (rows are built by column name)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from ..states import LEASED, LIVE_SUBTASK, SubtaskState, TaskState

S, T = SubtaskState, TaskState
LEASED_STATES = sorted(int(s) for s in LEASED)
LIVE_STATES = sorted(int(s) for s in LIVE_SUBTASK)


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


TASK_FIELDS = tuple(TaskRow.__dataclass_fields__)
SUBTASK_FIELDS = tuple(SubtaskRow.__dataclass_fields__)
TASK_COLS = ", ".join(TASK_FIELDS)
SUBTASK_COLS = ", ".join(SUBTASK_FIELDS)


def prefixed(alias: str, row_type: type[TaskRow] | type[SubtaskRow]) -> str:
    """The row type's columns qualified by a table alias (``s.task_id, s.key, ...``)."""
    return ", ".join(f"{alias}.{c}" for c in row_type.__dataclass_fields__)


def _built(row_type: Any, fields: tuple[str, ...], rows: Sequence[Any]) -> list[Any]:
    """Rows as ``row_type``: by position once the result's column names are checked to be ``fields`` in order
    (the hot path: one check per result, not a name lookup per value), else value by value by name."""
    if not rows:
        return []
    if tuple(rows[0]._fields) == fields:
        return [row_type(*r) for r in rows]
    return [row_type(**{c: r._mapping[c] for c in fields}) for r in rows]


def task_rows(rows: Sequence[Any]) -> list[TaskRow]:
    """Tasks from result rows that select TASK_COLS."""
    return _built(TaskRow, TASK_FIELDS, rows)


def subtask_rows(rows: Sequence[Any]) -> list[SubtaskRow]:
    """Subtasks from result rows that select SUBTASK_COLS."""
    return _built(SubtaskRow, SUBTASK_FIELDS, rows)
