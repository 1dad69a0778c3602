"""The lease keeper: renews the leases of agents whose heartbeats arrive, stops what they must not run, and ends
attempts whose lease expired or whose time limit broke.

One UPDATE renews every lease of this replica's live agents per interval (never one per heartbeat). Where an
attempt ends here, :func:`after_attempt.after_attempt` decides what comes next, as for a result.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from typing import Any

from maw.agent.v1 import agent_service_pb2 as apb
from maw.common.v1 import work_pb2

from . import store
from .after_attempt import Next, after_attempt, held_for, is_judged
from .committer import attempt_of
from .evaluation_link import enqueue_results, error_holds, lost_attempt
from .events import EventLog
from .replica import Replica
from .settle import cancel_leases, settle_tasks
from .states import LEASED, SubtaskState
from .wire import cancels_message, lease_of, now_utc

_log = logging.getLogger("maw.scheduler.engine")
S = SubtaskState


class LeaseKeeper:
    """One round every heartbeat interval (at most a third of the lease lifetime)."""

    def __init__(self, replica: Replica) -> None:
        self.replica = replica
        self.settings = replica.settings

    async def loop(self) -> None:
        """Run rounds forever."""
        while True:
            await asyncio.sleep(min(self.settings.heartbeat_interval_s, self.settings.lease_ttl_s / 3))
            await self.round()

    async def round(self) -> None:
        """Renew live agents' leases, cancel what they should not run, and requeue expired leases."""
        replica = self.replica
        horizon = time.monotonic() - self.settings.lease_ttl_s
        # While draining, the hand-over grace set by drain() must not be cut back to one lifetime.
        live = [] if replica.draining else [s for s in replica.sessions.values() if s.last_heartbeat >= horizon]
        events = EventLog()
        cancels: list[dict[str, Any]] = []
        async with replica.db.begin() as conn:
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
                        cancels_message(
                            [lease_of(*k) for k in lost], apb.CANCEL_REASON_LEASE_LOST, "lease no longer valid"
                        )
                    )
            expired = await store.expired_leases(conn, grace_s=self.settings.expiry_grace_s)
            seen = {(r.task_id, r.key) for r in expired}
            # A row both expired and overdue is handled once, as expired (the next round fails it if due).
            late = [(r, why) for r, why in await store.overdue(conn) if (r.task_id, r.key) not in seen]
            counters: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
            again: list[tuple[str, str]] = []
            failed: list[dict[str, Any]] = []
            # ERROR trigger: a judged subtask that ends for good without a result (its lease expired on the last
            # attempt, or a time limit broke, queue-wait included: it never ran) is held like a failed result.
            holding = await error_holds(conn, {r.task_id for r in [*expired, *(o for o, _ in late)]
                                               if is_judged(r.tool or r.tool_kind)})  # fmt: skip
            on_hold: list[dict[str, Any]] = []
            lost_results: list[dict[str, Any]] = []
            judged: list[tuple[str, str, int, str]] = []

            def end(row: store.SubtaskRow, nxt: Next, outcome: int, reason: str) -> None:
                if nxt is Next.RETRY:
                    again.append((row.task_id, row.key))
                    events.subtask_state(row.task_id, row.key, row.state, S.READY, row.attempt, None, reason)
                elif nxt is Next.HOLD:
                    # A REVIEW subtask is held even when it never ran (queue-wait limit): the evaluator records
                    # the failed review, so the reviewed result is not left waiting; so is a voting solution.
                    result, item = lost_attempt(row.task_id, row.key, row.attempt, row.worker, outcome, reason)
                    lost_results.append(result)
                    judged.append(item)
                    on_hold.append({"task_id": row.task_id, "key": row.key, "state": int(S.EVALUATING)})
                    events.subtask_state(row.task_id, row.key, row.state, S.EVALUATING, row.attempt, None,
                                         f"{reason}; held for {held_for(attempt_of(row))}")  # fmt: skip
                else:
                    failed.append({"task_id": row.task_id, "key": row.key, "state": int(S.FAILED),
                                   "end_time": now_utc(), "worker": None})  # fmt: skip
                    counters[row.task_id]["failed"] += 1
                    events.subtask_state(row.task_id, row.key, row.state, S.FAILED, row.attempt, None, reason)

            for row in expired:
                counters[row.task_id]["running"] -= 1
                nxt = after_attempt(attempt_of(row), work_pb2.OUTCOME_LEASE_EXPIRED,
                                    error_hold=row.task_id in holding)  # fmt: skip
                last = f"lease expired on the last of {row.max_attempts} attempts"
                end(row, nxt, work_pb2.OUTCOME_LEASE_EXPIRED, "lease expired" if nxt is Next.RETRY else last)
                holder = replica.sessions.get(row.worker or "")
                if holder is not None and (row.task_id, row.key, row.attempt) in holder.outstanding:
                    holder.outstanding.discard((row.task_id, row.key, row.attempt))
                    holder.send(
                        cancels_message(
                            [lease_of(row.task_id, row.key, row.attempt)], apb.CANCEL_REASON_LEASE_LOST, "lease expired"
                        )
                    )
            for row, broken in late:
                limit = "queue-wait" if broken == "queue_wait" else "total"
                reason = f"{limit} time limit reached"
                if row.state in LEASED:
                    counters[row.task_id]["running"] -= 1
                    cancel_leases(cancels, [row], apb.CANCEL_REASON_TIME_LIMIT, reason)
                nxt = after_attempt(attempt_of(row), work_pb2.OUTCOME_TIMED_OUT, retryable=False,
                                    error_hold=row.task_id in holding)  # fmt: skip
                end(row, nxt, work_pb2.OUTCOME_TIMED_OUT, reason)
            base, most = self.settings.retry_backoff_base_s, self.settings.retry_backoff_max_s
            await store.requeue(conn, again, True, base, most)
            await store.set_subtask_states(conn, failed)
            await store.set_subtask_states(conn, on_hold)
            await store.insert_results(conn, lost_results)
            await enqueue_results(conn, judged)
            tasks = await store.bump_task_counters(conn, {t: dict(c) for t, c in counters.items()})
            await settle_tasks(conn, tasks, events, cancels)
            touched = await events.flush(conn)
        if expired:
            _log.info("requeued %d expired leases", len(again), extra={"failed": len(failed)})
        await replica.after_commit(touched, bool(again), cancels)
