"""Conversions every part of the scheduler uses: clock, Timestamp/Duration, leases and cancel messages."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from google.protobuf import duration_pb2, timestamp_pb2
from maw.agent.v1 import agent_service_pb2 as apb

from .names import subtask_name

Pair = tuple[str, str]
LeaseKey = tuple[str, str, int]


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


def cancels_message(leases: list[apb.Lease], reason: int, message: str) -> apb.ConnectResponse:
    """One message that tells an agent to stop these attempts."""
    return apb.ConnectResponse(
        cancels=apb.CancelBatch(cancels=[apb.Cancel(lease=lease, reason=reason, message=message) for lease in leases])  # type: ignore[arg-type]
    )
