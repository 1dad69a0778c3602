"""What the scheduler tells the registry: who is connected (presence) and what changed (activity).

- Worker reports: every heartbeat interval, one ReportWorkers call per replica carries a snapshot
  of each agent stream this replica holds (and the streams that closed since), so the registry's
  presence keys and catalog follow the agents without a database write per heartbeat.
- Activity: every state change is first a row in this schema's task event log (written in the
  same transaction as the change). A relay ships what people need from it to the registry's activity
  log: every task transition and plan, and of a subtask the moves that say who did what or that
  something went wrong (it ended, and on which worker; it went back for correction or to a person; an
  attempt ended without a result and it was queued again). The automatic hops in between (ready,
  assigned, running, evaluating) stay in the task's own event log (WatchTask, ListTaskEvents), so the
  registry does not take an insert per hop. Batches are idempotent by ``scheduler-event-{id}``; the
  cursor advances only after the registry acknowledged them, so a crash anywhere repeats a batch at
  worst and never loses one. One replica at a time relays (relay_lock.RelayLock: no transaction is
  open while the registry is called); the others stand by.
"""

from __future__ import annotations

import asyncio
import logging
import zlib
from datetime import UTC, datetime

from maw.common.v1 import machine_pb2
from maw.registry.v1 import activity_intake_service_pb2 as aipb
from maw.registry.v1 import activity_intake_service_pb2_grpc as aipb_grpc
from maw.registry.v1 import resources_pb2 as rpb
from maw.registry.v1 import worker_intake_service_pb2 as wipb
from maw.registry.v1 import worker_intake_service_pb2_grpc as wipb_grpc
from maw.scheduler.v1 import resources_pb2 as spb
from maw.scheduler.v1 import task_service_pb2 as tpb
from sqlalchemy.ext.asyncio import AsyncEngine

from services.runtime.internal import internal_channel

from . import store
from .engine import Engine
from .relay_lock import RelayLock
from .session import Session
from .settings import SchedulerSettings
from .wire import dur, ts

_log = logging.getLogger("maw.scheduler.registry")
RELAY_LOCK = zlib.crc32(b"maw-scheduler-activity-relay")
RELAY_BATCH = 1000
STATE_KINDS = (
    tpb.TaskEvent.TASK_STATE_CHANGED_FIELD_NUMBER,
    tpb.TaskEvent.SUBTASK_STATE_CHANGED_FIELD_NUMBER,
    tpb.TaskEvent.SUBTASKS_ADDED_FIELD_NUMBER,
)
# Subtask moves that reach the activity log: where it ended up, where a person or a correction takes it, and
# an attempt that ended without a result (from a leased state back to READY or PENDING).
NOTABLE_SUBTASK_STATES = frozenset(
    {
        spb.SUBTASK_STATE_SUCCEEDED,
        spb.SUBTASK_STATE_FAILED,
        spb.SUBTASK_STATE_CANCELLED,
        spb.SUBTASK_STATE_CORRECTING,
        spb.SUBTASK_STATE_WAITING_CHECKPOINT,
        spb.SUBTASK_STATE_BLOCKED,
        spb.SUBTASK_STATE_NOT_SELECTED,
    }
)
_LEASED = frozenset({spb.SUBTASK_STATE_ASSIGNED, spb.SUBTASK_STATE_RUNNING})
_WAITING = frozenset({spb.SUBTASK_STATE_READY, spb.SUBTASK_STATE_PENDING})


def notable(change: tpb.SubtaskStateChanged) -> bool:
    """Whether a subtask's move belongs in the activity log (see the module's docstring)."""
    new = change.subtask.state
    return new in NOTABLE_SUBTASK_STATES or (change.previous_state in _LEASED and new in _WAITING)


def report_of(session: Session, replica: str, interval_s: float, connected: bool) -> wipb.WorkerReport:
    """The registry's view of one agent stream."""
    session.report_sequence += 1
    hello = session.hello
    report = wipb.WorkerReport(
        worker=session.worker,
        session_id=session.session_id,
        report_sequence=session.report_sequence,
        connection_state=wipb.CONNECTION_STATE_CONNECTED if connected else wipb.CONNECTION_STATE_DISCONNECTED,
        scheduler_replica=replica,
        hostname=hello.hostname,
        agent_version=hello.agent_version,
        platform=hello.platform,
        tools=hello.tools,
        agent_labels=dict(hello.labels),
        declared_slots=session.capacity,
        resources=session.resources,
        slots_in_use=len(session.outstanding),
        assignments=[
            rpb.WorkerAssignment(subtask=f"tasks/{t}/subtasks/{k}", attempt=a)
            for t, k, a in sorted(session.outstanding)
        ],
        connect_time=ts(session.connect_time),
        heartbeat_interval=dur(interval_s),
    )
    last = ts(datetime.fromtimestamp(session.last_heartbeat_wall, UTC))
    if last is not None:
        report.last_heartbeat_time.CopyFrom(last)
    return report


def activity_of(event_id: int, body: bytes) -> aipb.ActivityRecord | None:
    """An activity record for a state-changing task event (None for others)."""
    event = tpb.TaskEvent.FromString(body)
    kind = event.WhichOneof("kind")
    entry = rpb.ActivityEntry(
        time=event.time,
        actor=rpb.Actor(kind=rpb.ACTOR_KIND_SERVICE, name="services/scheduler"),
        task=event.task,
        service="scheduler",
        level=rpb.ACTIVITY_LEVEL_INFO,
    )
    if kind == "subtask_state_changed":
        change = event.subtask_state_changed
        if not notable(change):
            return None
        old = spb.SubtaskState.Name(change.previous_state).removeprefix("SUBTASK_STATE_")
        new = spb.SubtaskState.Name(change.subtask.state).removeprefix("SUBTASK_STATE_")
        entry.verb = "subtask." + new.lower()
        entry.resource = entry.subtask = change.subtask.name
        entry.worker = change.subtask.worker
        entry.summary = f"{change.subtask.key} {old} -> {new} (attempt {change.subtask.attempt})"
        if change.reason:
            entry.summary += f": {change.reason}"
        if change.subtask.state == spb.SUBTASK_STATE_FAILED:
            entry.level = rpb.ACTIVITY_LEVEL_WARNING
    elif kind == "task_state_changed":
        task_change = event.task_state_changed
        new = spb.TaskState.Name(task_change.task.state).removeprefix("TASK_STATE_")
        entry.verb = "task." + new.lower()
        entry.resource = event.task
        entry.summary = f"task {new}" + (f": {task_change.reason}" if task_change.reason else "")
        if task_change.task.state == spb.TASK_STATE_FAILED:
            entry.level = rpb.ACTIVITY_LEVEL_WARNING
    elif kind == "subtasks_added":
        entry.verb = "task.planned"
        entry.resource = event.task
        entry.summary = f"{len(event.subtasks_added.subtasks)} subtasks planned"
    else:
        return None
    entry.summary = entry.summary[:2000]
    return aipb.ActivityRecord(entry_id=f"scheduler-event-{event_id}", entry=entry)


class RegistryLink:
    """The scheduler's two feeds into the registry."""

    def __init__(self, settings: SchedulerSettings, engine: Engine, db: AsyncEngine) -> None:
        self.settings = settings
        self.engine = engine
        self.db = db
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        """Start both feeds (they keep retrying while the registry is away)."""
        self._tasks = [asyncio.create_task(self._reports()), asyncio.create_task(self._relay())]

    async def stop(self) -> None:
        """Stop both feeds."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _reports(self) -> None:
        async with internal_channel(self.settings, self.settings.registry_addr) as channel:
            stub: wipb_grpc.WorkerIntakeServiceAsyncStub = wipb_grpc.WorkerIntakeServiceStub(channel)
            interval = self.settings.heartbeat_interval_s
            while True:
                await asyncio.sleep(interval)
                closed, self.engine.closed_sessions = self.engine.closed_sessions, []
                reports = [
                    report_of(s, self.settings.replica_id, interval, True) for s in list(self.engine.sessions.values())
                ] + [report_of(s, self.settings.replica_id, interval, False) for s in closed]
                if not reports:
                    continue
                try:
                    await self._add_tool_stats(reports)
                except Exception as exc:  # statistics are a nicety; presence must not wait for them
                    _log.debug("tool statistics unavailable: %s", exc)
                try:
                    await stub.ReportWorkers(wipb.ReportWorkersRequest(reports=reports), timeout=5)
                except Exception as exc:  # the registry is away; presence lapses by TTL, we report again
                    _log.debug("worker report failed: %s", exc)
                    self.engine.closed_sessions.extend(closed)

    async def _add_tool_stats(self, reports: list[wipb.WorkerReport]) -> None:
        """Each worker's success rate and mean duration per tool, from this schema's totals."""
        async with self.db.connect() as conn:
            rows = await store.tool_stats(conn, [r.worker for r in reports])
            stats: dict[str, list[machine_pb2.ToolStats]] = {}
            for row in rows:
                finished = row.finished
                stats.setdefault(row.worker, []).append(
                    machine_pb2.ToolStats(
                        tool=row.tool,
                        finished_count=finished,
                        succeeded_count=row.succeeded,
                        success_rate=row.succeeded / finished if finished else 0.0,
                        mean_duration=dur(row.total_duration_ms / finished / 1000 if finished else 0.0),
                    )
                )
        for report in reports:
            report.tool_stats.extend(stats.get(report.worker, []))

    async def _relay(self) -> None:
        lock = RelayLock(self.db, RELAY_LOCK)
        try:
            async with internal_channel(self.settings, self.settings.registry_addr) as channel:
                stub: aipb_grpc.ActivityIntakeServiceAsyncStub = aipb_grpc.ActivityIntakeServiceStub(channel)
                while True:
                    try:
                        shipped = await self._relay_once(lock, stub) if await lock.held() else 0
                    except Exception as exc:  # registry or database away: the cursor did not move, retry
                        _log.debug("activity relay failed: %s", exc)
                        shipped = 0
                    if shipped < RELAY_BATCH:
                        await asyncio.sleep(1.0)
        finally:
            await lock.release()

    async def _relay_once(self, lock: RelayLock, stub: aipb_grpc.ActivityIntakeServiceAsyncStub) -> int:
        """Ship one batch: read it (no transaction left open), call the registry, then advance the cursor."""
        async with self.db.connect() as conn:
            cursor = await store.relay_cursor(conn, "activity")
            rows = await store.events_after(conn, cursor, STATE_KINDS, RELAY_BATCH)
            await conn.rollback()
        if not rows:
            return 0
        records = [r for row in rows if (r := activity_of(row.id, row.body)) is not None]
        if records:
            await stub.AppendActivity(aipb.AppendActivityRequest(records=records), timeout=30)
        if not await lock.held():
            return 0  # lost the lock meanwhile: whoever holds it now repeats the batch (idempotent)
        async with self.db.begin() as conn:
            await store.advance_cursor(conn, "activity", rows[-1].id)
        return len(rows)


__all__ = ["NOTABLE_SUBTASK_STATES", "RegistryLink", "activity_of", "notable", "report_of"]
