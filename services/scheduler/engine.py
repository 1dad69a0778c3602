"""The replica's core: one small coordinator over the loops that do the work.

One :class:`Engine` runs per scheduler process. Agent streams (stream.py) hand it what agents say; it answers
through each session's outbox. The work is done by one module per loop or role, all sharing one
:class:`~.replica.Replica`:

- committer.py applies what agents sent (accepted, declined, progress, results, hand-backs) in rounds;
- dispatcher.py claims READY subtasks for this replica's free slots and sends them as assignments;
- lease_keeper.py renews leases, stops what must not run, and ends expired or overdue attempts;
- after_attempt.py decides, purely, what happens when an attempt ends; settle.py ends tasks;
- pubsub.py and census.py carry wake-ups and the global view of agents over Redis.

Writers outside the loops (the servicers, verdicts, rollback) use :meth:`Engine.after_commit` once their
transaction committed, and :func:`settle.settle_tasks` / :func:`settle.cancel_leases` inside it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from datetime import timedelta
from typing import Any

from maw.agent.v1 import agent_service_pb2 as apb
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine

from . import pubsub, store
from .census import census
from .committer import Committer
from .dispatcher import Dispatcher
from .events import EventLog
from .lease_keeper import LeaseKeeper
from .names import try_parse_subtask
from .replica import SESSION_CHANNEL, Replica
from .session import Session
from .settings import SchedulerSettings
from .settle import cancel_leases
from .states import TERMINAL_TASK, SubtaskState, TaskState
from .wire import dur, lease_of, now_utc, ts

_log = logging.getLogger("maw.scheduler.engine")


class Engine:
    """The scheduler core of one replica."""

    def __init__(self, settings: SchedulerSettings, engine: AsyncEngine, redis: Redis) -> None:
        self.replica = Replica(settings, engine, redis)
        self.settings = settings
        self.db = engine
        self.redis = redis
        self.committer = Committer(self.replica)
        self.dispatcher = Dispatcher(self.replica)
        self.lease_keeper = LeaseKeeper(self.replica)
        self.closed_sessions: list[Session] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = asyncio.Event()

    @property
    def sessions(self) -> dict[str, Session]:
        """This replica's agent streams by worker."""
        return self.replica.sessions

    @property
    def task_listeners(self) -> dict[str, set[asyncio.Event]]:
        """Watchers (WatchTask) to wake when a task's events change."""
        return self.replica.task_listeners

    @property
    def draining(self) -> bool:
        """The replica is stopping (SIGTERM)."""
        return self.replica.draining

    @property
    def on_judged(self) -> Callable[[], None] | None:
        """Called after a commit round that handled results (pokes the evaluation relay)."""
        return self.replica.on_judged

    @on_judged.setter
    def on_judged(self, value: Callable[[], None] | None) -> None:
        self.replica.on_judged = value

    # -- lifecycle -----------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the background loops."""
        loops: list[Callable[[], Any]] = [
            self.dispatcher.loop,
            self.committer.loop,
            self.lease_keeper.loop,
            lambda: pubsub.listen(self.replica),
            lambda: census(self.replica),
        ]
        for name, loop in zip(("dispatch", "commit", "lease", "pubsub", "census"), loops, strict=True):
            self._tasks.append(asyncio.create_task(self._forever(name, loop), name=name))

    async def _forever(self, name: str, loop: Callable[[], Any]) -> None:
        while not self._stopping.is_set():
            try:
                await loop()
            except asyncio.CancelledError:
                raise
            except Exception:
                _log.exception("%s loop failed; restarting it", name)
                await asyncio.sleep(0.5)

    async def drain(self) -> None:
        """SIGTERM: ask every agent to reconnect elsewhere, wait a little for them to go, then stop."""
        self.replica.draining = True
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
            await self.committer.round()

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
        self.replica.wake.set()
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
            self.replica.wake.set()

    # -- agent input (batched into the committer) -----------------------------------------------------

    def accepted(self, session: Session, leases: Iterable[apb.Lease]) -> None:
        """The agent started these assignments."""
        self.committer.queue(self.committer.inbox.accepted, ((session, lease) for lease in leases))

    def declined(self, session: Session, items: Iterable[apb.DeclinedAssignment]) -> None:
        """The agent could not start these assignments."""
        self.committer.queue(self.committer.inbox.declined, ((session, d) for d in items))

    def handed_back(self, session: Session, leases: Iterable[apb.Lease]) -> None:
        """The agent gives these leases back unfinished (Goodbye)."""
        self.committer.queue(self.committer.inbox.handed_back, ((session, lease) for lease in leases))

    def progress(self, session: Session, items: Iterable[apb.Progress]) -> None:
        """Progress of running assignments."""
        self.committer.queue(self.committer.inbox.progress, ((session, p) for p in items))

    def log_chunks(self, session: Session, items: Iterable[apb.LogChunk]) -> None:
        """Output of running tools."""
        self.committer.queue(self.committer.inbox.logs, ((session, c) for c in items))

    def results(self, session: Session, items: Iterable[apb.Result]) -> None:
        """Final results; each gets a ResultAck after the commit round that handles it."""
        self.committer.queue(self.committer.inbox.results, ((session, r) for r in items))

    # -- writers outside the loops --------------------------------------------------------------------

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
            cancel_leases(cancels, rows, apb.CANCEL_REASON_TASK_CANCELLED, reason)
            for task in tasks.values():
                if task.state in TERMINAL_TASK:
                    continue
                await store.update_task(conn, task.id, state=int(TaskState.CANCELLED), state_message=reason,
                                        end_time=now_utc(), running_count=0,
                                        cancelled_count=task.cancelled_count + by_task[task.id])  # fmt: skip
                events.task_state(task, task.state, TaskState.CANCELLED, reason)
            touched = await events.flush(conn)
            tasks = await store.lock_tasks(conn, task_ids)
        await self.replica.after_commit(touched, False, cancels)
        return tasks

    def poke(self) -> None:
        """New READY work may exist (this replica)."""
        self.replica.poke()

    async def after_commit(
        self, touched: dict[str, int], ready: bool, cancels: list[dict[str, Any]] | None = None
    ) -> None:
        """After a transaction that changed tasks committed: deliver its stop orders, wake watchers, dispatch."""
        await self.replica.after_commit(touched, ready, cancels)
