"""Wake-ups for the Watch calls: Redis pub/sub tells every replica that a log grew."""

from __future__ import annotations

import asyncio
import contextlib

from redis.asyncio import Redis
from redis.exceptions import RedisError

ACTIVITY_FEED = "maw:feed:activity"
WORKER_FEED = "maw:feed:workers"


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
