"""The agent's side of the Connect protocol as functions: the channel, the messages it sends, reading replies."""

from __future__ import annotations

import platform
import socket
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

import grpc
from google.protobuf import duration_pb2, timestamp_pb2
from maw.agent.v1 import agent_service_pb2 as agent_pb2
from maw.common.v1 import machine_pb2, work_pb2

from maw_agent import __version__
from maw_agent._workspace import Workspaces
from maw_agent.config import AgentConfig
from maw_agent.tools import ToolAdapter, ToolInfo

PROTOCOL_VERSION = 1
DEFAULT_HEARTBEAT_S = 10.0
DEFAULT_MAX_MESSAGE_BYTES = 4 << 20

_CHANNEL_OPTIONS = (
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.max_receive_message_length", 64 << 20),
    ("grpc.max_send_message_length", 64 << 20),
    ("grpc.enable_retries", 0),
)

GOOD_DISPOSITIONS = (agent_pb2.RESULT_DISPOSITION_ACCEPTED, agent_pb2.RESULT_DISPOSITION_DUPLICATE)
_TOOL_KINDS = frozenset(machine_pb2.ToolKind.values())
_CANCEL_REASONS = frozenset(agent_pb2.CancelReason.values())

Refusal = tuple[agent_pb2.DeclineReason.ValueType, str]
ConnectCall = grpc.aio.StreamStreamCall[agent_pb2.ConnectRequest, agent_pb2.ConnectResponse]


class Running(Protocol):
    """What the messages tell about an assignment running here (an ``Execution``)."""

    @property
    def assignment(self) -> agent_pb2.Assignment: ...
    @property
    def process_alive(self) -> bool: ...

    discard: bool
    progress_percent: int
    start_time: float
    last_output_time: float


@dataclass(frozen=True)
class SessionTerms:
    """What the Welcome settles for a session: heartbeat interval, batch limits, the scheduler's clock skew."""

    heartbeat_s: float
    max_items: int
    max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    clock_skew: float = 0.0

    @classmethod
    def welcomed(cls, welcome: agent_pb2.Welcome, config: AgentConfig, clock_skew: float) -> SessionTerms:
        """The terms of ``welcome``; the configuration's own heartbeat and batch limit win when set.

        ``clock_skew`` (the last one measured) stays when the Welcome carries no server time.
        """
        limit = welcome.max_message_bytes if welcome.max_message_bytes > 0 else DEFAULT_MAX_MESSAGE_BYTES
        if welcome.HasField("server_time"):
            skew = epoch_seconds(welcome.server_time) - time.time()
            clock_skew = skew if abs(skew) > 2 else 0.0
        return cls(
            heartbeat_s=config.heartbeat_interval_s or duration_seconds(welcome.heartbeat_interval) or 10.0,
            max_items=welcome.max_batch_items if welcome.max_batch_items > 0 else config.max_batch_items,
            max_bytes=max(64 << 10, int(limit * 0.9)),
            clock_skew=clock_skew,
        )


def open_channel(config: AgentConfig) -> grpc.aio.Channel:
    """The channel to the scheduler (or the gateway) the configuration names, TLS when asked for."""
    if not config.tls:
        return grpc.aio.insecure_channel(config.server, options=_CHANNEL_OPTIONS)
    roots = config.tls_ca_file.read_bytes() if config.tls_ca_file is not None else None
    options: list[tuple[str, str | int]] = list(_CHANNEL_OPTIONS)
    if config.tls_server_name:
        options.append(("grpc.ssl_target_name_override", config.tls_server_name))
    return grpc.aio.secure_channel(
        config.server, grpc.ssl_channel_credentials(root_certificates=roots), options=options
    )


def timestamp(seconds: float) -> timestamp_pb2.Timestamp:
    """A Timestamp of ``seconds`` since the epoch."""
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


def epoch_seconds(stamp: timestamp_pb2.Timestamp) -> float:
    """The seconds since the epoch of a Timestamp."""
    return stamp.seconds + stamp.nanos / 1e9


def duration_seconds(duration: duration_pb2.Duration) -> float:
    """The length of a Duration in seconds."""
    return duration.seconds + duration.nanos / 1e9


def platform_name() -> str:
    """This machine as ``<os>/<arch>`` (``linux/amd64``), the way Hello and enrollment report it."""
    machine = platform.machine().lower()
    arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(machine, machine)
    return f"{sys.platform}/{arch}"


def held_assignments(
    running: Iterable[Running], finished: Iterable[agent_pb2.Result]
) -> list[agent_pb2.HeldAssignment]:
    """What the agent still holds: assignments running (not discarded) and results waiting for their ack."""
    held = [
        agent_pb2.HeldAssignment(
            lease=execution.assignment.lease,
            state=agent_pb2.HELD_STATE_RUNNING,
            progress_percent=execution.progress_percent,
            start_time=timestamp(execution.start_time),
        )
        for execution in running
        if not execution.discard
    ]
    held.extend(
        agent_pb2.HeldAssignment(
            lease=result.lease,
            state=agent_pb2.HELD_STATE_FINISHED,
            progress_percent=100,
            start_time=result.start_time,
        )
        for result in finished
    )
    return held


def hello(
    config: AgentConfig,
    tools: Iterable[tuple[ToolAdapter, ToolInfo]],
    resources: machine_pb2.ResourceUsage,
    held: list[agent_pb2.HeldAssignment],
    previous_session_id: str,
) -> agent_pb2.ConnectRequest:
    """The first message of a session: who this agent is, what it offers, what it still holds."""
    message = agent_pb2.Hello(
        worker=config.worker,
        protocol_version=PROTOCOL_VERSION,
        agent_version=__version__,
        hostname=socket.gethostname(),
        platform=platform_name(),
        tools=[
            machine_pb2.Tool(
                kind=adapter.kind,
                version=info.version,
                models=list(info.models),
                local_only=info.local_only,
                provider=info.provider,
                max_concurrency=info.max_concurrency,
            )
            for adapter, info in tools
        ],
        labels=config.labels,
        resources=resources,
        privacy_level=(
            work_pb2.PRIVACY_LEVEL_SENSITIVE if config.privacy_level == "sensitive" else work_pb2.PRIVACY_LEVEL_NORMAL
        ),
        capacity_slots=config.capacity_slots,
        held=held,
        previous_session_id=previous_session_id,
    )
    return agent_pb2.ConnectRequest(hello=message)


def heartbeat(running: Iterable[Running], resources: machine_pb2.ResourceUsage, free_slots: int) -> agent_pb2.Heartbeat:
    """A Heartbeat: the machine's resources, free slots and every running (not discarded) assignment."""
    message = agent_pb2.Heartbeat(resources=resources, free_slots=free_slots, sent_time=timestamp(time.time()))
    for execution in running:
        if execution.discard:
            continue
        message.running.add(
            lease=execution.assignment.lease,
            process_alive=execution.process_alive,
            last_output_time=timestamp(execution.last_output_time),
            progress_percent=execution.progress_percent,
        )
    return message


def refusal(assignment: agent_pb2.Assignment, *, stopping: bool, tool_offered: bool, free_slots: int) -> Refusal | None:
    """Why an assignment cannot start here (before looking at its tool options), or None."""
    if stopping:
        return agent_pb2.DECLINE_REASON_SHUTTING_DOWN, "the agent is shutting down"
    if not tool_offered:
        kind = assignment.tool.kind
        name = machine_pb2.ToolKind.Name(kind) if kind in _TOOL_KINDS else str(kind)
        return agent_pb2.DECLINE_REASON_TOOL_UNAVAILABLE, f"tool {name} is not offered here"
    if free_slots <= 0:
        return agent_pb2.DECLINE_REASON_NO_FREE_SLOT, "all slots are busy"
    if assignment.workspace.repository:
        problem = Workspaces.problem(assignment.workspace)
        if problem is not None:
            return agent_pb2.DECLINE_REASON_UNSUPPORTED, problem
    return None


def cancel_text(cancel: agent_pb2.Cancel) -> str:
    """How a Cancel is reported in the log and the result: ``cancelled (<reason>)[: <message>]``."""
    reason = agent_pb2.CancelReason.Name(cancel.reason) if cancel.reason in _CANCEL_REASONS else str(cancel.reason)
    return f"cancelled ({reason}){': ' + cancel.message if cancel.message else ''}"


async def call_status(call: ConnectCall) -> str:
    """The status a finished Connect call ended with, as ``CODE: details``."""
    try:
        code = await call.code()
        details = await call.details()
    except Exception as exc:
        return describe(exc)
    return f"{code.name}: {details}" if details else code.name


def describe(exc: BaseException) -> str:
    """An error in one line for the log: the status of an RPC error, else the exception's type and text."""
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
