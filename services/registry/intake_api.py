"""The internal intakes: agent authentication and presence reports, API-token checks, activity from other services."""

from __future__ import annotations

from typing import Any

from google.protobuf import json_format
from maw.registry.v1 import activity_intake_service_pb2 as aintake_pb
from maw.registry.v1 import activity_intake_service_pb2_grpc as aintake_grpc
from maw.registry.v1 import credential_intake_service_pb2 as cintake_pb
from maw.registry.v1 import credential_intake_service_pb2_grpc as cintake_grpc
from maw.registry.v1 import resources_pb2 as res
from maw.registry.v1 import worker_intake_service_pb2 as wintake_pb
from maw.registry.v1 import worker_intake_service_pb2_grpc as wintake_grpc

from services.runtime.errors import (
    invalid_argument,
)
from services.runtime.logs import redact

from . import activity_log, convert, presence, store, validation, verifier
from ._servicing import MAX_BATCH, Context, caller
from .convert import now, ts
from .feeds import ACTIVITY_FEED, WORKER_FEED
from .registry import Registry


class WorkerIntakeServicer(wintake_grpc.WorkerIntakeServiceServicer):
    """Agent authentication and presence reports from the scheduler."""

    def __init__(self, registry: Registry) -> None:
        self.r = registry

    async def AuthenticateAgent(
        self, request: wintake_pb.AuthenticateAgentRequest, context: Context
    ) -> wintake_pb.AuthenticateAgentResponse:
        if not request.agent_credential:
            raise invalid_argument([("agent_credential", "required")])
        row = await verifier.verify_agent(self.r, request.agent_credential)
        found = await self.r.presence_store.reports([row.id])
        return wintake_pb.AuthenticateAgentResponse(worker=convert.worker_pb(row, found.get(row.id)))

    async def ReportWorkers(
        self, request: wintake_pb.ReportWorkersRequest, context: Context
    ) -> wintake_pb.ReportWorkersResponse:
        if len(request.reports) > MAX_BATCH:
            raise validation.too_many("reports", MAX_BATCH)
        ids = [
            validation.name_id(report.worker, "workers", validation.WORKER_ID, f"reports[{i}].worker")
            for i, report in enumerate(request.reports)
        ]
        out: list[res.Worker] = []
        changed_any = False
        async with self.r.sessions() as session, session.begin():
            rows = {r.id: r for r in await store.workers(session, ids, lock=True)}
            for worker_id, report in zip(ids, request.reports, strict=True):
                row = rows.get(worker_id)
                if row is None or row.deleted:
                    continue
                try:
                    applied, flipped = await self.r.presence_store.apply(worker_id, report)
                except Exception:  # Redis away: the durable fields still land; presence waits for Redis
                    applied, flipped = True, False
                durable = applied and _apply_durable(row, report)
                interval = report.heartbeat_interval.ToTimedelta().total_seconds() or presence.DEFAULT_HEARTBEAT_S
                if applied and report.HasField("last_heartbeat_time"):
                    self.r.heartbeats[worker_id] = convert.from_ts(report.last_heartbeat_time)
                live = report if report.connection_state == wintake_pb.CONNECTION_STATE_CONNECTED else None
                if durable or flipped or (applied and await self.r.presence_store.coalesced(worker_id, interval)):
                    if durable:
                        row.update_time = now()
                        row.version += 1
                    await activity_log.worker_event(session, row, presence.EventType.UPDATED, live)
                    changed_any = True
                out.append(
                    convert.worker_pb(
                        row, live if applied else (await self.r.presence_store.reports([worker_id])).get(worker_id)
                    )
                )
        if changed_any:
            await self.r.feeds.publish(WORKER_FEED)
        return wintake_pb.ReportWorkersResponse(workers=out)


def _apply_durable(row: store.Worker, report: wintake_pb.WorkerReport) -> bool:
    """Copy the catalog fields of a report; True when something durable changed."""
    values: dict[str, Any] = {
        "hostname": report.hostname or row.hostname,
        "agent_version": report.agent_version or row.agent_version,
        "platform": report.platform or row.platform,
        "tools": convert.tools_json(report.tools) if report.tools else row.tools,
        "agent_labels": dict(report.agent_labels),
        "declared_slots": report.declared_slots,
        "tool_stats": convert.stats_json(report.tool_stats) if report.tool_stats else row.tool_stats,
        "session_id": report.session_id,
        "heartbeat_interval_ms": int(report.heartbeat_interval.ToTimedelta().total_seconds() * 1000),
    }
    if report.HasField("connect_time"):
        values["connect_time"] = convert.from_ts(report.connect_time)
    changed = False
    for key, value in values.items():
        if getattr(row, key) != value:
            setattr(row, key, value)
            changed = True
    return changed


class CredentialIntakeServicer(cintake_grpc.CredentialIntakeServiceServicer):
    """API-token checks for the other services."""

    def __init__(self, registry: Registry) -> None:
        self.r = registry

    async def AuthenticateApiToken(
        self, request: cintake_pb.AuthenticateApiTokenRequest, context: Context
    ) -> cintake_pb.AuthenticateApiTokenResponse:
        if not request.secret:
            raise invalid_argument([("secret", "required")])
        auth, role = await verifier.verify_api_token(self.r, request.secret)
        return cintake_pb.AuthenticateApiTokenResponse(
            user=auth.principal.name,
            api_token=auth.api_token,
            role=role,  # type: ignore[arg-type]
            expire_time=ts(auth.expire_time),
        )


class ActivityIntakeServicer(aintake_grpc.ActivityIntakeServiceServicer):
    """Activity entries from the scheduler and the evaluator (idempotent by entry id)."""

    def __init__(self, registry: Registry) -> None:
        self.r = registry

    async def AppendActivity(
        self, request: aintake_pb.AppendActivityRequest, context: Context
    ) -> aintake_pb.AppendActivityResponse:
        service = caller().name.removeprefix("services/")
        if len(request.records) > MAX_BATCH:
            raise validation.too_many("records", MAX_BATCH)
        bad: list[tuple[str, str]] = []
        seen: set[str] = set()
        for i, record in enumerate(request.records):
            entry = record.entry
            if not record.entry_id or len(record.entry_id) > 200:
                bad.append((f"records[{i}].entry_id", "required, at most 200 characters"))
            if entry.service and entry.service != service:
                bad.append((f"records[{i}].entry.service", f"must be the service's ({service})"))
            if (
                not entry.verb
                or len(entry.verb) > 100
                or not all(c.islower() or c in "._" or c.isdigit() for c in entry.verb)
            ):
                bad.append((f"records[{i}].entry.verb", "required: `<kind>.<verb>` in lower snake case"))
            if len(entry.summary) > 2000:
                bad.append((f"records[{i}].entry.summary", "at most 2000 characters"))
            for field in ("resource", "task", "subtask", "worker", "trace_id"):
                if len(getattr(entry, field)) > 300:
                    bad.append((f"records[{i}].entry.{field}", "at most 300 characters"))
            seen.add(record.entry_id)
        if bad:
            raise invalid_argument(bad[:50])
        rows = [
            {
                "entry_id": record.entry_id,
                "time": convert.from_ts(record.entry.time) if record.entry.HasField("time") else now(),
                "actor_kind": record.entry.actor.kind or res.ACTOR_KIND_SERVICE,
                "actor_name": record.entry.actor.name or service,
                "actor_api_token": record.entry.actor.api_token,
                "actor_peer": record.entry.actor.peer,
                "verb": record.entry.verb,
                "resource": record.entry.resource,
                "task": record.entry.task,
                "subtask": record.entry.subtask,
                "worker": record.entry.worker,
                "level": record.entry.level or res.ACTIVITY_LEVEL_INFO,
                "summary": redact(record.entry.summary),
                "details": activity_log.scrub(json_format.MessageToDict(record.entry.details)),
                "service": service,
                "trace_id": record.entry.trace_id,
            }
            for record in request.records
        ]
        async with self.r.sessions() as session, session.begin():
            await store.lock_log(session, "activity")
            await store.add_activity_once(session, rows)
        await self.r.feeds.publish(ACTIVITY_FEED)
        return aintake_pb.AppendActivityResponse(entry_ids=[r.entry_id for r in request.records])
