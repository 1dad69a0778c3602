"""Conversions between the registry's rows and its proto resources, and between times and Timestamps."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from google.protobuf import duration_pb2, json_format, struct_pb2, timestamp_pb2
from maw.common.v1 import machine_pb2
from maw.registry.v1 import resources_pb2 as res
from maw.registry.v1 import worker_intake_service_pb2 as intake_pb

from . import credentials, presence, store


def now() -> datetime:
    """The current time, UTC."""
    return datetime.now(UTC)


def ts(moment: datetime | None) -> timestamp_pb2.Timestamp | None:
    """A protobuf Timestamp, or None."""
    if moment is None:
        return None
    out = timestamp_pb2.Timestamp()
    out.FromDatetime(moment)
    return out


def from_ts(value: timestamp_pb2.Timestamp) -> datetime:
    """A datetime from a protobuf Timestamp."""
    return value.ToDatetime(tzinfo=UTC)


def user_pb(row: store.User) -> res.User:
    """The User resource of a row."""
    return res.User(
        name=f"users/{row.id}",
        display_name=row.display_name,
        email=row.email or "",
        role=row.role,  # type: ignore[arg-type]
        disabled=row.disabled,
        create_time=ts(row.create_time),
        update_time=ts(row.update_time),
        last_login_time=ts(row.last_login_time),
        etag=str(row.version),
    )


def api_token_pb(row: store.ApiToken, at: datetime) -> res.ApiToken:
    """The ApiToken resource of a row (never its secret)."""
    return res.ApiToken(
        name=f"users/{row.user_id}/apiTokens/{row.id}",
        display_name=row.display_name,
        role=row.role,  # type: ignore[arg-type]
        expire_time=ts(row.expire_time),
        secret_prefix=row.secret_prefix,
        state=credentials.token_state(at, row.revoke_time, row.expire_time).value,  # type: ignore[arg-type]
        create_time=ts(row.create_time),
        last_used_time=ts(row.last_used_time),
        revoke_time=ts(row.revoke_time),
    )


def enrollment_pb(row: store.EnrollmentToken, at: datetime, workers: Iterable[str] = ()) -> res.EnrollmentToken:
    """The EnrollmentToken resource of a row (never its secret)."""
    state = credentials.token_state(at, row.revoke_time, row.expire_time, row.use_count, row.max_uses)
    return res.EnrollmentToken(
        name=f"enrollmentTokens/{row.id}",
        display_name=row.display_name,
        max_uses=row.max_uses,
        use_count=row.use_count,
        expire_time=ts(row.expire_time),
        labels={str(k): str(v) for k, v in row.labels.items()},
        privacy_level=row.privacy_level,  # type: ignore[arg-type]
        state=state.value,  # type: ignore[arg-type]
        secret_prefix=row.secret_prefix,
        creator=row.creator,
        create_time=ts(row.create_time),
        revoke_time=ts(row.revoke_time),
        workers=[f"workers/{w}" for w in workers],
    )


def tools_json(tools: Iterable[machine_pb2.Tool]) -> list[Any]:
    """Tools as JSON for the catalog row."""
    return [json_format.MessageToDict(t, preserving_proto_field_name=True) for t in tools]


def stats_json(stats: Iterable[machine_pb2.ToolStats]) -> list[Any]:
    """Tool statistics as JSON for the catalog row."""
    return [json_format.MessageToDict(s, preserving_proto_field_name=True) for s in stats]


def worker_pb(row: store.Worker, report: intake_pb.WorkerReport | None) -> res.Worker:
    """The Worker resource: the catalog row plus live presence (``report`` is None when offline)."""
    tools = [json_format.ParseDict(t, machine_pb2.Tool(), ignore_unknown_fields=True) for t in row.tools]
    stats = [json_format.ParseDict(s, machine_pb2.ToolStats(), ignore_unknown_fields=True) for s in row.tool_stats]
    labels = {str(k): str(v) for k, v in row.labels.items()}
    agent_labels = {str(k): str(v) for k, v in row.agent_labels.items()}
    live = report is not None and report.connection_state == intake_pb.CONNECTION_STATE_CONNECTED
    status = presence.status(
        revoked=row.revoke_time is not None or row.deleted,
        disabled=row.disabled,
        draining=row.draining,
        present=live,
    )
    worker = res.Worker(
        name=f"workers/{row.id}",
        display_name=row.display_name or row.hostname,
        hostname=row.hostname,
        agent_version=row.agent_version,
        platform=row.platform,
        tools=tools,
        labels=labels,
        agent_labels=agent_labels,
        effective_labels={**agent_labels, **labels},
        privacy_level=row.privacy_level,  # type: ignore[arg-type]
        local_only=bool(tools) and all(t.local_only for t in tools),
        capacity_slots=row.capacity_slots,
        declared_slots=row.declared_slots,
        status=status.value,  # type: ignore[arg-type]
        draining=row.draining,
        disabled=row.disabled,
        last_heartbeat_time=ts(row.last_heartbeat_time),
        connect_time=ts(row.connect_time),
        tool_stats=stats,
        enrollment_token=f"enrollmentTokens/{row.enrollment_token_id}" if row.enrollment_token_id else "",
        create_time=ts(row.create_time),
        update_time=ts(row.update_time),
        revoke_time=ts(row.revoke_time),
        heartbeat_interval=duration_pb2.Duration(
            seconds=row.heartbeat_interval_ms // 1000, nanos=(row.heartbeat_interval_ms % 1000) * 1_000_000
        ),
        etag=str(row.version),
    )
    if report is not None and live:
        worker.resources.CopyFrom(report.resources)
        worker.slots_in_use = report.slots_in_use
        worker.assignments.extend(report.assignments)
        worker.session_id = report.session_id
        if report.HasField("last_heartbeat_time"):
            worker.last_heartbeat_time.CopyFrom(report.last_heartbeat_time)
    return worker


def activity_pb(row: store.Activity) -> res.ActivityEntry:
    """The ActivityEntry resource of a row."""
    details = struct_pb2.Struct()
    details.update(row.details or {})
    return res.ActivityEntry(
        name=f"activityEntries/{row.sequence}",
        sequence=row.sequence,
        time=ts(row.time),
        actor=res.Actor(
            kind=row.actor_kind,  # type: ignore[arg-type]
            name=row.actor_name,
            api_token=row.actor_api_token,
            peer=row.actor_peer,
        ),
        verb=row.verb,
        resource=row.resource,
        task=row.task,
        subtask=row.subtask,
        worker=row.worker,
        level=row.level,  # type: ignore[arg-type]
        summary=row.summary,
        details=details,
        service=row.service,
        trace_id=row.trace_id,
    )
