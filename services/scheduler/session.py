"""One agent stream held by this replica: what the agent can run, what it holds, and its outbox."""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime

from maw.agent.v1 import agent_service_pb2 as apb
from maw.common.v1 import machine_pb2

from . import allocation
from .wire import LeaseKey, Pair


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
