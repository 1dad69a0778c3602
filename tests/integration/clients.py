"""Helpers for tests that talk to the mesh as its users and agents do (real RPCs, real credentials)."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import grpc
from google.protobuf import timestamp_pb2
from maw.agent.v1 import agent_service_pb2 as apb
from maw.agent.v1 import agent_service_pb2_grpc as apb_grpc
from maw.common.v1 import machine_pb2, work_pb2
from maw.registry.v1 import (
    auth_service_pb2,
    auth_service_pb2_grpc,
    enrollment_service_pb2,
    enrollment_service_pb2_grpc,
    resources_pb2,
)

Metadata = tuple[tuple[str, str], ...]


def bearer(token: str) -> Metadata:
    """Call metadata carrying ``token``."""
    return (("authorization", f"Bearer {token}"),)


async def login(registry: grpc.aio.Channel, username: str, password: str) -> Metadata:
    """Log in and return metadata with the access token."""
    reply = await auth_service_pb2_grpc.AuthServiceStub(registry).Login(
        auth_service_pb2.LoginRequest(username=username, password=password), timeout=10
    )
    return bearer(reply.tokens.access_token)


async def enroll(
    registry: grpc.aio.Channel,
    admin: Metadata,
    worker_id: str,
    tools: list[machine_pb2.ToolKind.ValueType],
    labels: dict[str, str] | None = None,
    privacy_level: work_pb2.PrivacyLevel.ValueType = work_pb2.PRIVACY_LEVEL_NORMAL,
) -> tuple[str, str]:
    """Create a one-time enrollment token and enroll a worker with it: (worker name, credential)."""
    stub = enrollment_service_pb2_grpc.EnrollmentServiceStub(registry)
    expire = timestamp_pb2.Timestamp()
    expire.FromDatetime(datetime.now(UTC) + timedelta(hours=1))
    created = await stub.CreateEnrollmentToken(
        enrollment_service_pb2.CreateEnrollmentTokenRequest(
            enrollment_token=resources_pb2.EnrollmentToken(
                display_name=f"test {worker_id}",
                max_uses=1,
                labels=labels or {},
                privacy_level=privacy_level,
                expire_time=expire,
            ),
            request_id=uuid.uuid4().hex,
        ),
        metadata=admin,
        timeout=10,
    )
    enrolled = await stub.EnrollAgent(
        enrollment_service_pb2.EnrollAgentRequest(
            token=created.secret,
            worker_id=worker_id,
            hostname="test-host",
            agent_version="test",
            tools=[machine_pb2.Tool(kind=k) for k in tools],
            request_id=uuid.uuid4().hex,
        ),
        timeout=10,
    )
    return enrolled.worker.name, enrolled.agent_credential


Behaviour = Callable[[apb.Assignment], apb.Result | None]


def succeed(assignment: apb.Assignment) -> apb.Result:
    """Finish every assignment successfully at once."""
    return apb.Result(lease=assignment.lease, outcome=work_pb2.OUTCOME_SUCCEEDED, summary=f"did {assignment.key}")


@dataclass
class ScriptedAgent:
    """A protocol-level agent for scheduler tests: speaks maw.agent.v1 exactly, runs no tool.

    ``behaviour`` decides each assignment's Result (None: keep it running until cancelled).
    The real agent (agent/) is exercised end to end in tests/e2e.
    """

    target: str
    worker: str
    credential: str
    tools: list[machine_pb2.ToolKind.ValueType]
    slots: int = 4
    behaviour: Behaviour = succeed
    labels: dict[str, str] = field(default_factory=dict)
    privacy_level: work_pb2.PrivacyLevel.ValueType = work_pb2.PRIVACY_LEVEL_NORMAL
    assignments: list[apb.Assignment] = field(default_factory=list)
    acks: list[apb.ResultAck] = field(default_factory=list)
    cancels: list[apb.Cancel] = field(default_factory=list)
    welcome: apb.Welcome | None = None
    drained: asyncio.Event = field(default_factory=asyncio.Event)
    held: list[apb.HeldAssignment] = field(default_factory=list)
    _out: asyncio.Queue[apb.ConnectRequest | None] = field(default_factory=asyncio.Queue)
    _task: asyncio.Task[None] | None = None
    _beats: asyncio.Task[None] | None = None
    _channel: grpc.aio.Channel | None = None
    error: grpc.aio.AioRpcError | None = None

    def send(self, message: apb.ConnectRequest) -> None:
        """Queue a message to the scheduler."""
        self._out.put_nowait(message)

    async def _requests(self) -> AsyncIterator[apb.ConnectRequest]:
        tools = [machine_pb2.Tool(kind=k) for k in self.tools]
        yield apb.ConnectRequest(
            hello=apb.Hello(
                worker=self.worker,
                protocol_version=1,
                agent_version="scripted",
                capacity_slots=self.slots,
                tools=tools,
                labels=self.labels,
                privacy_level=self.privacy_level,
                held=self.held,
            )  # fmt: skip
        )
        while True:
            item = await self._out.get()
            if item is None:
                return
            yield item

    async def start(self) -> None:
        """Connect and wait for Welcome."""
        self._channel = grpc.aio.insecure_channel(self.target)
        stub = apb_grpc.AgentServiceStub(self._channel)
        call = stub.Connect(self._requests(), metadata=bearer(self.credential))
        first = await asyncio.wait_for(call.read(), 10)
        assert isinstance(first, apb.ConnectResponse) and first.WhichOneof("message") == "welcome", first
        self.welcome = first.welcome
        self._task = asyncio.create_task(self._run(call))
        self._beats = asyncio.create_task(self._heartbeats())

    async def _heartbeats(self) -> None:
        assert self.welcome is not None
        interval = self.welcome.heartbeat_interval.ToTimedelta().total_seconds()
        while True:
            await asyncio.sleep(interval)
            running = [apb.RunningAssignment(lease=a.lease, process_alive=True) for a in self.running()]
            self.send(apb.ConnectRequest(heartbeat=apb.Heartbeat(running=running)))

    def running(self) -> list[apb.Assignment]:
        """Assignments given and neither finished nor cancelled."""
        finished = {(a.lease.subtask, a.lease.attempt) for a in self.acks} | {
            (c.lease.subtask, c.lease.attempt) for c in self.cancels
        }
        return [a for a in self.assignments if (a.lease.subtask, a.lease.attempt) not in finished]

    async def _run(self, call: grpc.aio.StreamStreamCall[apb.ConnectRequest, apb.ConnectResponse]) -> None:
        try:
            while True:
                message = await call.read()
                if not isinstance(message, apb.ConnectResponse):
                    return
                kind = message.WhichOneof("message")
                if kind == "assignments":
                    batch = list(message.assignments.assignments)
                    self.assignments.extend(batch)
                    self.send(apb.ConnectRequest(accepted=apb.Accepted(leases=[a.lease for a in batch])))
                    results = [r for a in batch if (r := self.behaviour(a)) is not None]
                    if results:
                        self.send(apb.ConnectRequest(results=apb.ResultBatch(results=results)))
                elif kind == "result_acks":
                    self.acks.extend(message.result_acks.acks)
                elif kind == "cancels":
                    self.cancels.extend(message.cancels.cancels)
                    done = [
                        apb.Result(lease=c.lease, outcome=work_pb2.OUTCOME_CANCELLED) for c in message.cancels.cancels
                    ]
                    self.send(apb.ConnectRequest(results=apb.ResultBatch(results=done)))
                elif kind == "drain":
                    self.drained.set()
        except grpc.aio.AioRpcError as exc:
            self.error = exc

    async def stop(self) -> None:
        """Close the stream (as a crashed agent would: no Goodbye)."""
        self._out.put_nowait(None)
        for task in (self._task, self._beats):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        if self._channel is not None:
            await self._channel.close()


async def eventually(check: Callable[[], object], timeout: float = 15.0, what: str = "condition") -> None:
    """Poll ``check`` (sync or async) until it returns truthy."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = check()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)
