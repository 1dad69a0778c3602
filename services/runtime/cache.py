"""Redis access: ephemeral state, locks and pub/sub only. Nothing durable lives here."""

from __future__ import annotations

from redis.asyncio import Redis


def create_redis(redis_url: str) -> Redis:
    """A pooled asyncio client with short socket timeouts, so a dead Redis fails fast."""
    client: Redis = Redis.from_url(
        redis_url,
        socket_connect_timeout=2.0,
        socket_timeout=5.0,
        health_check_interval=15,
        retry_on_timeout=True,
        decode_responses=False,
    )
    return client


async def ping(client: Redis) -> None:
    """Raise if Redis does not answer PING."""
    await client.ping()
