"""The send loop of a session: the outbox's batches onto the stream, results made durable before they leave."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable

from maw_agent._messages import ConnectCall, SessionTerms
from maw_agent._outbox import Outbox
from maw_agent._spool import ResultSpool

log = logging.getLogger("maw_agent")


async def send_loop(
    call: ConnectCall,
    outbox: Outbox,
    spool: ResultSpool,
    terms: SessionTerms,
    *,
    flush_interval_s: float,
    stopped: Callable[[], bool],
    goodbye_sent: asyncio.Event,
) -> None:
    """Write the outbox to ``call`` until a write fails (the unsent rest goes back) or ``stopped()``."""
    while True:
        await outbox.ready.wait()
        if stopped():
            return
        if flush_interval_s and not outbox.full(terms.max_items):
            await asyncio.sleep(flush_interval_s)
        messages, has_results = outbox.take(terms.max_items, terms.max_bytes)
        if has_results:
            fd = spool.flush()
            if fd is not None:
                try:
                    await asyncio.to_thread(os.fsync, fd)
                except OSError as exc:
                    # Only when compaction replaced the file meanwhile; it fsynced every pending result.
                    log.debug("spool fsync: %s", exc)
        for index, message in enumerate(messages):
            try:
                await call.write(message)
            except Exception as exc:
                outbox.put_back(messages[index:])
                log.debug("write failed: %s", exc)
                return
            if message.HasField("goodbye"):
                goodbye_sent.set()
