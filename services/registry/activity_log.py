"""Appending to the registry's two ordered logs: activity entries and worker catalog events."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from maw.registry.v1 import resources_pb2 as res
from opentelemetry import trace
from sqlalchemy.ext.asyncio import AsyncSession

from services.runtime.auth import current_authentication
from services.runtime.logs import redact
from services.runtime.principal import Principal, PrincipalKind, current_principal

from . import presence, store
from .convert import now, worker_pb

ACTOR_KINDS = {
    PrincipalKind.USER: res.ACTOR_KIND_USER,
    PrincipalKind.AGENT: res.ACTOR_KIND_AGENT,
    PrincipalKind.SERVICE: res.ACTOR_KIND_SERVICE,
    PrincipalKind.ANONYMOUS: res.ACTOR_KIND_ANONYMOUS,
}


def scrub(value: Any) -> Any:
    """``value`` with anything that looks like a secret redacted, all the way down."""
    # A last line of defence: activity entries never carry anything that looks like a secret.
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, Mapping):
        return {str(k): scrub(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [scrub(v) for v in value]
    return value


def trace_id() -> str:
    """The current trace id in hex, or empty outside a trace."""
    ctx = trace.get_current_span().get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else ""


def peer_host(peer: str) -> str:
    """The address of a gRPC peer without the port (``ipv4:127.0.0.1:5555`` → ``127.0.0.1``)."""
    _, _, rest = peer.partition(":")
    host = rest.rsplit(":", 1)[0] if ":" in rest else rest
    return host.strip("[]") or "unknown"


async def append(
    session: AsyncSession,
    verb: str,
    *,
    resource: str = "",
    summary: str = "",
    details: Mapping[str, Any] | None = None,
    level: int = res.ACTIVITY_LEVEL_INFO,
    worker: str = "",
    peer: str = "",
    actor: Principal | None = None,
    api_token: str | None = None,
) -> None:
    """Append one registry entry in ``session``'s transaction (the act and its record commit together)."""
    who = actor or current_principal()
    token = api_token if api_token is not None else current_authentication().api_token
    await store.lock_log(session, "activity")
    session.add(
        store.Activity(
            time=now(),
            actor_kind=ACTOR_KINDS[who.kind],
            actor_name=who.name,
            actor_api_token=token,
            actor_peer=peer_host(peer) if peer else "",
            verb=verb,
            resource=resource,
            worker=worker,
            level=level,
            summary=redact(summary),
            details=scrub(dict(details or {})),
            service="registry",
            trace_id=trace_id(),
        )
    )


async def worker_event(session: AsyncSession, row: store.Worker, kind: presence.EventType, report: Any = None) -> None:
    """Record a catalog change with the worker as it now is."""
    snapshot = worker_pb(row, report) if kind != presence.EventType.REMOVED else res.Worker(name=f"workers/{row.id}")
    await store.lock_log(session, "worker_events")
    session.add(store.WorkerEvent(worker_id=row.id, type=int(kind), time=now(), snapshot=snapshot.SerializeToString()))
