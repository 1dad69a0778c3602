"""The dispatcher: claims READY subtasks for this replica's free agent slots and sends them as assignments.

Claims use ``FOR UPDATE SKIP LOCKED``, so replicas never hand out the same attempt; each claimed subtask goes
READY → ASSIGNED with attempt + 1 (the fencing token) and a fresh lease in the same transaction.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict

from maw.agent.v1 import agent_service_pb2 as apb

from . import allocation, store
from .assignments import assignments
from .events import EventLog
from .replica import Replica
from .states import SubtaskState, TaskState


class Dispatcher:
    """Fills free slots whenever woken (new READY work, freed slots) and at least once a second."""

    def __init__(self, replica: Replica) -> None:
        self.replica = replica
        self.settings = replica.settings

    async def loop(self) -> None:
        """Dispatch until nothing more fits, then wait for a wake-up."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.replica.wake.wait(), timeout=1.0)
            self.replica.wake.clear()
            while await self.round():
                pass

    async def round(self) -> bool:
        """Claim work for this replica's free slots; True if a full batch went out (there may be more)."""
        replica = self.replica
        agents = [s.view() for s in replica.sessions.values() if s.free_slots() > 0]
        free = sum(a.free_slots for a in agents)
        if not free:
            return False
        limit = min(self.settings.dispatch_batch, max(free * 4, 64))
        async with replica.db.begin() as conn:
            raw = await store.claim_candidates(conn, limit)
            if not raw:
                return False
            cands = [allocation.candidate_of(r) for r in raw]
            plan = allocation.allocate(cands, agents, replica.weights)
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
            built = await assignments(conn, rows, self.settings.max_diff_bytes)
            touched = await events.flush(conn)
        by_worker: dict[str, list[apb.Assignment]] = defaultdict(list)
        for row, assignment in zip(rows, built, strict=True):
            session = replica.sessions.get(row.worker or "")
            if session is None:
                continue  # the stream went away meanwhile; the lease expires and the work is requeued
            session.outstanding.add((row.task_id, row.key, row.attempt))
            by_worker[session.worker].append(assignment)
        for worker, items in by_worker.items():
            session = replica.sessions[worker]
            for i in range(0, len(items), self.settings.max_batch_items):
                chunk = items[i : i + self.settings.max_batch_items]
                session.send(apb.ConnectResponse(assignments=apb.AssignmentBatch(assignments=chunk)))
        if replica.on_assigned is not None:
            replica.on_assigned(len(rows))
        await replica.after_commit(touched, False)
        return len(raw) >= limit and len(plan) == len(raw)
