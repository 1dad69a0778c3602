"""Wake-ups from other replicas over Redis: new READY work, stop orders, task events, session take-overs.

Redis only carries wake-ups; every loop also polls PostgreSQL, so losing Redis slows nothing down for long
and loses nothing. After a Redis restart the listener subscribes again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json

from .replica import CANCEL_CHANNEL, SESSION_CHANNEL, TASK_CHANNEL_PREFIX, WAKE_CHANNEL, Replica


async def listen(replica: Replica) -> None:
    """Act on other replicas' messages until the connection drops (the engine restarts this)."""
    pubsub = replica.redis.pubsub()
    try:
        await pubsub.subscribe(WAKE_CHANNEL, CANCEL_CHANNEL, SESSION_CHANNEL)
        await pubsub.psubscribe(TASK_CHANNEL_PREFIX + "*")
        async for message in pubsub.listen():
            kind = message.get("type")
            channel = message.get("channel", b"")
            data = message.get("data", b"")
            if kind == "pmessage":
                task_id = channel.decode()[len(TASK_CHANNEL_PREFIX) :]
                for listener in replica.task_listeners.get(task_id, ()):
                    listener.set()
            elif kind == "message" and channel == WAKE_CHANNEL:
                replica.wake.set()
            elif kind == "message" and channel == CANCEL_CHANNEL:
                replica.cancel_local(json.loads(data))
            elif kind == "message" and channel == SESSION_CHANNEL:
                info = json.loads(data)
                mine = replica.sessions.get(info["worker"])
                if mine is not None and mine.session_id != info["session"]:
                    mine.close("ABORTED", "a newer stream of this worker opened on another replica")
    finally:
        with contextlib.suppress(Exception):
            await pubsub.aclose()  # type: ignore[no-untyped-call]
        await asyncio.sleep(1.0)  # reconnect after a Redis restart
