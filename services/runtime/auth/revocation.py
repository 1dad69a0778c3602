"""Instant revocation: published on Redis pub/sub, remembered in Redis keys, cached in each process."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable, Iterable, Mapping

from redis.asyncio import Redis
from redis.exceptions import RedisError

_log = logging.getLogger("maw.auth")

REVOCATION_CHANNEL = "maw:revocations"
_REVOKED_KEY = "maw:revoked:"


class Revocations:
    """Who was revoked when: published on Redis pub/sub, remembered in Redis keys, cached in process.

    Ids are principal or credential names: ``users/{user}``, ``sessions/{session}``,
    ``users/{user}/apiTokens/{token}``, ``workers/{worker}``. Listeners registered with :meth:`listen`
    (open streams, credential caches) hear every revocation that reaches this process.
    """

    _CACHE_TTL_S = 5.0
    _CACHE_MAX = 50_000

    def __init__(self, redis: Redis, key_ttl_s: int) -> None:
        self._redis = redis
        self._key_ttl_s = key_ttl_s
        self._known: dict[str, tuple[float | None, float]] = {}
        self._listeners: list[Callable[[Mapping[str, float]], None]] = []
        self._task: asyncio.Task[None] | None = None
        self._subscribed = asyncio.Event()
        self._warned_at = 0.0

    def listen(self, listener: Callable[[Mapping[str, float]], None]) -> None:
        """Call ``listener`` with ``{id: revoked_at}`` for every revocation heard."""
        self._listeners.append(listener)

    def apply(self, ids: Mapping[str, float]) -> None:
        """Record revocations heard (or made) by this process and tell the listeners."""
        now = time.monotonic()
        for rid, at in ids.items():
            self._known[rid] = (at, now)
        for listener in self._listeners:
            listener(ids)

    async def publish(self, ids: Iterable[str]) -> None:
        """Revoke ``ids`` now, in every process: Redis keys, then the channel, then this process."""
        at = time.time()
        revoked = {rid: at for rid in ids}
        if not revoked:
            return
        self.apply(revoked)
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for rid in revoked:
                    pipe.set(_REVOKED_KEY + rid, repr(at), ex=self._key_ttl_s)
                pipe.publish(REVOCATION_CHANNEL, json.dumps({"ids": revoked}))
                await pipe.execute()
        except (RedisError, OSError) as exc:
            # The durable state (PostgreSQL) already says revoked; only other processes' caches lag.
            _log.error("could not publish a revocation to Redis: %s", type(exc).__name__)

    async def revoked_at(self, ids: Iterable[str]) -> float | None:
        """The latest revocation time of any of ``ids``, or None."""
        now = time.monotonic()
        wanted = list(ids)
        missing = [rid for rid in wanted if rid not in self._known or now - self._known[rid][1] > self._CACHE_TTL_S]
        if missing:
            try:
                values = await self._redis.mget([_REVOKED_KEY + rid for rid in missing])
            except (RedisError, OSError) as exc:
                self._warn(exc)
                values = [None] * len(missing)
            if len(self._known) > self._CACHE_MAX:
                self._known.clear()
            for rid, value in zip(missing, values, strict=True):
                self._known[rid] = (float(value) if value is not None else None, now)
        times = [at for rid in wanted if (at := self._known.get(rid, (None, 0.0))[0]) is not None]
        return max(times) if times else None

    def _warn(self, exc: BaseException) -> None:
        if time.monotonic() - self._warned_at > 30:
            self._warned_at = time.monotonic()
            _log.warning("Redis unavailable for revocation checks (failing open): %s", type(exc).__name__)

    async def start(self) -> None:
        """Start listening on the revocation channel (waits briefly for the first subscription)."""
        self._task = asyncio.create_task(self._run(), name="maw-revocations")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._subscribed.wait(), timeout=5)

    async def stop(self) -> None:
        """Stop listening."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        backoff = 0.2
        while True:
            pubsub = self._redis.pubsub()
            try:
                await pubsub.subscribe(REVOCATION_CHANNEL)
                # Whatever was published while we were not listening: forget cached answers.
                self._known.clear()
                for listener in self._listeners:
                    listener({})
                self._subscribed.set()
                backoff = 0.2
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if message is None or message.get("type") != "message":
                        continue
                    try:
                        payload = json.loads(message["data"])
                        ids = {str(k): float(v) for k, v in payload["ids"].items()}
                    except (ValueError, KeyError, TypeError, AttributeError):
                        _log.warning("ignored a malformed revocation message")
                        continue
                    self.apply(ids)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis went away: retry with backoff, keep serving
                self._warn(exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
