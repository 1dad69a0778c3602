"""What the registry's servicers share: proto conversions, the activity writer, feeds, presence, batching.

Private to the registry package (api.py and server.py use it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import sys
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
from google.protobuf import duration_pb2, json_format, struct_pb2, timestamp_pb2
from maw.common.v1 import machine_pb2
from maw.registry.v1 import resources_pb2 as res
from maw.registry.v1 import worker_intake_service_pb2 as intake_pb
from redis.asyncio import Redis
from redis.exceptions import RedisError
from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.runtime.auth import Authenticated, Authenticator, AuthMethod, current_authentication, secret_hash
from services.runtime.config import ServiceSettings
from services.runtime.errors import permission_denied, unauthenticated
from services.runtime.logs import redact
from services.runtime.principal import Principal, PrincipalKind, current_principal

from . import credentials, presence, store
from .credentials import Role

_log = logging.getLogger("maw.registry")

ACTIVITY_FEED = "maw:feed:activity"
WORKER_FEED = "maw:feed:workers"
_PRESENCE = "maw:presence:"
_ONLINE = "maw:presence:online"
_COALESCE = "maw:presence:event:"


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


# -- conversions ---------------------------------------------------------------------------------------------------


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


def _scrub(value: Any) -> Any:
    # A last line of defence: activity entries never carry anything that looks like a secret.
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, Mapping):
        return {str(k): _scrub(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_scrub(v) for v in value]
    return value


def _raw(value: bytes | str) -> bytes:
    return value if isinstance(value, bytes) else value.encode()


def _trace_id() -> str:
    from opentelemetry import trace

    ctx = trace.get_current_span().get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else ""


def _peer_host(peer: str) -> str:
    # "ipv4:127.0.0.1:5555" / "ipv6:[::1]:5555" → the address without the port.
    _, _, rest = peer.partition(":")
    host = rest.rsplit(":", 1)[0] if ":" in rest else rest
    return host.strip("[]") or "unknown"


_ACTOR_KINDS = {
    PrincipalKind.USER: res.ACTOR_KIND_USER,
    PrincipalKind.AGENT: res.ACTOR_KIND_AGENT,
    PrincipalKind.SERVICE: res.ACTOR_KIND_SERVICE,
    PrincipalKind.ANONYMOUS: res.ACTOR_KIND_ANONYMOUS,
}


# -- feeds: wake watchers when a log grows -------------------------------------------------------------------------


class Feeds:
    """Redis pub/sub fan-out that wakes local watchers; PostgreSQL stays the source of what they send."""

    def __init__(self, redis: Redis) -> None:
        self._redis = redis
        self._events: dict[str, asyncio.Event] = {ACTIVITY_FEED: asyncio.Event(), WORKER_FEED: asyncio.Event()}
        self._task: asyncio.Task[None] | None = None

    async def wait(self, channel: str, poll_s: float) -> None:
        """Return when ``channel`` was published to, or after ``poll_s`` (watchers poll as a fallback)."""
        event = self._events[channel]
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), poll_s)

    def _wake(self, channel: str) -> None:
        old = self._events[channel]
        self._events[channel] = asyncio.Event()
        old.set()

    async def publish(self, *channels: str) -> None:
        """Tell every registry process that ``channels`` grew."""
        for channel in channels:
            self._wake(channel)
            # When Redis is away, watchers elsewhere still find the rows by polling within a second.
            with contextlib.suppress(RedisError, OSError):
                await self._redis.publish(channel, b"1")

    def start(self) -> None:
        """Start listening."""
        self._task = asyncio.create_task(self._run(), name="maw-registry-feeds")

    async def stop(self) -> None:
        """Stop listening."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            pubsub = self._redis.pubsub()
            try:
                await pubsub.subscribe(*self._events)
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if message is not None and message.get("type") == "message":
                        channel = message["channel"]
                        self._wake(channel.decode() if isinstance(channel, bytes) else str(channel))
            except asyncio.CancelledError:
                raise
            except Exception:  # Redis away: watchers fall back to polling; retry quietly
                await asyncio.sleep(1.0)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]


# -- the registry core ---------------------------------------------------------------------------------------------


@dataclass
class Registry:
    """State shared by all registry servicers in one process."""

    settings: ServiceSettings
    sessions: async_sessionmaker[AsyncSession]
    redis: Redis
    auth: Authenticator
    feeds: Feeds
    api_token_uses: dict[str, datetime] = field(default_factory=dict)
    heartbeats: dict[str, datetime] = field(default_factory=dict)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    # -- activity

    async def append_activity(
        self,
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
                actor_kind=_ACTOR_KINDS[who.kind],
                actor_name=who.name,
                actor_api_token=token,
                actor_peer=_peer_host(peer) if peer else "",
                verb=verb,
                resource=resource,
                worker=worker,
                level=level,
                summary=redact(summary),
                details=_scrub(dict(details or {})),
                service="registry",
                trace_id=_trace_id(),
            )
        )

    async def append_worker_event(
        self, session: AsyncSession, row: store.Worker, kind: presence.EventType, report: Any = None
    ) -> None:
        """Record a catalog change with the worker as it now is."""
        snapshot = (
            worker_pb(row, report) if kind != presence.EventType.REMOVED else res.Worker(name=f"workers/{row.id}")
        )
        await store.lock_log(session, "worker_events")
        session.add(
            store.WorkerEvent(worker_id=row.id, type=int(kind), time=now(), snapshot=snapshot.SerializeToString())
        )

    # -- presence

    async def presence_of(self, ids: list[str]) -> dict[str, intake_pb.WorkerReport]:
        """The live presence reports of ``ids`` (absent when offline or Redis is unreachable)."""
        if not ids:
            return {}
        try:
            values = await self.redis.mget([_PRESENCE + i for i in ids])
        except (RedisError, OSError):
            return {}
        out: dict[str, intake_pb.WorkerReport] = {}
        for worker_id, raw in zip(ids, values, strict=True):
            if raw:
                with contextlib.suppress(Exception):
                    out[worker_id] = intake_pb.WorkerReport.FromString(_raw(raw))
        return out

    async def store_presence(self, worker_id: str, report: intake_pb.WorkerReport) -> tuple[bool, bool]:
        """Apply one report to Redis; returns (applied, became_online_or_offline)."""
        key = _PRESENCE + worker_id
        connect_us = report.connect_time.ToMicroseconds() if report.HasField("connect_time") else 0
        order = (connect_us, report.session_id, report.report_sequence)
        stored_raw = await self.redis.get(key)
        stored = None
        if stored_raw:
            with contextlib.suppress(Exception):
                old = intake_pb.WorkerReport.FromString(_raw(stored_raw))
                old_us = old.connect_time.ToMicroseconds() if old.HasField("connect_time") else 0
                stored = (old_us, old.session_id, old.report_sequence)
        if not presence.newer(order, stored):
            return False, False
        if report.connection_state == intake_pb.CONNECTION_STATE_CONNECTED:
            interval = report.heartbeat_interval.ToTimedelta().total_seconds()
            await self.redis.set(key, report.SerializeToString(), ex=presence.presence_ttl_s(interval))
            changed = bool(await self.redis.sadd(_ONLINE, worker_id))
        else:
            await self.redis.delete(key)
            changed = bool(await self.redis.srem(_ONLINE, worker_id))
        return True, changed

    async def coalesced(self, worker_id: str, interval_s: float) -> bool:
        """True at most once per heartbeat interval per worker (heartbeat-only changes)."""
        try:
            return bool(await self.redis.set(_COALESCE + worker_id, b"1", nx=True, ex=max(1, round(interval_s))))
        except (RedisError, OSError):
            return False

    async def sweep_presence(self) -> None:
        """Workers whose presence key expired go OFFLINE: one UPDATED event each (one replica wins the SREM)."""
        try:
            online = [m.decode() if isinstance(m, bytes) else str(m) for m in await self.redis.smembers(_ONLINE)]
            if not online:
                return
            alive = await self.redis.mget([_PRESENCE + w for w in online])
            gone = [w for w, value in zip(online, alive, strict=True) if value is None]
            expired = [w for w in gone if await self.redis.srem(_ONLINE, w)]
        except (RedisError, OSError):
            return
        if not expired:
            return
        async with self.sessions() as session, session.begin():
            rows = (await session.scalars(select(store.Worker).where(store.Worker.id.in_(expired)))).all()
            for row in rows:
                await self.append_worker_event(session, row, presence.EventType.UPDATED)
        await self.feeds.publish(WORKER_FEED)

    # -- batched writes

    async def flush(self) -> None:
        """Write buffered API-token last-use times and heartbeat times in one batch each."""
        uses, self.api_token_uses = self.api_token_uses, {}
        beats, self.heartbeats = self.heartbeats, {}
        if not uses and not beats:
            return
        try:
            async with self.sessions() as session, session.begin():
                for token_id, moment in uses.items():
                    await session.execute(
                        update(store.ApiToken).where(store.ApiToken.id == token_id).values(last_used_time=moment)
                    )
                for worker_id, moment in beats.items():
                    await session.execute(
                        update(store.Worker).where(store.Worker.id == worker_id).values(last_heartbeat_time=moment)
                    )
        except Exception:  # keep the times for the next round rather than lose them
            _log.warning("could not flush last-use/heartbeat times; will retry", exc_info=True)
            for key, value in uses.items():
                self.api_token_uses.setdefault(key, value)
            for key, value in beats.items():
                self.heartbeats.setdefault(key, value)

    async def forget_old_requests(self) -> None:
        """Idempotency answers are kept for a day."""
        async with self.sessions() as session, session.begin():
            from sqlalchemy import delete

            await session.execute(
                delete(store.Idempotency).where(store.Idempotency.create_time < now() - timedelta(days=1))
            )

    def every(self, seconds: float, job: Callable[[], Awaitable[None]], name: str) -> None:
        """Run ``job`` every ``seconds`` until stop."""

        async def loop() -> None:
            while True:
                await asyncio.sleep(seconds)
                try:
                    await job()
                except asyncio.CancelledError:
                    raise
                except Exception:
                    _log.warning("background job %s failed", name, exc_info=True)

        self._tasks.append(asyncio.create_task(loop(), name=name))

    async def stop(self) -> None:
        """Stop background jobs and write what is buffered."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.flush()
        await self.feeds.stop()

    # -- first admin

    async def ensure_admin(self) -> None:
        """On the very first start, create user ``admin`` (password from MAW_ADMIN_PASSWORD or generated)."""
        async with self.sessions() as session:
            if await session.scalar(select(store.User.id).limit(1)) is not None:
                return
        given = self.settings.admin_password.get_secret_value()
        password = given or secrets.token_urlsafe(18)
        hashed = await asyncio.to_thread(credentials.hash_password, password)
        moment = now()
        admin = Principal(PrincipalKind.SERVICE, "services/registry")
        try:
            async with self.sessions() as session, session.begin():
                session.add(
                    store.User(id="admin", display_name="Administrator", email=None, role=int(Role.ADMIN),
                               disabled=False, password_hash=hashed, version=1, create_time=moment,
                               update_time=moment, last_login_time=None)
                )  # fmt: skip
                await self.append_activity(
                    session, "user.created", resource="users/admin", summary="first admin created", actor=admin,
                    api_token="",
                )  # fmt: skip
        except IntegrityError:
            return  # another replica created it first
        if not given:
            # Shown once, on the terminal only, and never again (the hash alone is kept).
            sys.stderr.write(f"\nmaw: first admin created: user `admin`, password {password}\n\n")
            sys.stderr.flush()

    # -- verifier (the registry checks opaque credentials against its own tables)

    async def verify_api_token(self, secret: str) -> tuple[Authenticated, int]:
        """The user an API token acts for; UNAUTHENTICATED when unknown, expired, revoked or disabled."""
        async with self.sessions() as session:
            found = (
                await session.execute(
                    select(store.ApiToken, store.User)
                    .join(store.User, store.User.id == store.ApiToken.user_id)
                    .where(store.ApiToken.secret_hash == secret_hash(secret))
                )
            ).first()
        moment = now()
        if found is None:
            raise unauthenticated("invalid API token", "CREDENTIAL_INVALID")
        token, user = found.tuple()
        state = credentials.token_state(moment, token.revoke_time, token.expire_time)
        if state != credentials.TokenState.ACTIVE or user.disabled:
            raise unauthenticated("API token is not active", "CREDENTIAL_INVALID")
        self.api_token_uses[token.id] = moment
        role = credentials.effective_role(token.role, user.role)
        name = f"users/{user.id}/apiTokens/{token.id}"
        principal = Principal(PrincipalKind.USER, f"users/{user.id}", role.label, name)
        return Authenticated(principal, AuthMethod.API_TOKEN, token.expire_time, name), int(role)

    async def verify_agent(self, secret: str) -> store.Worker:
        """The worker of an agent credential; UNAUTHENTICATED if unknown, PERMISSION_DENIED if refused."""
        async with self.sessions() as session:
            row = await session.scalar(select(store.Worker).where(store.Worker.credential_hash == secret_hash(secret)))
        if row is None:
            raise unauthenticated("invalid agent credential", "CREDENTIAL_INVALID")
        if row.revoke_time is not None or row.deleted:
            raise permission_denied(f"workers/{row.id} is revoked", "WORKER_REVOKED")
        if row.disabled:
            raise permission_denied(f"workers/{row.id} is disabled", "WORKER_DISABLED")
        return row


class LocalVerifier:
    """The registry's CredentialVerifier: its own tables, no network hop."""

    def __init__(self, registry: Registry) -> None:
        self._registry = registry

    async def api_token(self, secret: str) -> Authenticated:
        auth, _ = await self._registry.verify_api_token(secret)
        return auth

    async def agent(self, secret: str) -> Authenticated:
        row = await self._registry.verify_agent(secret)
        name = f"workers/{row.id}"
        return Authenticated(Principal(PrincipalKind.AGENT, name, "", name), AuthMethod.AGENT_CREDENTIAL)


def peer_of(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    """The caller's peer address (``ipv4:host:port``)."""
    peer: str = context.peer() or ""
    return peer


def peer_host(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    """The caller's host, without the port (login limits per peer address)."""
    return _peer_host(peer_of(context))
