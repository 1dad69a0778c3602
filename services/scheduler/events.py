"""Task events: made during a transaction through the one checked state transition, numbered and stored at commit."""

from __future__ import annotations

from collections import defaultdict
from typing import cast

from google.protobuf import timestamp_pb2
from maw.scheduler.v1 import resources_pb2 as spb
from maw.scheduler.v1 import task_service_pb2 as tpb
from sqlalchemy.ext.asyncio import AsyncConnection

from . import store
from .names import subtask_name, task_name
from .states import SubtaskState, TaskState, check_subtask, check_task
from .wire import now_utc


class EventLog:
    """Task events made during one transaction; numbered and written at :meth:`flush`."""

    def __init__(self) -> None:
        self.items: list[tuple[str, tpb.TaskEvent]] = []

    def subtask_state(
        self, task_id: str, key: str, old: int, new: int, attempt: int, worker: str | None = None, reason: str = ""
    ) -> None:
        """A subtask changed state: the one checked transition (states.py) every writer reports through."""
        check_subtask(SubtaskState(old), SubtaskState(new))
        sub = spb.Subtask(
            name=subtask_name(task_id, key), key=key, state=_sub_state(new), attempt=attempt, worker=worker or ""
        )
        event = tpb.TaskEvent(
            task=task_name(task_id),
            subtask_state_changed=tpb.SubtaskStateChanged(previous_state=_sub_state(old), subtask=sub, reason=reason),
        )
        self.items.append((task_id, event))

    def task_state(self, row: store.TaskRow, old: int, new: int, reason: str = "") -> None:
        """A task changed state (checked against the task state machine)."""
        check_task(TaskState(old), TaskState(new))
        task = spb.Task(
            name=task_name(row.id),
            state=_task_state(new),
            state_message=reason,
            subtask_count=row.subtask_count,
            progress_percent=progress_of(row),
        )
        event = tpb.TaskEvent(
            task=task_name(row.id),
            task_state_changed=tpb.TaskStateChanged(previous_state=_task_state(old), task=task, reason=reason),
        )
        self.items.append((row.id, event))

    def move(self, row: store.SubtaskRow, new: SubtaskState, reason: str = "", *, keep_worker: bool = True) -> None:
        """Move ``row`` to ``new``: checked, reported, and set on the row (the caller writes the row)."""
        self.subtask_state(row.task_id, row.key, row.state, new, row.attempt, row.worker if keep_worker else None,
                           reason)  # fmt: skip
        row.state = new

    def move_task(self, row: store.TaskRow, new: TaskState, reason: str = "") -> None:
        """Move a task to ``new``: checked, reported, and set on the row (the caller writes the row)."""
        self.task_state(row, row.state, new, reason)
        row.state = new

    def add(self, task_id: str, event: tpb.TaskEvent) -> None:
        """Any other event."""
        event.task = task_name(task_id)
        self.items.append((task_id, event))

    async def flush(self, conn: AsyncConnection) -> dict[str, int]:
        """Number and store the events; returns each touched task's last sequence."""
        if not self.items:
            return {}
        counts: dict[str, int] = defaultdict(int)
        for task_id, _ in self.items:
            counts[task_id] += 1
        first = await store.allocate_sequences(conn, counts)
        nxt = dict(first)
        stamp = timestamp_pb2.Timestamp()
        stamp.FromDatetime(now_utc())
        rows = []
        for task_id, event in self.items:
            event.sequence = nxt[task_id]
            nxt[task_id] += 1
            event.time.CopyFrom(stamp)
            rows.append((task_id, event.sequence, event_kind(event), event.SerializeToString()))
        await store.insert_events(conn, rows)
        last = {t: n - 1 for t, n in nxt.items()}
        self.items.clear()
        return last


def event_kind(event: tpb.TaskEvent) -> int:
    """The stored kind of an event: the field number of its ``kind`` oneof member (0 when none is set).

    Stored beside the body so watchers can skip log chunks without parsing them.
    """
    kind = event.WhichOneof("kind")
    return tpb.TaskEvent.DESCRIPTOR.fields_by_name[kind].number if kind else 0


LOG_KIND = tpb.TaskEvent.SUBTASK_LOG_CHUNK_FIELD_NUMBER


def _sub_state(value: int) -> spb.SubtaskState.ValueType:
    return cast("spb.SubtaskState.ValueType", value)


def _task_state(value: int) -> spb.TaskState.ValueType:
    return cast("spb.TaskState.ValueType", value)


def progress_of(row: store.TaskRow) -> int:
    """Percentage of the task's subtasks that have finished."""
    done = row.succeeded_count + row.failed_count + row.cancelled_count + row.excused_count
    return 100 * done // row.subtask_count if row.subtask_count else 0
