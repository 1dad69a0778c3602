"""Live worker presence in Redis: one expiring report per worker and the set of those online."""

from __future__ import annotations

import contextlib

from maw.registry.v1 import worker_intake_service_pb2 as intake_pb
from redis.asyncio import Redis
from redis.exceptions import RedisError

from . import presence

_PRESENCE = "maw:presence:"
_ONLINE = "maw:presence:online"
_COALESCE = "maw:presence:event:"


def _raw(value: bytes | str) -> bytes:
    return value if isinstance(value, bytes) else value.encode()


class PresenceStore:
    """Presence reports kept in Redis, each living about three heartbeat intervals."""

    def __init__(self, redis: Redis) -> None:
        self._redis = redis

    async def reports(self, ids: list[str]) -> dict[str, intake_pb.WorkerReport]:
        """The live presence reports of ``ids`` (absent when offline or Redis is unreachable)."""
        if not ids:
            return {}
        try:
            values = await self._redis.mget([_PRESENCE + i for i in ids])
        except (RedisError, OSError):
            return {}
        out: dict[str, intake_pb.WorkerReport] = {}
        for worker_id, raw in zip(ids, values, strict=True):
            if raw:
                with contextlib.suppress(Exception):
                    out[worker_id] = intake_pb.WorkerReport.FromString(_raw(raw))
        return out

    async def apply(self, worker_id: str, report: intake_pb.WorkerReport) -> tuple[bool, bool]:
        """Apply one report; returns (applied, became_online_or_offline)."""
        key = _PRESENCE + worker_id
        connect_us = report.connect_time.ToMicroseconds() if report.HasField("connect_time") else 0
        order = (connect_us, report.session_id, report.report_sequence)
        stored_raw = await self._redis.get(key)
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
            await self._redis.set(key, report.SerializeToString(), ex=presence.presence_ttl_s(interval))
            changed = bool(await self._redis.sadd(_ONLINE, worker_id))
        else:
            await self._redis.delete(key)
            changed = bool(await self._redis.srem(_ONLINE, worker_id))
        return True, changed

    async def coalesced(self, worker_id: str, interval_s: float) -> bool:
        """True at most once per heartbeat interval per worker (heartbeat-only changes)."""
        try:
            return bool(await self._redis.set(_COALESCE + worker_id, b"1", nx=True, ex=max(1, round(interval_s))))
        except (RedisError, OSError):
            return False

    async def expired(self) -> list[str]:
        """Workers whose presence key expired since the last call (one replica wins each SREM)."""
        try:
            online = [m.decode() if isinstance(m, bytes) else str(m) for m in await self._redis.smembers(_ONLINE)]
            if not online:
                return []
            alive = await self._redis.mget([_PRESENCE + w for w in online])
            gone = [w for w, value in zip(online, alive, strict=True) if value is None]
            return [w for w in gone if await self._redis.srem(_ONLINE, w)]
        except (RedisError, OSError):
            return []
