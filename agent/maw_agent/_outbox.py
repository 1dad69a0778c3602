"""What the agent has to say, batched: many items per message, in a fixed order per flush.

Items wait here until the sender flushes (every few milliseconds, or at once when a batch is full). A
flush yields control messages first (heartbeats, Goodbye), then Accepted, Declined, progress, log
chunks and results, each cut into messages of at most `max_items` items and about `max_bytes` bytes, so
a Result never overtakes its lease's Accepted or its last log chunk.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Sequence
from typing import TypeVar

from google.protobuf.message import Message
from maw.agent.v1 import agent_service_pb2 as agent_pb2

__all__ = ["Outbox"]

log = logging.getLogger(__name__)
_Item = TypeVar("_Item", bound=Message)
# Log chunks waiting while the stream is down are bounded; the oldest go first.
_MAX_BUFFERED_LOG_CHUNKS = 4096


class Outbox:
    """Items waiting for the sender."""

    def __init__(self) -> None:
        self.control: list[agent_pb2.ConnectRequest] = []
        self.accepted: list[agent_pb2.Lease] = []
        self.declined: list[agent_pb2.DeclinedAssignment] = []
        self.progress: list[agent_pb2.Progress] = []
        self.log_chunks: list[agent_pb2.LogChunk] = []
        self.results: list[agent_pb2.Result] = []
        self.ready = asyncio.Event()
        self._dropped_chunks = 0

    def __len__(self) -> int:
        return (
            len(self.control)
            + len(self.accepted)
            + len(self.declined)
            + len(self.progress)
            + len(self.log_chunks)
            + len(self.results)
        )

    def full(self, max_items: int) -> bool:
        """Whether some kind already fills a whole batch (flush without waiting)."""
        return bool(self.control) or any(
            len(items) >= max_items
            for items in (self.accepted, self.declined, self.progress, self.log_chunks, self.results)
        )

    def add_control(self, message: agent_pb2.ConnectRequest) -> None:
        self.control.append(message)
        self.ready.set()

    def add_accepted(self, lease: agent_pb2.Lease) -> None:
        self.accepted.append(lease)
        self.ready.set()

    def add_declined(self, declined: agent_pb2.DeclinedAssignment) -> None:
        self.declined.append(declined)
        self.ready.set()

    def add_progress(self, progress: agent_pb2.Progress) -> None:
        self.progress.append(progress)
        self.ready.set()

    def add_log_chunk(self, chunk: agent_pb2.LogChunk) -> None:
        self.log_chunks.append(chunk)
        if len(self.log_chunks) > _MAX_BUFFERED_LOG_CHUNKS:
            del self.log_chunks[0]
            self._dropped_chunks += 1
            if self._dropped_chunks in (1, 100, 10_000):
                log.warning("log chunks pile up while the stream is down; %d oldest dropped", self._dropped_chunks)
        self.ready.set()

    def add_result(self, result: agent_pb2.Result) -> None:
        self.results.append(result)
        self.ready.set()

    def new_session(self, pending_results: Iterable[agent_pb2.Result]) -> None:
        """Start a new stream: answers to the old stream's assignments are void (Hello lists what is held);
        every unacknowledged Result is sent again."""
        self.control.clear()
        self.accepted.clear()
        self.declined.clear()
        self.results = list(pending_results)
        if len(self):
            self.ready.set()

    def take(self, max_items: int, max_bytes: int) -> tuple[list[agent_pb2.ConnectRequest], bool]:
        """Everything waiting, as messages in send order; and whether any results are among them."""
        messages = list(self.control)
        messages.extend(
            agent_pb2.ConnectRequest(accepted=agent_pb2.Accepted(leases=leases))
            for leases in _chunks(self.accepted, max_items, max_bytes)
        )
        messages.extend(
            agent_pb2.ConnectRequest(declined=agent_pb2.Declined(assignments=declined))
            for declined in _chunks(self.declined, max_items, max_bytes)
        )
        messages.extend(
            agent_pb2.ConnectRequest(progress=agent_pb2.ProgressBatch(updates=updates))
            for updates in _chunks(self.progress, max_items, max_bytes)
        )
        messages.extend(
            agent_pb2.ConnectRequest(log_chunks=agent_pb2.LogChunkBatch(chunks=chunks))
            for chunks in _chunks(self.log_chunks, max_items, max_bytes)
        )
        has_results = bool(self.results)
        messages.extend(
            agent_pb2.ConnectRequest(results=agent_pb2.ResultBatch(results=results))
            for results in _chunks(self.results, max_items, max_bytes)
        )
        self.control, self.accepted, self.declined = [], [], []
        self.progress, self.log_chunks, self.results = [], [], []
        self.ready.clear()
        return messages, has_results

    def put_back(self, unsent: Sequence[agent_pb2.ConnectRequest]) -> None:
        """Return progress and log chunks of messages that never reached the wire (the stream broke).

        Results are not put back: the next stream sends every unacknowledged one from the spool.
        """
        progress: list[agent_pb2.Progress] = []
        chunks: list[agent_pb2.LogChunk] = []
        for message in unsent:
            kind = message.WhichOneof("message")
            if kind == "progress":
                progress.extend(message.progress.updates)
            elif kind == "log_chunks":
                chunks.extend(message.log_chunks.chunks)
        self.progress[:0] = progress
        self.log_chunks[:0] = chunks[-_MAX_BUFFERED_LOG_CHUNKS:]


def _chunks(items: list[_Item], max_items: int, max_bytes: int) -> Iterable[list[_Item]]:
    """Cut items into batches of at most max_items items and (unless one item alone is larger) max_bytes."""
    if not items:
        return
    if len(items) <= max_items and not _may_be_large(items[0]):
        yield items
        return
    batch: list[_Item] = []
    size = 0
    for item in items:
        item_size = item.ByteSize() + 8
        if batch and (len(batch) >= max_items or size + item_size > max_bytes):
            yield batch
            batch, size = [], 0
        batch.append(item)
        size += item_size
    if batch:
        yield batch


def _may_be_large(item: Message) -> bool:
    # Leases, declines and progress are small; chunks and results can be large and are measured.
    return isinstance(item, agent_pb2.LogChunk | agent_pb2.Result)
