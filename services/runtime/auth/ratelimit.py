"""Per-principal rate limits: token buckets in Redis that fail open when Redis is down."""

from __future__ import annotations

import logging
import time

from redis.asyncio import Redis
from redis.exceptions import RedisError

_log = logging.getLogger("maw.auth")

_BUCKET_SCRIPT = """
local now_parts = redis.call('TIME')
local now = tonumber(now_parts[1]) + tonumber(now_parts[2]) / 1000000
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local state = redis.call('HMGET', KEYS[1], 't', 'v')
local tokens = tonumber(state[2])
local stamp = tonumber(state[1])
if tokens == nil or stamp == nil then
  tokens = burst
  stamp = now
end
tokens = math.min(burst, tokens + math.max(0, now - stamp) * rate)
local need = math.max(cost, 1)
local wait = 0
if tokens >= need then
  tokens = tokens - cost
else
  wait = (need - tokens) / rate
end
redis.call('HSET', KEYS[1], 't', tostring(now), 'v', tostring(tokens))
redis.call('PEXPIRE', KEYS[1], math.ceil(burst / rate * 1000) + 1000)
return tostring(wait)
"""


class RateLimiter:
    """Token buckets in Redis, updated atomically by one Lua script; fails open when Redis is down."""

    def __init__(self, redis: Redis) -> None:
        self._script = redis.register_script(_BUCKET_SCRIPT)
        self._warned_at = 0.0

    async def take(self, key: str, rate_per_s: float, burst: int, cost: int = 1) -> float:
        """Take ``cost`` tokens from bucket ``key``; returns 0 when allowed, else seconds to wait.

        ``cost=0`` only checks that a token is left (used to count failures only).
        """
        try:
            wait = await self._script(keys=["maw:rl:" + key], args=[rate_per_s, burst, cost])
        except (RedisError, OSError) as exc:
            if time.monotonic() - self._warned_at > 30:
                self._warned_at = time.monotonic()
                _log.warning("rate limits off: Redis unavailable (%s)", type(exc).__name__)
            return 0.0
        return float(wait)
