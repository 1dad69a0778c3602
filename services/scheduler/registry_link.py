"""What the scheduler tells the registry: who is connected (presence) and what changed (activity).

- Worker reports: every heartbeat interval, one ReportWorkers call per replica carries a snapshot
  of each agent stream this replica holds (and the streams that closed since), so the registry's
  presence keys and catalog follow the agents without a database write per heartbeat.
- Activity: every state change is first a row in this schema's task event log (written in the
  same transaction as the change). A relay ships those rows to the registry's activity log in
  batches, idempotent by ``scheduler-event-{id}``, and advances a cursor only after the registry
  acknowledged them, so a crash anywhere repeats a batch at worst and never loses one. One replica
  at a time relays (a PostgreSQL advisory lock); the others stand by.
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
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from services.runtime.internal import internal_channel

from .engine import Engine
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
            rows = await conn.execute(
                text(
                    "SELECT worker, tool, finished, succeeded, total_duration_ms FROM worker_tool_stats"
                    " WHERE worker = ANY(:w)"
                ),
                {"w": [r.worker for r in reports]},
            )
            stats: dict[str, list[machine_pb2.ToolStats]] = {}
            for worker, tool, finished, succeeded, total_ms in rows:
                stats.setdefault(worker, []).append(
                    machine_pb2.ToolStats(
                        tool=tool,
                        finished_count=finished,
                        succeeded_count=succeeded,
                        success_rate=succeeded / finished if finished else 0.0,
                        mean_duration=dur(total_ms / finished / 1000 if finished else 0.0),
                    )
                )
        for report in reports:
            report.tool_stats.extend(stats.get(report.worker, []))

    async def _relay(self) -> None:
        async with internal_channel(self.settings, self.settings.registry_addr) as channel:
            stub: aipb_grpc.ActivityIntakeServiceAsyncStub = aipb_grpc.ActivityIntakeServiceStub(channel)
            while True:
                try:
                    shipped = await self._relay_once(stub)
                except Exception as exc:  # registry or database away: the cursor did not move, retry
                    _log.debug("activity relay failed: %s", exc)
                    shipped = 0
                if shipped < RELAY_BATCH:
                    await asyncio.sleep(1.0)

    async def _relay_once(self, stub: aipb_grpc.ActivityIntakeServiceAsyncStub) -> int:
        async with self.db.begin() as conn:
            if not (await conn.execute(text("SELECT pg_try_advisory_xact_lock(:k)"), {"k": RELAY_LOCK})).scalar():
                return 0  # another replica relays
            cursor = (
                await conn.execute(text("SELECT last_id FROM relay_cursor WHERE name = 'activity'"))
            ).scalar_one_or_none() or 0
            rows = (
                await conn.execute(
                    text("SELECT id, body FROM task_events WHERE id > :c AND kind = ANY(:k) ORDER BY id LIMIT :n"),
                    {"c": cursor, "k": list(STATE_KINDS), "n": RELAY_BATCH},
                )
            ).all()
            if not rows:
                return 0
            records = [r for row in rows if (r := activity_of(row[0], row[1])) is not None]
            if records:
                await stub.AppendActivity(aipb.AppendActivityRequest(records=records), timeout=30)
            await conn.execute(
                text(
                    "INSERT INTO relay_cursor (name, last_id) VALUES ('activity', :i)"
                    " ON CONFLICT (name) DO UPDATE SET last_id = excluded.last_id"
                ),
                {"i": rows[-1][0]},
            )
            return len(rows)


__all__ = ["RegistryLink", "activity_of", "report_of"]
