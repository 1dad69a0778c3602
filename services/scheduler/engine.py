"""The replica's core loop: agent sessions, claims, group commits, leases, expiry, cancellation.

One :class:`Engine` runs per scheduler process. Agent streams (stream.py) hand it what agents say;
it answers through each session's outbox. Everything durable happens in PostgreSQL transactions
that cover many items at once:

- the *dispatcher* claims READY subtasks (``FOR UPDATE SKIP LOCKED``, so replicas never hand out the
  same attempt) for the free slots of this replica's agents and sends them as assignment batches;
- the *committer* applies what agents sent (accepted, declined, progress, results, hand-backs) in
  one transaction per round, then acknowledges results — completion is the committed result row;
- the *lease keeper* renews the leases of agents whose heartbeats arrive (one UPDATE per replica per
  interval, never one per heartbeat), cancels assignments that are no longer valid, and requeues
  the subtasks of leases that expired anywhere (attempt + 1, exponential backoff, then failure).

Redis only carries wake-ups (new READY work, cancellations, session take-overs, task events);
each loop also polls PostgreSQL, so losing Redis slows nothing down for long and loses nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, cast

from google.protobuf import duration_pb2, timestamp_pb2
from maw.agent.v1 import agent_service_pb2 as apb
from maw.common.v1 import machine_pb2, work_pb2
from maw.scheduler.v1 import resources_pb2 as spb
from maw.scheduler.v1 import task_service_pb2 as tpb
from redis.asyncio import Redis
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from . import allocation, store
from .evaluation_link import FINAL_ACCEPT_REASON, enqueue_results, error_holds, final_holds, is_judged, lost_attempt
from .names import subtask_name, task_name, try_parse_subtask
from .settings import SchedulerSettings
from .states import LEASED, TERMINAL_SUBTASK, TERMINAL_TASK, SubtaskState, TaskState, task_outcome
from .templates import prompt_for

_log = logging.getLogger("maw.scheduler.engine")

WAKE_CHANNEL = b"maw:sched:wake"
CANCEL_CHANNEL = b"maw:sched:cancel"
SESSION_CHANNEL = b"maw:sched:session"
AGENTS_KEY = "maw:sched:agents"
TASK_CHANNEL_PREFIX = "maw:task:"

Pair = tuple[str, str]
LeaseKey = tuple[str, str, int]

_OUTCOME_SUCCEEDED = work_pb2.OUTCOME_SUCCEEDED
_OUTCOME_CANCELLED = work_pb2.OUTCOME_CANCELLED


def now_utc() -> datetime:
    """Aware UTC now."""
    return datetime.now(UTC)


def ts(value: datetime | None) -> timestamp_pb2.Timestamp | None:
    """A Timestamp for ``value`` (None stays None)."""
    if value is None:
        return None
    out = timestamp_pb2.Timestamp()
    out.FromDatetime(value)
    return out


def dur(seconds: float) -> duration_pb2.Duration:
    """A Duration of ``seconds``."""
    out = duration_pb2.Duration()
    out.FromTimedelta(timedelta(seconds=seconds))
    return out


def lease_of(task_id: str, key: str, attempt: int) -> apb.Lease:
    """The Lease message for a subtask attempt."""
    return apb.Lease(subtask=subtask_name(task_id, key), attempt=attempt)


class Closed(Exception):
    """A session ended by the scheduler (replaced, drained, or the replica stops)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(eq=False)
class Session:
    """One agent stream held by this replica."""

    worker: str
    capacity: int
    tools: dict[int, bool]
    labels: dict[str, str]
    privacy_level: int
    session_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    outstanding: set[LeaseKey] = field(default_factory=set)
    avoid: dict[Pair, float] = field(default_factory=dict)
    resources: machine_pb2.ResourceUsage = field(default_factory=machine_pb2.ResourceUsage)
    last_heartbeat: float = field(default_factory=time.monotonic)
    outbox: asyncio.Queue[apb.ConnectResponse | Closed] = field(default_factory=asyncio.Queue)
    draining: bool = False
    hello: apb.Hello = field(default_factory=apb.Hello)
    connect_time: datetime = field(default_factory=lambda: datetime.now(UTC))
    last_heartbeat_wall: float = field(default_factory=time.time)
    report_sequence: int = 0

    def free_slots(self) -> int:
        """Slots not covered by outstanding assignments."""
        return 0 if self.draining else max(0, self.capacity - len(self.outstanding))

    def view(self) -> allocation.AgentView:
        """How allocation sees this agent."""
        r = self.resources
        mem = 100.0 * r.memory_used_bytes / r.memory_total_bytes if r.memory_total_bytes else None
        disk = 100.0 * r.disk_used_bytes / r.disk_total_bytes if r.disk_total_bytes else None
        now = time.monotonic()
        return allocation.AgentView(
            worker=self.worker,
            tools=self.tools,
            free_slots=self.free_slots(),
            labels=self.labels,
            privacy_level=self.privacy_level,
            cpu_percent=r.cpu_percent if r.sample_time.seconds else None,
            memory_percent=mem,
            disk_percent=disk,
            avoid=frozenset(k for k, until in self.avoid.items() if until > now),
        )

    def send(self, message: apb.ConnectResponse) -> None:
        """Queue a message for the agent."""
        self.outbox.put_nowait(message)

    def close(self, code: str, message: str) -> None:
        """End the stream with ``code``."""
        self.outbox.put_nowait(Closed(code, message))


class EventLog:
    """Task events made during one transaction; numbered and written at :meth:`flush`."""

    def __init__(self) -> None:
        self.items: list[tuple[str, tpb.TaskEvent]] = []

    def subtask_state(
        self, task_id: str, key: str, old: int, new: int, attempt: int, worker: str | None = None, reason: str = ""
    ) -> None:
        """A subtask changed state."""
        sub = spb.Subtask(
            name=subtask_name(task_id, key), key=key, state=_sub_state(new), attempt=attempt, worker=worker or ""
        )
        event = tpb.TaskEvent(
            task=task_name(task_id),
            subtask_state_changed=tpb.SubtaskStateChanged(previous_state=_sub_state(old), subtask=sub, reason=reason),
        )
        self.items.append((task_id, event))

    def task_state(self, row: store.TaskRow, old: int, new: int, reason: str = "") -> None:
        """A task changed state."""
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


_KINDS = {
    name: i
    for i, name in enumerate(
        [
            "task_state_changed",
            "subtask_state_changed",
            "subtasks_added",
            "subtask_progress",
            "subtask_log_chunk",
            "checkpoint_reached",
            "checkpoint_resolved",
            "evaluation_completed",
        ],
        start=1,
    )
}


def event_kind(event: tpb.TaskEvent) -> int:
    """Small integer for the event's kind (stored, so watchers can skip log chunks cheaply)."""
    return _KINDS.get(event.WhichOneof("kind") or "", 0)


LOG_KIND = _KINDS["subtask_log_chunk"]


def _sub_state(value: int) -> spb.SubtaskState.ValueType:
    return cast("spb.SubtaskState.ValueType", value)


def _task_state(value: int) -> spb.TaskState.ValueType:
    return cast("spb.TaskState.ValueType", value)


def progress_of(row: store.TaskRow) -> int:
    """Percentage of the task's subtasks that have finished."""
    done = row.succeeded_count + row.failed_count + row.cancelled_count + row.excused_count
    return 100 * done // row.subtask_count if row.subtask_count else 0


@dataclass
class _Inbox:
    """What agents said since the last commit round."""

    accepted: list[tuple[Session, apb.Lease]] = field(default_factory=list)
    declined: list[tuple[Session, apb.DeclinedAssignment]] = field(default_factory=list)
    handed_back: list[tuple[Session, apb.Lease]] = field(default_factory=list)
    progress: list[tuple[Session, apb.Progress]] = field(default_factory=list)
    logs: list[tuple[Session, apb.LogChunk]] = field(default_factory=list)
    results: list[tuple[Session, apb.Result]] = field(default_factory=list)

    def empty(self) -> bool:
        return not (self.accepted or self.declined or self.handed_back or self.progress or self.logs or self.results)


class Engine:
    """The scheduler core of one replica."""

    def __init__(self, settings: SchedulerSettings, engine: AsyncEngine, redis: Redis) -> None:
        self.settings = settings
        self.db = engine
        self.redis = redis
        self.sessions: dict[str, Session] = {}
        self.weights = allocation.Weights()
        self._wake = asyncio.Event()
        self._inbox = _Inbox()
        self._inbox_ready = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = asyncio.Event()
        self.task_listeners: dict[str, set[asyncio.Event]] = defaultdict(set)
        self.closed_sessions: list[Session] = []
        self.draining = False
        self.on_assigned: Callable[[int], None] | None = None
        self.on_judged: Callable[[], None] | None = None

    # -- lifecycle -----------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the background loops."""
        for loop in (self._dispatch_loop, self._commit_loop, self._lease_loop, self._pubsub_loop, self._census_loop):
            self._tasks.append(asyncio.create_task(self._forever(loop), name=loop.__name__))

    async def _forever(self, loop: Callable[[], Any]) -> None:
        while not self._stopping.is_set():
            try:
                await loop()
            except asyncio.CancelledError:
                raise
            except Exception:
                _log.exception("%s failed; restarting it", getattr(loop, "__name__", "loop"))
                await asyncio.sleep(0.5)

    async def drain(self) -> None:
        """SIGTERM: ask every agent to reconnect elsewhere, wait a little for them to go, then stop."""
        self.draining = True
        # Hand-over grace: once this replica stops nobody renews its agents' leases until they
        # re-attach elsewhere, so give them one more lease lifetime for the trip.
        with contextlib.suppress(Exception):
            async with self.db.begin() as conn:
                await store.renew_leases(
                    conn, list(self.sessions), 2 * self.settings.lease_ttl_s + self.settings.drain_timeout_s
                )
        deadline = now_utc() + timedelta(seconds=self.settings.drain_timeout_s)
        for session in list(self.sessions.values()):
            session.draining = True
            session.send(
                apb.ConnectResponse(
                    drain=apb.Drain(
                        reason=apb.DRAIN_REASON_SHUTDOWN,
                        message="scheduler replica stopping",
                        deadline=ts(deadline),
                        reconnect_jitter=dur(1.0),
                    )
                )
            )
        limit = time.monotonic() + self.settings.drain_timeout_s
        while self.sessions and time.monotonic() < limit:  # noqa: ASYNC110 - sessions end on their own tasks
            await asyncio.sleep(0.05)
        await self._flush_inbox_now()
        for session in list(self.sessions.values()):
            session.close("UNAVAILABLE", "scheduler replica stopped")
        self._stopping.set()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _flush_inbox_now(self) -> None:
        with contextlib.suppress(Exception):
            await self._commit_round()

    # -- sessions --------------------------------------------------------------------------------------

    async def open_session(self, session: Session, held: Iterable[apb.HeldAssignment]) -> apb.Welcome:
        """Register a new stream for its worker (replacing an older one) and resume valid leases."""
        old = self.sessions.get(session.worker)
        if old is not None:
            old.close("ABORTED", "a newer stream of this worker replaced this one")
        self.sessions[session.worker] = session
        with contextlib.suppress(Exception):
            await self.redis.publish(
                SESSION_CHANNEL,
                json.dumps(
                    {"worker": session.worker, "session": session.session_id, "replica": self.settings.replica_id}
                ),
            )
        resumed: list[apb.LeaseGrant] = []
        released: list[apb.Lease] = []
        async with self.db.begin() as conn:
            mine = (await store.leases_of(conn, [session.worker]))[session.worker]
            wanted = {}
            for h in held:
                pair = try_parse_subtask(h.lease.subtask)
                if pair is not None:
                    wanted[(*pair, h.lease.attempt)] = h.lease
            for key, lease in wanted.items():
                row = mine.get((key[0], key[1]))
                if row is not None and row.attempt == key[2]:
                    session.outstanding.add(key)
                else:
                    released.append(lease)
            if session.outstanding:
                await store.renew_leases(conn, [session.worker], self.settings.lease_ttl_s)
        lease_deadline = ts(now_utc() + timedelta(seconds=self.settings.lease_ttl_s))
        for t, k, a in sorted(session.outstanding):
            row = mine[(t, k)]
            resumed.append(
                apb.LeaseGrant(
                    lease=lease_of(t, k, a), lease_deadline=lease_deadline, attempt_deadline=ts(row.attempt_deadline)
                )
            )
        self._wake.set()
        return apb.Welcome(
            session_id=session.session_id,
            worker=session.worker,
            heartbeat_interval=dur(self.settings.heartbeat_interval_s),
            lease_ttl=dur(self.settings.lease_ttl_s),
            resumed=resumed,
            released=released,
            server_time=ts(now_utc()),
            max_batch_items=self.settings.max_batch_items,
            max_message_bytes=self.settings.max_message_bytes,
            scheduler_replica=self.settings.replica_id,
        )

    def close_session(self, session: Session) -> None:
        """Forget a stream that ended; its leases live on until they expire or it comes back."""
        if self.sessions.get(session.worker) is session:
            del self.sessions[session.worker]
        self.closed_sessions.append(session)

    def heartbeat(self, session: Session, beat: apb.Heartbeat) -> None:
        """Record liveness and resources; answer with the renewed lease deadlines."""
        session.last_heartbeat = time.monotonic()
        session.last_heartbeat_wall = time.time()
        session.resources = beat.resources
        deadline = ts(now_utc() + timedelta(seconds=self.settings.lease_ttl_s))
        grants = []
        for running in beat.running:
            pair = try_parse_subtask(running.lease.subtask)
            if pair is not None and (*pair, running.lease.attempt) in session.outstanding:
                grants.append(apb.LeaseGrant(lease=running.lease, lease_deadline=deadline))
        session.send(apb.ConnectResponse(heartbeat_ack=apb.HeartbeatAck(leases=grants, server_time=ts(now_utc()))))
        if session.free_slots():
            self._wake.set()

    # -- agent input (batched into the committer) -----------------------------------------------------

    def _queue(self, bucket: list[Any], items: Iterable[Any]) -> None:
        bucket.extend(items)
        self._inbox_ready.set()

    def accepted(self, session: Session, leases: Iterable[apb.Lease]) -> None:
        """The agent started these assignments."""
        self._queue(self._inbox.accepted, ((session, lease) for lease in leases))

    def declined(self, session: Session, items: Iterable[apb.DeclinedAssignment]) -> None:
        """The agent could not start these assignments."""
        self._queue(self._inbox.declined, ((session, d) for d in items))

    def handed_back(self, session: Session, leases: Iterable[apb.Lease]) -> None:
        """The agent gives these leases back unfinished (Goodbye)."""
        self._queue(self._inbox.handed_back, ((session, lease) for lease in leases))

    def progress(self, session: Session, items: Iterable[apb.Progress]) -> None:
        """Progress of running assignments."""
        self._queue(self._inbox.progress, ((session, p) for p in items))

    def log_chunks(self, session: Session, items: Iterable[apb.LogChunk]) -> None:
        """Output of running tools."""
        self._queue(self._inbox.logs, ((session, c) for c in items))

    def results(self, session: Session, items: Iterable[apb.Result]) -> None:
        """Final results; each gets a ResultAck after the commit round that handles it."""
        self._queue(self._inbox.results, ((session, r) for r in items))

    # -- the committer ----------------------------------------------------------------------------------

    async def _commit_loop(self) -> None:
        while True:
            await self._inbox_ready.wait()
            self._inbox_ready.clear()
            await self._commit_round()

    async def _commit_round(self) -> None:
        inbox, self._inbox = self._inbox, _Inbox()
        if inbox.empty():
            return
        acks: dict[Session, list[apb.ResultAck]] = defaultdict(list)
        cancels: list[dict[str, Any]] = []
        for attempt in range(5):
            acks.clear()
            cancels.clear()
            try:
                async with self.db.begin() as conn:
                    events = EventLog()
                    new_ready = await self._apply(conn, inbox, events, acks, cancels)
                    touched = await events.flush(conn)
                break
            except DBAPIError as exc:  # deadlock or serialization failure between replicas: retry the round
                if attempt == 4 or "deadlock" not in str(exc).lower():
                    raise
                await asyncio.sleep(0.01 * (attempt + 1))
        if self.on_judged is not None and inbox.results:
            self.on_judged()
        for session, items in acks.items():
            session.send(apb.ConnectResponse(result_acks=apb.ResultAckBatch(acks=items)))
        if acks or inbox.declined or inbox.handed_back:
            self._wake.set()  # slots were freed on this replica: fill them now, not at the next tick
        await self._deliver_cancels(cancels)
        await self._announce(touched, new_ready)

    async def _apply(
        self,
        conn: AsyncConnection,
        inbox: _Inbox,
        events: EventLog,
        acks: dict[Session, list[apb.ResultAck]],
        cancels: list[dict[str, Any]],
    ) -> bool:
        """Apply one round of agent input inside one transaction; returns whether work became READY."""
        keyed: dict[Pair, None] = {}

        def key_of(lease: apb.Lease) -> tuple[str, str, int] | None:
            # Parsed afresh each time: protobuf hands out new wrapper objects per access, so caching by
            # object identity would mix up leases once a wrapper's id is reused.
            pair = try_parse_subtask(lease.subtask)
            if pair is None:
                return None
            keyed[pair] = None
            return (pair[0], pair[1], lease.attempt)

        for bucket in (inbox.accepted, inbox.handed_back):
            for _, lease in bucket:
                key_of(lease)
        for _, d in inbox.declined:
            key_of(d.lease)
        for _, r in inbox.results:
            key_of(r.lease)
        rows = await store.lock_subtasks(conn, sorted(keyed))
        counters: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        changes: list[dict[str, Any]] = []
        requeue_free: list[Pair] = []
        requeue_failed: list[Pair] = []
        succeeded: list[Pair] = []
        stats: list[tuple[str, int, bool, int]] = []
        judged: list[tuple[str, str, int, str]] = []

        def holds(session: Session, key: tuple[str, str, int] | None) -> store.SubtaskRow | None:
            if key is None:
                return None
            row = rows.get((key[0], key[1]))
            if row is None or row.worker != session.worker or row.attempt != key[2]:
                return None
            return row

        for session, lease in inbox.accepted:
            key = key_of(lease)
            row = holds(session, key)
            if row is not None and row.state == SubtaskState.ASSIGNED:
                changes.append({"task_id": row.task_id, "key": row.key, "state": int(SubtaskState.RUNNING)})
                events.subtask_state(row.task_id, row.key, row.state, SubtaskState.RUNNING, row.attempt, row.worker)
                row.state = SubtaskState.RUNNING

        def give_back(session: Session, key: tuple[str, str, int] | None, why: str, avoid: bool) -> None:
            row = holds(session, key)
            if key is not None:
                session.outstanding.discard(key)
            if row is None or row.state not in LEASED:
                return
            if avoid:
                session.avoid[(row.task_id, row.key)] = time.monotonic() + 60.0
            requeue_free.append((row.task_id, row.key))
            counters[row.task_id]["running"] -= 1
            events.subtask_state(row.task_id, row.key, row.state, SubtaskState.READY, row.attempt, None, why)
            row.state = SubtaskState.READY

        for session, d in inbox.declined:
            give_back(session, key_of(d.lease), f"declined: {apb.DeclineReason.Name(d.reason)}", True)
        for session, lease in inbox.handed_back:
            give_back(session, key_of(lease), "handed back by the agent", False)

        for session, p in inbox.progress:
            key = key_of(p.lease)
            if key is not None and key in session.outstanding:
                pct = max(0, min(100, p.percent))
                changes.append({"task_id": key[0], "key": key[1], "progress_percent": pct,
                                "progress_message": p.message[:500]})  # fmt: skip
                events.add(
                    key[0],
                    tpb.TaskEvent(
                        subtask_progress=tpb.SubtaskProgress(
                            subtask=p.lease.subtask, attempt=key[2], percent=pct, message=p.message[:500]
                        )
                    ),
                )
        for session, chunk in inbox.logs:
            key = key_of(chunk.lease)
            if key is not None and key in session.outstanding:
                events.add(
                    key[0],
                    tpb.TaskEvent(
                        subtask_log_chunk=tpb.SubtaskLogChunk(
                            subtask=chunk.lease.subtask,
                            attempt=key[2],
                            stream=chunk.stream,
                            offset=chunk.offset,
                            data=chunk.data[: 64 * 1024],
                        )
                    ),
                )

        # Results: classify, then commit the accepted ones.
        result_keys = [k for _, r in inbox.results if (k := key_of(r.lease)) is not None]
        committed = await store.existing_results(conn, result_keys)
        # ERROR trigger: tasks whose judged subtasks, failing for good now, wait at a checkpoint instead.
        final_failures = set()
        for _, r in inbox.results:
            k = key_of(r.lease)
            held_row = rows.get((k[0], k[1])) if k is not None else None
            if (held_row is not None and r.outcome not in (_OUTCOME_SUCCEEDED, _OUTCOME_CANCELLED)
                    and is_judged(held_row.tool) and held_row.failures + 1 >= held_row.max_attempts):  # fmt: skip
                final_failures.add(held_row.task_id)
        holding = await error_holds(conn, final_failures)
        new_rows: list[dict[str, Any]] = []
        seen_now: dict[LeaseKey, str] = {}
        for session, result in inbox.results:
            key = key_of(result.lease)
            ack = apb.ResultAck(lease=result.lease)
            if key is None or result.outcome == work_pb2.OUTCOME_UNSPECIFIED:
                ack.disposition, ack.code = apb.RESULT_DISPOSITION_INVALID, 3
                ack.message = (
                    "lease.subtask must be tasks/{task}/subtasks/{subtask}" if key is None else "outcome is required"
                )
                acks[session].append(ack)
                continue
            session.outstanding.discard(key)
            prior = committed.get(key) or seen_now.get(key)
            row = rows.get((key[0], key[1]))
            if prior is not None and row is not None and row.worker == session.worker:
                ack.disposition, ack.code, ack.result_id = apb.RESULT_DISPOSITION_DUPLICATE, 0, prior
                acks[session].append(ack)
                continue
            if row is not None and row.attempt > key[2]:
                # The fencing token decides first: an older attempt is stale whoever sends it.
                ack.disposition, ack.code = apb.RESULT_DISPOSITION_STALE, 9
                ack.message = f"attempt {key[2]} was superseded by attempt {row.attempt}"
                acks[session].append(ack)
                continue
            if row is None or row.worker != session.worker or row.attempt < key[2]:
                ack.disposition, ack.code = apb.RESULT_DISPOSITION_NOT_HELD, 7
                ack.message = "this worker does not hold that lease"
                acks[session].append(ack)
                continue
            if row.state not in LEASED and row.state != SubtaskState.CANCELLED:
                ack.disposition, ack.code = apb.RESULT_DISPOSITION_STALE, 9
                ack.message = f"the lease ended (subtask is {SubtaskState(row.state).name})"
                acks[session].append(ack)
                continue
            result_id = uuid.uuid4().hex
            seen_now[key] = result_id
            duration_ms = int(result.duration.ToTimedelta().total_seconds() * 1000)
            body = spb.SubtaskResult(
                result_id=result_id,
                attempt=key[2],
                outcome=result.outcome,
                exit_code=result.exit_code,
                summary=result.summary,
                diff=result.diff,
                output=result.output,
                output_truncated=result.output_truncated,
                artifacts=result.artifacts,
                token_usage=result.token_usage,
                duration=result.duration,
                error_message=result.error_message,
                tool_metadata=result.tool_metadata,
                commit_time=ts(now_utc()),
                finish_time=result.finish_time if result.HasField("finish_time") else None,
                start_time=result.start_time if result.HasField("start_time") else None,
            )
            new_rows.append(
                {
                    "task_id": key[0],
                    "key": key[1],
                    "attempt": key[2],
                    "result_id": result_id,
                    "worker": session.worker,
                    "outcome": int(result.outcome),
                    "duration_ms": duration_ms,
                    "body": body.SerializeToString(),
                }  # fmt: skip
            )
            ack.disposition, ack.code, ack.result_id = apb.RESULT_DISPOSITION_ACCEPTED, 0, result_id
            acks[session].append(ack)
            stats.append((session.worker, row.tool, result.outcome == _OUTCOME_SUCCEEDED, duration_ms))
            if row.state == SubtaskState.CANCELLED:
                continue  # the result is kept; the subtask stays cancelled
            counters[row.task_id]["running"] -= 1
            if result.outcome == _OUTCOME_SUCCEEDED and (is_judged(row.tool) or row.solution_of):
                # Judged by the evaluator first (evaluation_link.py); verdicts.py applies its verdict. A voting
                # solution is always judged, whatever tool ran it (voting.py).
                changes.append({"task_id": row.task_id, "key": row.key, "state": int(SubtaskState.EVALUATING),
                                "progress_percent": 100})  # fmt: skip
                events.subtask_state(row.task_id, row.key, row.state, SubtaskState.EVALUATING, row.attempt, row.worker)
                row.state = SubtaskState.EVALUATING
                judged.append((row.task_id, row.key, row.attempt, result_id))
            elif result.outcome == _OUTCOME_SUCCEEDED:
                changes.append(
                    {
                        "task_id": row.task_id,
                        "key": row.key,
                        "state": int(SubtaskState.SUCCEEDED),
                        "progress_percent": 100,
                        "end_time": now_utc(),
                    }  # fmt: skip
                )
                events.subtask_state(row.task_id, row.key, row.state, SubtaskState.SUCCEEDED, row.attempt, row.worker)
                row.state = SubtaskState.SUCCEEDED
                succeeded.append((row.task_id, row.key))
                counters[row.task_id]["succeeded"] += 1
            elif result.outcome == _OUTCOME_CANCELLED:
                # The agent stopped on its own (e.g. shutting down): run it again, not a failure.
                requeue_free.append((row.task_id, row.key))
                events.subtask_state(
                    row.task_id, row.key, row.state, SubtaskState.READY, row.attempt, None, "cancelled by the agent"
                )
                row.state = SubtaskState.READY
            elif row.failures + 1 < row.max_attempts:
                requeue_failed.append((row.task_id, row.key))
                reason = f"{work_pb2.Outcome.Name(result.outcome)}: {result.error_message[:200]}"
                events.subtask_state(row.task_id, row.key, row.state, SubtaskState.READY, row.attempt, None, reason)
                row.state = SubtaskState.READY
            elif (row.task_id in holding and is_judged(row.tool)) or row.review_of or row.solution_of:
                # Failed for good under the ERROR trigger: the evaluator holds it at a checkpoint. A REVIEW subtask
                # is always held: the evaluator records the failed review and excuses it (it never fails its task).
                # So is a voting solution: it ranks last and cannot win, but never fails the task (voting.py).
                changes.append({"task_id": row.task_id, "key": row.key, "state": int(SubtaskState.EVALUATING)})
                held_for = "the evaluator" if row.review_of or row.solution_of else "a person"
                reason = f"{work_pb2.Outcome.Name(result.outcome)} after {row.attempt} attempts; held for {held_for}"
                events.subtask_state(
                    row.task_id, row.key, row.state, SubtaskState.EVALUATING, row.attempt, row.worker, reason
                )
                row.state = SubtaskState.EVALUATING
                judged.append((row.task_id, row.key, row.attempt, result_id))
            else:
                changes.append(
                    {
                        "task_id": row.task_id,
                        "key": row.key,
                        "state": int(SubtaskState.FAILED),
                        "progress_percent": row.progress_percent,
                        "end_time": now_utc(),
                    }  # fmt: skip
                )
                reason = f"{work_pb2.Outcome.Name(result.outcome)} after {row.attempt} attempts"
                events.subtask_state(
                    row.task_id, row.key, row.state, SubtaskState.FAILED, row.attempt, row.worker, reason
                )
                row.state = SubtaskState.FAILED
                counters[row.task_id]["failed"] += 1

        await store.insert_results(conn, new_rows)
        await enqueue_results(conn, judged)
        for group in _same_columns(changes):
            await store.set_subtask_states(conn, group)
        await store.requeue(conn, requeue_free, False, self.settings.retry_backoff_base_s)
        await store.requeue(conn, requeue_failed, True, self.settings.retry_backoff_base_s)
        await store.record_tool_stats(conn, stats)
        ready = await store.release_dependents(conn, succeeded)
        for ready_task, ready_key in ready:
            events.subtask_state(ready_task, ready_key, SubtaskState.PENDING, SubtaskState.READY, 0)
        tasks = await store.bump_task_counters(conn, {t: dict(c) for t, c in counters.items()})
        await self._settle_tasks(conn, tasks, events, cancels)
        return bool(ready or requeue_free or requeue_failed)

    async def _settle_tasks(
        self,
        conn: AsyncConnection,
        tasks: dict[str, store.TaskRow],
        events: EventLog,
        cancels: list[dict[str, Any]],
    ) -> None:
        """Finish tasks whose subtasks are all done, or fail those with a subtask failed for good.

        A task whose policy has BEFORE_FINAL_ACCEPT waits (WAITING_CHECKPOINT, ``final_accept`` 1) instead of
        succeeding; the evaluator opens its checkpoint, and the Resume it sends later finishes it (verdicts.py).
        """
        outcomes = {}
        for row in tasks.values():
            if row.state in TERMINAL_TASK:
                continue
            outcome = task_outcome(
                row.subtask_count, row.succeeded_count, row.failed_count, row.cancelled_count, row.excused_count
            )
            if outcome is not None:
                outcomes[row.id] = outcome
        asking = [t for t, o in outcomes.items() if o == TaskState.SUCCEEDED and tasks[t].final_accept != 2]
        held = await final_holds(conn, asking) if asking else set()
        for task_id, outcome in outcomes.items():
            row = tasks[task_id]
            if task_id in held:
                if row.final_accept != 1:
                    await store.update_task(conn, row.id, state=int(TaskState.WAITING_CHECKPOINT), final_accept=1,
                                            state_message=FINAL_ACCEPT_REASON, running_count=0)  # fmt: skip
                    events.task_state(row, row.state, TaskState.WAITING_CHECKPOINT, FINAL_ACCEPT_REASON)
                    row.state, row.final_accept = TaskState.WAITING_CHECKPOINT, 1
                continue
            reason = "all subtasks succeeded" if outcome == TaskState.SUCCEEDED else "a subtask failed"
            if outcome == TaskState.FAILED:
                cancelled = await store.cancel_live_subtasks(conn, [row.id], "the task failed")
                self._cancel_leases(cancels, cancelled, apb.CANCEL_REASON_TASK_CANCELLED, "the task failed")
                for sub in cancelled:
                    events.subtask_state(
                        sub.task_id, sub.key, sub.state, SubtaskState.CANCELLED, sub.attempt, None, reason
                    )
            await store.update_task(conn, row.id, state=int(outcome), state_message=reason, end_time=now_utc(),
                                    running_count=0)  # fmt: skip
            events.task_state(row, row.state, outcome, reason)
            row.state = outcome

    # -- the dispatcher --------------------------------------------------------------------------------------

    async def _dispatch_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=1.0)
            self._wake.clear()
            while await self._dispatch_round():
                pass

    async def _dispatch_round(self) -> bool:
        """Claim work for this replica's free slots; True if a full batch went out (there may be more)."""
        agents = [s.view() for s in self.sessions.values() if s.free_slots() > 0]
        free = sum(a.free_slots for a in agents)
        if not free:
            return False
        limit = min(self.settings.dispatch_batch, max(free * 4, 64))
        async with self.db.begin() as conn:
            raw = await store.claim_candidates(conn, limit)
            if not raw:
                return False
            cands = [_candidate(r) for r in raw]
            plan = allocation.allocate(cands, agents, self.weights)
            if not plan:
                return False
            limits = {(r["task_id"], r["key"]): r["attempt_limit_s"] for r in raw}
            default_s = self.settings.default_attempt_timeout_s
            rows = await store.mark_assigned(
                conn,
                [(c.task_id, c.key, w, tool, limits[(c.task_id, c.key)] or default_s) for c, w, tool in plan],
                self.settings.lease_ttl_s,
            )
            events = EventLog()
            counters: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
            for row in rows:
                counters[row.task_id]["running"] += 1
                events.subtask_state(
                    row.task_id, row.key, SubtaskState.READY, SubtaskState.ASSIGNED, row.attempt, row.worker
                )
            before = {t: r.state for t, r in (await store.lock_tasks(conn, list(counters))).items()}
            tasks = await store.bump_task_counters(conn, {t: dict(c) for t, c in counters.items()})
            for task in tasks.values():
                if before.get(task.id) == TaskState.PENDING and task.state == TaskState.RUNNING:
                    events.task_state(task, TaskState.PENDING, TaskState.RUNNING, "first subtask assigned")
            assignments = await self._assignments(conn, rows)
            touched = await events.flush(conn)
        by_worker: dict[str, list[apb.Assignment]] = defaultdict(list)
        for row, assignment in zip(rows, assignments, strict=True):
            session = self.sessions.get(row.worker or "")
            if session is None:
                continue  # the stream went away meanwhile; the lease expires and the work is requeued
            session.outstanding.add((row.task_id, row.key, row.attempt))
            by_worker[session.worker].append(assignment)
        for worker, items in by_worker.items():
            session = self.sessions[worker]
            for i in range(0, len(items), self.settings.max_batch_items):
                chunk = items[i : i + self.settings.max_batch_items]
                session.send(apb.ConnectResponse(assignments=apb.AssignmentBatch(assignments=chunk)))
        if self.on_assigned is not None:
            self.on_assigned(len(rows))
        await self._announce(touched, False)
        return len(raw) >= limit and len(plan) == len(raw)

    async def _assignments(self, conn: AsyncConnection, rows: list[store.SubtaskRow]) -> list[apb.Assignment]:
        """Everything each claimed attempt needs to run, built from the stored plan."""
        task_bodies: dict[str, spb.Task] = {}
        for task_id in {r.task_id for r in rows}:
            t = await store.get_task(conn, task_id)
            task_bodies[task_id] = spb.Task.FromString(t.body) if t else spb.Task()
        dep_outputs: dict[str, dict[str, bytes]] = {}
        for task_id in {r.task_id for r in rows if r.dependencies}:
            keys = sorted({d for r in rows if r.task_id == task_id for d in r.dependencies})
            dep_outputs[task_id] = await store.latest_results(conn, task_id, keys)
        out = []
        for row in rows:
            task = task_bodies[row.task_id]
            spec = spb.SubtaskSpec.FromString(row.body)
            deps = []
            for dep in row.dependencies:
                body = dep_outputs.get(row.task_id, {}).get(dep)
                res = spb.SubtaskResult.FromString(body) if body else spb.SubtaskResult()
                deps.append(
                    apb.DependencyOutput(
                        subtask=subtask_name(row.task_id, dep),
                        key=dep,
                        summary=res.summary,
                        diff=res.diff,
                        output=res.output[:16_384],
                    )  # fmt: skip
                )
            limits = spec.time_limits if spec.HasField("time_limits") else task.time_limits
            out.append(
                apb.Assignment(
                    lease=lease_of(row.task_id, row.key, row.attempt),
                    lease_deadline=ts(row.lease_expire_time),
                    attempt_deadline=ts(row.attempt_deadline),
                    key=row.key,
                    display_name=spec.display_name,
                    type=spec.type,
                    tool=machine_pb2.ToolChoice(
                        kind=cast("machine_pb2.ToolKind.ValueType", row.tool), model=spec.preferred_tool.model
                    ),
                    tool_options=spec.tool_options,
                    prompt=prompt_for(_step_view(spec), task.display_name, task.description, list(task.requirements))
                    + _feedback_note(row),
                    context=apb.TaskContext(
                        task=task_name(row.task_id),
                        display_name=task.display_name,
                        description=task.description,
                        requirements=task.requirements,
                        dependencies=deps,
                    ),
                    workspace=task.workspace,
                    time_limits=limits,
                    resource_limits=spec.resource_limits,
                    privacy_level=task.privacy_level,
                    priority=task.priority,
                    max_diff_bytes=4 * 1024 * 1024,
                )
            )
        return out

    # -- leases -------------------------------------------------------------------------------------------------

    async def _lease_loop(self) -> None:
        while True:
            await asyncio.sleep(min(self.settings.heartbeat_interval_s, self.settings.lease_ttl_s / 3))
            await self._lease_round()

    async def _lease_round(self) -> None:
        """Renew live agents' leases, cancel what they should not run, and requeue expired leases."""
        horizon = time.monotonic() - self.settings.lease_ttl_s
        # While draining, the hand-over grace set by drain() must not be cut back to one lifetime.
        live = [] if self.draining else [s for s in self.sessions.values() if s.last_heartbeat >= horizon]
        events = EventLog()
        cancels: list[dict[str, Any]] = []
        async with self.db.begin() as conn:
            await store.renew_leases(conn, [s.worker for s in live], self.settings.lease_ttl_s)
            checked = [s for s in live if s.outstanding]
            holdings = await store.leases_of(conn, [s.worker for s in checked]) if checked else {}
            for session in checked:
                held = holdings[session.worker]
                lost = [
                    k for k in session.outstanding if (k[0], k[1]) not in held or held[(k[0], k[1])].attempt != k[2]
                ]
                if lost:
                    for k in lost:
                        session.outstanding.discard(k)
                    session.send(
                        _cancels([lease_of(*k) for k in lost], apb.CANCEL_REASON_LEASE_LOST, "lease no longer valid")
                    )
            expired = await store.expired_leases(conn, grace_s=30.0)
            seen = {(r.task_id, r.key) for r in expired}
            # A row both expired and overdue is handled once, as expired (the next round fails it if due).
            late = [(r, why) for r, why in await store.overdue(conn) if (r.task_id, r.key) not in seen]
            counters: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
            again, failed = [], []
            # ERROR trigger: a judged subtask that ends for good without a result (its lease expired on the last
            # attempt, or a time limit broke, queue-wait included: it never ran) is held like a failed result.
            holding = await error_holds(conn, {r.task_id for r in [*expired, *(o for o, _ in late)]
                                               if is_judged(r.tool or r.tool_kind)})  # fmt: skip
            on_hold: list[dict[str, Any]] = []
            lost_results: list[dict[str, Any]] = []
            judged: list[tuple[str, str, int, str]] = []

            def hold(row: store.SubtaskRow, outcome: int, reason: str) -> bool:
                # A REVIEW subtask is always held, even one that never ran (queue-wait limit): the evaluator
                # records the failed review, so the reviewed result is not left waiting for it. So is a voting
                # solution, so its round is not left waiting for it.
                always = bool(row.review_of or row.solution_of)
                if not always and (row.task_id not in holding or not is_judged(row.tool or row.tool_kind)):
                    return False
                if any(h["task_id"] == row.task_id and h["key"] == row.key for h in on_hold):
                    return True  # both expired and overdue: held once
                result, item = lost_attempt(row.task_id, row.key, row.attempt, row.worker, outcome, reason)
                lost_results.append(result)
                judged.append(item)
                on_hold.append({"task_id": row.task_id, "key": row.key, "state": int(SubtaskState.EVALUATING)})
                held_for = "the evaluator" if row.review_of or row.solution_of else "a person"
                events.subtask_state(row.task_id, row.key, row.state, SubtaskState.EVALUATING, row.attempt, None,
                                     f"{reason}; held for {held_for}")  # fmt: skip
                return True

            for row in expired:
                counters[row.task_id]["running"] -= 1
                if row.failures + 1 < row.max_attempts:
                    again.append((row.task_id, row.key))
                    events.subtask_state(
                        row.task_id, row.key, row.state, SubtaskState.READY, row.attempt, None, "lease expired"
                    )
                elif hold(
                    row, work_pb2.OUTCOME_LEASE_EXPIRED, f"lease expired on the last of {row.max_attempts} attempts"
                ):
                    pass
                else:
                    failed.append({"task_id": row.task_id, "key": row.key, "state": int(SubtaskState.FAILED),
                                   "end_time": now_utc(), "worker": None})  # fmt: skip
                    counters[row.task_id]["failed"] += 1
                    events.subtask_state(
                        row.task_id, row.key, row.state, SubtaskState.FAILED, row.attempt, None,
                        f"lease expired on the last of {row.max_attempts} attempts",
                    )  # fmt: skip
                holder = self.sessions.get(row.worker or "")
                if holder is not None and (row.task_id, row.key, row.attempt) in holder.outstanding:
                    holder.outstanding.discard((row.task_id, row.key, row.attempt))
                    holder.send(
                        _cancels(
                            [lease_of(row.task_id, row.key, row.attempt)], apb.CANCEL_REASON_LEASE_LOST, "lease expired"
                        )
                    )
            for row, broken in late:
                limit = "queue-wait" if broken == "queue_wait" else "total"
                reason = f"{limit} time limit reached"
                if row.state in LEASED:
                    counters[row.task_id]["running"] -= 1
                    self._cancel_leases(cancels, [row], apb.CANCEL_REASON_TIME_LIMIT, reason)
                if hold(row, work_pb2.OUTCOME_TIMED_OUT, reason):
                    continue
                failed.append({"task_id": row.task_id, "key": row.key, "state": int(SubtaskState.FAILED),
                               "end_time": now_utc(), "worker": None})  # fmt: skip
                counters[row.task_id]["failed"] += 1
                events.subtask_state(row.task_id, row.key, row.state, SubtaskState.FAILED, row.attempt, None, reason)
            await store.requeue(conn, again, True, self.settings.retry_backoff_base_s)
            await store.set_subtask_states(conn, failed)
            await store.set_subtask_states(conn, on_hold)
            await store.insert_results(conn, lost_results)
            await enqueue_results(conn, judged)
            tasks = await store.bump_task_counters(conn, {t: dict(c) for t, c in counters.items()})
            await self._settle_tasks(conn, tasks, events, cancels)
            touched = await events.flush(conn)
        await self._deliver_cancels(cancels)
        if expired:
            _log.info("requeued %d expired leases", len(again), extra={"failed": len(failed)})
        await self._announce(touched, bool(again))

    # -- cancellation ---------------------------------------------------------------------------------------------

    @staticmethod
    def _cancel_leases(out: list[dict[str, Any]], rows: Iterable[store.SubtaskRow], reason: int, message: str) -> None:
        """Collect stop orders for whoever runs these; sent by :meth:`_deliver_cancels` after commit."""
        for row in rows:
            if row.state in LEASED and row.worker:
                out.append({"worker": row.worker, "task": row.task_id, "key": row.key, "attempt": row.attempt,
                            "reason": reason, "message": message})  # fmt: skip

    async def cancel_tasks(self, task_ids: list[str], reason: str) -> dict[str, store.TaskRow]:
        """Cancel tasks and their live subtasks; running ones are stopped on their agents."""
        events = EventLog()
        cancels: list[dict[str, Any]] = []
        async with self.db.begin() as conn:
            rows = await store.cancel_live_subtasks(conn, task_ids, reason)
            tasks = await store.lock_tasks(conn, task_ids)
            by_task: dict[str, int] = defaultdict(int)
            for sub in rows:
                by_task[sub.task_id] += 1
                events.subtask_state(sub.task_id, sub.key, sub.state, SubtaskState.CANCELLED, sub.attempt, None, reason)
            self._cancel_leases(cancels, rows, apb.CANCEL_REASON_TASK_CANCELLED, reason)
            for task in tasks.values():
                if task.state in TERMINAL_TASK:
                    continue
                await store.update_task(conn, task.id, state=int(TaskState.CANCELLED), state_message=reason,
                                        end_time=now_utc(), running_count=0,
                                        cancelled_count=task.cancelled_count + by_task[task.id])  # fmt: skip
                events.task_state(task, task.state, TaskState.CANCELLED, reason)
            touched = await events.flush(conn)
            tasks = await store.lock_tasks(conn, task_ids)
        await self._deliver_cancels(cancels)
        await self._announce(touched, False)
        return tasks

    async def _deliver_cancels(self, cancels: list[dict[str, Any]]) -> None:
        local = [c for c in cancels if c["worker"] in self.sessions]
        self._cancel_local(local)
        remote = [c for c in cancels if c["worker"] not in self.sessions]
        if remote:
            try:
                await self.redis.publish(CANCEL_CHANNEL, json.dumps(remote))
            except Exception:  # the lease keeper's check cancels them within one interval anyway
                _log.warning("could not publish %d cancellations; agents learn at their next heartbeat", len(remote))

    def _cancel_local(self, cancels: list[dict[str, Any]]) -> None:
        grouped: dict[str, list[apb.Cancel]] = defaultdict(list)
        for c in cancels:
            session = self.sessions.get(c["worker"])
            if session is None:
                continue
            key = (c["task"], c["key"], c["attempt"])
            session.outstanding.discard(key)
            grouped[c["worker"]].append(apb.Cancel(lease=lease_of(*key), reason=c["reason"], message=c["message"]))
        for worker, items in grouped.items():
            self.sessions[worker].send(apb.ConnectResponse(cancels=apb.CancelBatch(cancels=items)))

    # -- wake-ups, pub/sub, census ----------------------------------------------------------------------------

    def poke(self) -> None:
        """New READY work may exist (this replica)."""
        self._wake.set()

    async def _announce(self, touched: dict[str, int], ready: bool) -> None:
        for task_id in touched:
            for listener in self.task_listeners.get(task_id, ()):
                listener.set()
        if ready:
            self._wake.set()
        if not touched and not ready:
            return
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for task_id, seq in touched.items():
                    pipe.publish(TASK_CHANNEL_PREFIX + task_id, str(seq))
                if ready:
                    pipe.publish(WAKE_CHANNEL, self.settings.replica_id)
                await pipe.execute()
        except Exception:  # other replicas poll PostgreSQL every second, watchers every two
            _log.debug("redis publish failed", exc_info=True)

    async def _pubsub_loop(self) -> None:
        pubsub = self.redis.pubsub()
        try:
            await pubsub.subscribe(WAKE_CHANNEL, CANCEL_CHANNEL, SESSION_CHANNEL)
            await pubsub.psubscribe(TASK_CHANNEL_PREFIX + "*")
            async for message in pubsub.listen():
                kind = message.get("type")
                channel = message.get("channel", b"")
                data = message.get("data", b"")
                if kind == "pmessage":
                    task_id = channel.decode()[len(TASK_CHANNEL_PREFIX) :]
                    for listener in self.task_listeners.get(task_id, ()):
                        listener.set()
                elif kind == "message" and channel == WAKE_CHANNEL:
                    self._wake.set()
                elif kind == "message" and channel == CANCEL_CHANNEL:
                    self._cancel_local(json.loads(data))
                elif kind == "message" and channel == SESSION_CHANNEL:
                    info = json.loads(data)
                    mine = self.sessions.get(info["worker"])
                    if mine is not None and mine.session_id != info["session"]:
                        mine.close("ABORTED", "a newer stream of this worker opened on another replica")
        finally:
            with contextlib.suppress(Exception):
                await pubsub.aclose()  # type: ignore[no-untyped-call]
            await asyncio.sleep(1.0)  # reconnect after a Redis restart

    async def _census_loop(self) -> None:
        """Publish this replica's agents for the global view and flag READY work nobody can take."""
        while True:
            await asyncio.sleep(self.settings.unschedulable_check_s)
            stamp = time.time()
            mine = {
                s.worker: json.dumps(
                    {
                        "tools": {str(k): v for k, v in s.tools.items()},
                        "labels": s.labels,
                        "privacy": s.privacy_level,
                        "slots": s.capacity,
                        "used": len(s.outstanding),
                        "replica": self.settings.replica_id,
                        "at": stamp,
                    }  # fmt: skip
                )
                for s in self.sessions.values()
            }
            agents: list[allocation.AgentView] = []
            try:
                if mine:
                    await self.redis.hset(AGENTS_KEY, mapping=cast("dict[str | bytes, bytes | str]", mine))  # type: ignore[arg-type]
                everyone = cast("dict[bytes, bytes]", await self.redis.hgetall(AGENTS_KEY))
                stale = []
                for worker, raw in everyone.items():
                    info = json.loads(raw)
                    if info["at"] < stamp - 3 * self.settings.unschedulable_check_s - self.settings.lease_ttl_s:
                        stale.append(worker)
                        continue
                    agents.append(
                        allocation.AgentView(
                            worker=worker.decode(),
                            tools={int(k): v for k, v in info["tools"].items()},
                            free_slots=info["slots"],
                            labels=info["labels"],
                            privacy_level=info["privacy"],
                        )  # fmt: skip
                    )
                if stale:
                    await self.redis.hdel(AGENTS_KEY, *stale)
            except Exception:
                agents = [s.view() for s in self.sessions.values()]
            async with self.db.begin() as conn:
                sample = await store.ready_sample(conn, 200)
                marks = []
                for raw_cand in sample:
                    cand = _candidate(raw_cand)
                    code = allocation.unschedulable(cand, agents)
                    marks.append((cand.task_id, cand.key, code or 0, _UNSCHEDULABLE_TEXT.get(code or 0, "")))
                await store.set_unschedulable(conn, marks)


_UNSCHEDULABLE_TEXT = {
    allocation.NO_MATCHING_TOOL: "no connected agent has a tool that can run this subtask",
    allocation.NO_MATCHING_LABELS: "no connected agent has the required labels",
    allocation.NO_PRIVACY_FIT: "no connected agent accepts sensitive work",
    allocation.NO_AGENTS: "no agent is connected",
}


def _cancels(leases: list[apb.Lease], reason: int, message: str) -> apb.ConnectResponse:
    return apb.ConnectResponse(
        cancels=apb.CancelBatch(cancels=[apb.Cancel(lease=lease, reason=reason, message=message) for lease in leases])  # type: ignore[arg-type]
    )


def _feedback_note(row: store.SubtaskRow) -> str:
    """Feedback given for the task's future work (DecideCheckpoint apply_to_future), to add to the prompt.

    A correction subtask carries its own feedback in its instructions already.
    """
    if not row.feedback or row.corrects:
        return ""
    lines = ["", "", "Feedback from the people reviewing this task; follow it in this step too:"]
    for raw in row.feedback:
        fb = work_pb2.Feedback.FromString(bytes(raw))
        kind = work_pb2.FeedbackType.Name(fb.type).removeprefix("FEEDBACK_TYPE_")
        files = f" (see {', '.join(fb.reference_files)})" if fb.reference_files else ""
        lines.append(f"- [{kind}] {fb.text}{files}")
    return "\n".join(lines)


def _candidate(r: dict[str, Any]) -> allocation.Candidate:
    return allocation.Candidate(
        task_id=r["task_id"],
        key=r["key"],
        tool_kind=r["tool_kind"],
        required_labels=r["required_labels"] or {},
        privacy_level=r["privacy_level"],
        priority=r["priority"],
        task_priority=r["task_priority"],
        task_running=r["running_count"],
        task_max_concurrency=r["max_concurrency"],
        ready_time=r["ready_time"] or now_utc(),
        avoid_worker=r.get("avoid_worker") or "",
        avoid_tool=r.get("avoid_tool") or 0,
        avoid_tool_hard=bool(r.get("avoid_tool_hard")),
    )


def _step_view(spec: spb.SubtaskSpec) -> Any:
    from .dag import StepSpec

    return StepSpec(key=spec.key, display_name=spec.display_name, description=spec.description)


def _same_columns(changes: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    groups: dict[tuple[str, ...], list[dict[str, Any]]] = defaultdict(list)
    for change in changes:
        groups[tuple(sorted(change))].append(change)
    return list(groups.values())


__all__ = ["TERMINAL_SUBTASK", "Engine", "EventLog", "Session"]
