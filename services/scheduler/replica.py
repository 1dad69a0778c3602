"""What the parts of one scheduler replica share: its agents' sessions, wake-ups, and what happens after commit.

The committer, dispatcher, lease keeper, pub/sub listener and census each hold the one :class:`Replica`. After a
transaction commits, whoever wrote it calls :meth:`Replica.after_commit`: watchers of the touched tasks wake,
stop orders reach the agents (here, or through Redis on the replica that holds them), and dispatch runs when work
became READY.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from maw.agent.v1 import agent_service_pb2 as apb
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine

from . import allocation
from .session import Session
from .settings import SchedulerSettings
from .wire import lease_of

_log = logging.getLogger("maw.scheduler.engine")

WAKE_CHANNEL = b"maw:sched:wake"
CANCEL_CHANNEL = b"maw:sched:cancel"
SESSION_CHANNEL = b"maw:sched:session"
AGENTS_KEY = "maw:sched:agents"
TASK_CHANNEL_PREFIX = "maw:task:"


class Replica:
    """State of one scheduler process shared by its loops."""

    def __init__(self, settings: SchedulerSettings, db: AsyncEngine, redis: Redis) -> None:
        self.settings = settings
        self.db = db
        self.redis = redis
        self.sessions: dict[str, Session] = {}
        self.weights = allocation.Weights(
            tool=settings.weight_tool, resources=settings.weight_resources, privacy=settings.weight_privacy
        )
        self.wake = asyncio.Event()
        self.task_listeners: dict[str, set[asyncio.Event]] = defaultdict(set)
        self.draining = False
        self.on_assigned: Callable[[int], None] | None = None
        self.on_judged: Callable[[], None] | None = None

    def poke(self) -> None:
        """New READY work may exist: run dispatch now."""
        self.wake.set()

    async def after_commit(
        self, touched: dict[str, int], ready: bool, cancels: list[dict[str, Any]] | None = None
    ) -> None:
        """Tell everyone what a committed transaction did: stop orders, task watchers, dispatch."""
        if cancels:
            await self.deliver_cancels(cancels)
        await self.announce(touched, ready)

    async def announce(self, touched: dict[str, int], ready: bool) -> None:
        """Wake watchers of the touched tasks (here and on other replicas) and dispatch when work became READY."""
        for task_id in touched:
            for listener in self.task_listeners.get(task_id, ()):
                listener.set()
        if ready:
            self.wake.set()
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

    async def deliver_cancels(self, cancels: list[dict[str, Any]]) -> None:
        """Send stop orders to agents of this replica; publish the others' for their replicas."""
        self.cancel_local([c for c in cancels if c["worker"] in self.sessions])
        remote = [c for c in cancels if c["worker"] not in self.sessions]
        if remote:
            try:
                await self.redis.publish(CANCEL_CHANNEL, json.dumps(remote))
            except Exception:  # the lease keeper's check cancels them within one interval anyway
                _log.warning("could not publish %d cancellations; agents learn at their next heartbeat", len(remote))

    def cancel_local(self, cancels: list[dict[str, Any]]) -> None:
        """Send stop orders to the agents connected here (others are ignored)."""
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
