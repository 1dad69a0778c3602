"""The committer: what agents say (accepted, declined, progress, logs, results, hand-backs) applied in rounds.

Agent streams queue their messages here; one round applies everything queued since the last in one
transaction, then acknowledges the results it committed: completion is the committed result row. Where an
attempt ends, :func:`after_attempt.after_attempt` decides what comes next.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from maw.agent.v1 import agent_service_pb2 as apb
from maw.common.v1 import work_pb2
from maw.scheduler.v1 import resources_pb2 as spb
from maw.scheduler.v1 import task_service_pb2 as tpb
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection

from . import store
from .after_attempt import Attempt, Next, after_attempt, held_for, is_judged
from .evaluation_link import enqueue_results, error_holds
from .events import EventLog
from .names import try_parse_subtask
from .replica import Replica
from .session import Session
from .settle import settle_tasks
from .states import LEASED, SubtaskState
from .wire import LeaseKey, Pair, now_utc, ts

S = SubtaskState
Acks = dict[Session, list[apb.ResultAck]]


@dataclass
class Inbox:
    """What agents said since the last commit round."""

    accepted: list[tuple[Session, apb.Lease]] = field(default_factory=list)
    declined: list[tuple[Session, apb.DeclinedAssignment]] = field(default_factory=list)
    handed_back: list[tuple[Session, apb.Lease]] = field(default_factory=list)
    progress: list[tuple[Session, apb.Progress]] = field(default_factory=list)
    logs: list[tuple[Session, apb.LogChunk]] = field(default_factory=list)
    results: list[tuple[Session, apb.Result]] = field(default_factory=list)

    def empty(self) -> bool:
        """Nothing to apply."""
        return not (self.accepted or self.declined or self.handed_back or self.progress or self.logs or self.results)


def attempt_of(row: store.SubtaskRow) -> Attempt:
    """What :func:`after_attempt` needs to know about a subtask row."""
    return Attempt(row.tool or row.tool_kind, row.failures, row.max_attempts, row.review_of, row.solution_of)


def key_of(lease: apb.Lease) -> LeaseKey | None:
    """(task, key, attempt) of a lease, None when its name is malformed.

    Parsed afresh each time: protobuf hands out new wrapper objects per access, so caching by object identity
    would mix up leases once a wrapper's id is reused.
    """
    pair = try_parse_subtask(lease.subtask)
    return None if pair is None else (pair[0], pair[1], lease.attempt)


class _Round:
    """One commit round's writes, collected while the inbox is applied and written at the end."""

    def __init__(self, conn: AsyncConnection, rows: dict[Pair, store.SubtaskRow]) -> None:
        self.conn = conn
        self.rows = rows
        self.events = EventLog()
        self.counters: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        self.changes: list[dict[str, Any]] = []
        self.requeue_free: list[Pair] = []
        self.requeue_failed: list[Pair] = []
        self.succeeded: list[Pair] = []
        self.stats: list[tuple[str, int, bool, int]] = []
        self.judged: list[tuple[str, str, int, str]] = []
        self.new_results: list[dict[str, Any]] = []

    def held_by(self, session: Session, key: LeaseKey | None) -> store.SubtaskRow | None:
        """The row, if ``session``'s worker holds that attempt's lease."""
        if key is None:
            return None
        row = self.rows.get((key[0], key[1]))
        if row is None or row.worker != session.worker or row.attempt != key[2]:
            return None
        return row

    def end(self, row: store.SubtaskRow, nxt: Next, reason: str, result_id: str = "") -> None:
        """Carry out the decision for an attempt that ended."""
        pair = (row.task_id, row.key)
        change: dict[str, Any] = {"task_id": row.task_id, "key": row.key}
        if nxt is Next.JUDGE:
            self.changes.append({**change, "state": int(S.EVALUATING), "progress_percent": 100})
            self.events.move(row, S.EVALUATING, reason)
            self.judged.append((row.task_id, row.key, row.attempt, result_id))
        elif nxt is Next.SUCCEED:
            self.changes.append({**change, "state": int(S.SUCCEEDED), "progress_percent": 100, "end_time": now_utc()})
            self.events.move(row, S.SUCCEEDED, reason)
            self.succeeded.append(pair)
            self.counters[row.task_id]["succeeded"] += 1
        elif nxt is Next.REQUEUE:
            self.requeue_free.append(pair)
            self.events.move(row, S.READY, reason, keep_worker=False)
        elif nxt is Next.RETRY:
            self.requeue_failed.append(pair)
            self.events.move(row, S.READY, reason, keep_worker=False)
        elif nxt is Next.HOLD:
            self.changes.append({**change, "state": int(S.EVALUATING)})
            self.events.move(row, S.EVALUATING, reason)
            self.judged.append((row.task_id, row.key, row.attempt, result_id))
        else:
            self.changes.append({**change, "state": int(S.FAILED), "progress_percent": row.progress_percent,
                                 "end_time": now_utc()})  # fmt: skip
            self.events.move(row, S.FAILED, reason)
            self.counters[row.task_id]["failed"] += 1


class Committer:
    """Applies agent input in rounds, one transaction each."""

    def __init__(self, replica: Replica) -> None:
        self.replica = replica
        self.settings = replica.settings
        self.inbox = Inbox()
        self.ready = asyncio.Event()

    def queue(self, bucket: list[Any], items: Iterable[Any]) -> None:
        """Add agent input to the next round."""
        bucket.extend(items)
        self.ready.set()

    async def loop(self) -> None:
        """Run a round whenever input is queued."""
        while True:
            await self.ready.wait()
            self.ready.clear()
            await self.round()

    async def round(self) -> None:
        """Apply everything queued so far, acknowledge the results, then announce."""
        inbox, self.inbox = self.inbox, Inbox()
        if inbox.empty():
            return
        acks: Acks = defaultdict(list)
        cancels: list[dict[str, Any]] = []
        for attempt in range(5):
            acks.clear()
            cancels.clear()
            try:
                async with self.replica.db.begin() as conn:
                    events, new_ready = await self.apply(conn, inbox, acks, cancels)
                    touched = await events.flush(conn)
                break
            except DBAPIError as exc:  # deadlock or serialization failure between replicas: retry the round
                if attempt == 4 or "deadlock" not in str(exc).lower():
                    raise
                await asyncio.sleep(0.01 * (attempt + 1))
        if self.replica.on_judged is not None and inbox.results:
            self.replica.on_judged()
        for session, items in acks.items():
            session.send(apb.ConnectResponse(result_acks=apb.ResultAckBatch(acks=items)))
        if acks or inbox.declined or inbox.handed_back:
            self.replica.wake.set()  # slots were freed on this replica: fill them now, not at the next tick
        await self.replica.after_commit(touched, new_ready, cancels)

    async def apply(
        self, conn: AsyncConnection, inbox: Inbox, acks: Acks, cancels: list[dict[str, Any]]
    ) -> tuple[EventLog, bool]:
        """Apply one round of agent input inside one transaction; returns its events and whether work became READY."""
        leases = [lease for _, lease in (*inbox.accepted, *inbox.handed_back)]
        leases += [d.lease for _, d in inbox.declined] + [r.lease for _, r in inbox.results]
        keys = sorted({(k[0], k[1]) for lease in leases if (k := key_of(lease)) is not None})
        rnd = _Round(conn, await store.lock_subtasks(conn, keys))
        for session, lease in inbox.accepted:
            row = rnd.held_by(session, key_of(lease))
            if row is not None and row.state == S.ASSIGNED:
                rnd.changes.append({"task_id": row.task_id, "key": row.key, "state": int(S.RUNNING)})
                rnd.events.move(row, S.RUNNING)
        for session, d in inbox.declined:
            self.give_back(rnd, session, key_of(d.lease), f"declined: {apb.DeclineReason.Name(d.reason)}", True)
        for session, lease in inbox.handed_back:
            self.give_back(rnd, session, key_of(lease), "handed back by the agent", False)
        self.running_reports(rnd, inbox)
        await self.results(rnd, inbox, acks)
        await store.insert_results(conn, rnd.new_results)
        await enqueue_results(conn, rnd.judged)
        for group in same_columns(rnd.changes):
            await store.set_subtask_states(conn, group)
        base, most = self.settings.retry_backoff_base_s, self.settings.retry_backoff_max_s
        await store.requeue(conn, rnd.requeue_free, False, base, most)
        await store.requeue(conn, rnd.requeue_failed, True, base, most)
        await store.record_tool_stats(conn, rnd.stats)
        ready = await store.release_dependents(conn, rnd.succeeded)
        for ready_task, ready_key in ready:
            rnd.events.subtask_state(ready_task, ready_key, S.PENDING, S.READY, 0)
        tasks = await store.bump_task_counters(conn, {t: dict(c) for t, c in rnd.counters.items()})
        await settle_tasks(conn, tasks, rnd.events, cancels)
        return rnd.events, bool(ready or rnd.requeue_free or rnd.requeue_failed)

    def give_back(self, rnd: _Round, session: Session, key: LeaseKey | None, why: str, avoid: bool) -> None:
        """A declined or handed-back lease: the attempt ends without a result and goes back to the queue."""
        row = rnd.held_by(session, key)
        if key is not None:
            session.outstanding.discard(key)
        if row is None or row.state not in LEASED:
            return
        if avoid:
            session.avoid[(row.task_id, row.key)] = time.monotonic() + self.settings.decline_avoid_s
        rnd.counters[row.task_id]["running"] -= 1
        rnd.end(row, after_attempt(attempt_of(row), work_pb2.OUTCOME_CANCELLED), why)

    @staticmethod
    def running_reports(rnd: _Round, inbox: Inbox) -> None:
        """Progress and log output of attempts still running: events only (progress also on the row)."""
        for session, p in inbox.progress:
            key = key_of(p.lease)
            if key is not None and key in session.outstanding:
                pct = max(0, min(100, p.percent))
                rnd.changes.append({"task_id": key[0], "key": key[1], "progress_percent": pct,
                                    "progress_message": p.message[:500]})  # fmt: skip
                progress = tpb.SubtaskProgress(subtask=p.lease.subtask, attempt=key[2], percent=pct,
                                               message=p.message[:500])  # fmt: skip
                rnd.events.add(key[0], tpb.TaskEvent(subtask_progress=progress))
        for session, chunk in inbox.logs:
            key = key_of(chunk.lease)
            if key is not None and key in session.outstanding:
                log = tpb.SubtaskLogChunk(subtask=chunk.lease.subtask, attempt=key[2], stream=chunk.stream,
                                          offset=chunk.offset, data=chunk.data[: 64 * 1024])  # fmt: skip
                rnd.events.add(key[0], tpb.TaskEvent(subtask_log_chunk=log))

    async def results(self, rnd: _Round, inbox: Inbox, acks: Acks) -> None:
        """Classify each result (invalid, duplicate, stale, not held, accepted) and end accepted attempts."""
        result_keys = [k for _, r in inbox.results if (k := key_of(r.lease)) is not None]
        committed = await store.existing_results(rnd.conn, result_keys)
        # ERROR trigger: tasks whose judged subtasks, failing for good now, wait at a checkpoint instead.
        final_failures = set()
        for _, r in inbox.results:
            k = key_of(r.lease)
            held_row = rnd.rows.get((k[0], k[1])) if k is not None else None
            if (held_row is not None and r.outcome not in (work_pb2.OUTCOME_SUCCEEDED, work_pb2.OUTCOME_CANCELLED)
                    and is_judged(held_row.tool) and held_row.failures + 1 >= held_row.max_attempts):  # fmt: skip
                final_failures.add(held_row.task_id)
        holding = await error_holds(rnd.conn, final_failures)
        seen_now: dict[LeaseKey, str] = {}
        for session, result in inbox.results:
            key = key_of(result.lease)
            ack = apb.ResultAck(lease=result.lease)
            acks[session].append(ack)
            if key is None or result.outcome == work_pb2.OUTCOME_UNSPECIFIED:
                ack.disposition, ack.code = apb.RESULT_DISPOSITION_INVALID, 3
                ack.message = (
                    "lease.subtask must be tasks/{task}/subtasks/{subtask}" if key is None else "outcome is required"
                )
                continue
            session.outstanding.discard(key)
            prior = committed.get(key) or seen_now.get(key)
            row = rnd.rows.get((key[0], key[1]))
            if prior is not None and row is not None and row.worker == session.worker:
                ack.disposition, ack.code, ack.result_id = apb.RESULT_DISPOSITION_DUPLICATE, 0, prior
                continue
            if row is not None and row.attempt > key[2]:
                # The fencing token decides first: an older attempt is stale whoever sends it.
                ack.disposition, ack.code = apb.RESULT_DISPOSITION_STALE, 9
                ack.message = f"attempt {key[2]} was superseded by attempt {row.attempt}"
                continue
            if row is None or row.worker != session.worker or row.attempt < key[2]:
                ack.disposition, ack.code = apb.RESULT_DISPOSITION_NOT_HELD, 7
                ack.message = "this worker does not hold that lease"
                continue
            if row.state not in LEASED and row.state != S.CANCELLED:
                ack.disposition, ack.code = apb.RESULT_DISPOSITION_STALE, 9
                ack.message = f"the lease ended (subtask is {S(row.state).name})"
                continue
            result_id = uuid.uuid4().hex
            seen_now[key] = result_id
            self.commit_result(rnd, session, row, result, result_id)
            ack.disposition, ack.code, ack.result_id = apb.RESULT_DISPOSITION_ACCEPTED, 0, result_id
            if row.state == S.CANCELLED:
                continue  # the result is kept; the subtask stays cancelled
            rnd.counters[row.task_id]["running"] -= 1
            nxt = after_attempt(attempt_of(row), result.outcome, error_hold=row.task_id in holding)
            outcome = work_pb2.Outcome.Name(result.outcome)
            if nxt is Next.REQUEUE:
                reason = "cancelled by the agent"
            elif nxt is Next.RETRY:
                reason = f"{outcome}: {result.error_message[:200]}"
            elif nxt is Next.HOLD:
                reason = f"{outcome} after {row.attempt} attempts; held for {held_for(attempt_of(row))}"
            elif nxt is Next.FAIL:
                reason = f"{outcome} after {row.attempt} attempts"
            else:
                reason = ""
            rnd.end(row, nxt, reason, result_id)

    @staticmethod
    def commit_result(rnd: _Round, session: Session, row: store.SubtaskRow, result: apb.Result, result_id: str) -> None:
        """The result row to insert (the proof of completion) and the worker's tool statistics."""
        duration_ms = int(result.duration.ToTimedelta().total_seconds() * 1000)
        body = spb.SubtaskResult(
            result_id=result_id,
            attempt=row.attempt,
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
        rnd.new_results.append({"task_id": row.task_id, "key": row.key, "attempt": row.attempt,
                                "result_id": result_id, "worker": session.worker, "outcome": int(result.outcome),
                                "duration_ms": duration_ms, "body": body.SerializeToString()})  # fmt: skip
        rnd.stats.append((session.worker, row.tool, result.outcome == work_pb2.OUTCOME_SUCCEEDED, duration_ms))


def same_columns(changes: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Group row updates by the columns they set (one executemany per group)."""
    groups: dict[tuple[str, ...], list[dict[str, Any]]] = defaultdict(list)
    for change in changes:
        groups[tuple(sorted(change))].append(change)
    return list(groups.values())
