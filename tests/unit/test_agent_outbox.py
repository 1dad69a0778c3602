"""Outgoing items are batched: a fixed order per flush, bounded items and bytes per message."""

from __future__ import annotations

from maw.agent.v1 import agent_service_pb2 as pb
from maw_agent._outbox import Outbox


def lease(index: int) -> pb.Lease:
    return pb.Lease(subtask=f"tasks/t/subtasks/s{index}", attempt=1)


def test_a_flush_sends_control_then_accepted_declined_progress_logs_and_results() -> None:
    outbox = Outbox()
    outbox.add_result(pb.Result(lease=lease(1)))
    outbox.add_log_chunk(pb.LogChunk(lease=lease(1), sequence=1, data=b"x"))
    outbox.add_progress(pb.Progress(lease=lease(1), percent=5))
    outbox.add_declined(pb.DeclinedAssignment(lease=lease(2)))
    outbox.add_accepted(lease(1))
    outbox.add_control(pb.ConnectRequest(heartbeat=pb.Heartbeat(free_slots=1)))
    messages, has_results = outbox.take(max_items=100, max_bytes=1 << 20)
    kinds = [m.WhichOneof("message") for m in messages]
    assert kinds == ["heartbeat", "accepted", "declined", "progress", "log_chunks", "results"]
    assert has_results
    assert len(outbox) == 0 and not outbox.ready.is_set()


def test_batches_respect_max_items_and_max_bytes() -> None:
    outbox = Outbox()
    for index in range(1050):
        outbox.add_accepted(lease(index))
    for index in range(10):
        outbox.add_log_chunk(pb.LogChunk(lease=lease(index), sequence=1, data=b"x" * 60_000))
    assert outbox.full(max_items=500)
    messages, has_results = outbox.take(max_items=500, max_bytes=200_000)
    accepted = [len(m.accepted.leases) for m in messages if m.HasField("accepted")]
    chunks = [len(m.log_chunks.chunks) for m in messages if m.HasField("log_chunks")]
    assert accepted == [500, 500, 50]
    assert chunks == [3, 3, 3, 1]
    assert all(m.ByteSize() <= 200_000 for m in messages)
    assert not has_results


def test_a_new_session_drops_old_answers_and_requeues_every_unacked_result() -> None:
    outbox = Outbox()
    outbox.add_accepted(lease(1))
    outbox.add_log_chunk(pb.LogChunk(lease=lease(1), sequence=1))
    pending = [pb.Result(lease=lease(1)), pb.Result(lease=lease(2))]
    outbox.new_session(pending)
    messages, _ = outbox.take(max_items=10, max_bytes=1 << 20)
    assert [m.WhichOneof("message") for m in messages] == ["log_chunks", "results"]
    assert list(messages[1].results.results) == pending


def test_unsent_progress_and_logs_go_back_in_front() -> None:
    outbox = Outbox()
    outbox.add_log_chunk(pb.LogChunk(lease=lease(1), sequence=1))
    outbox.add_progress(pb.Progress(lease=lease(1), percent=1))
    messages, _ = outbox.take(max_items=10, max_bytes=1 << 20)
    outbox.add_log_chunk(pb.LogChunk(lease=lease(1), sequence=2))
    outbox.put_back(messages)
    again, _ = outbox.take(max_items=10, max_bytes=1 << 20)
    chunks = next(m for m in again if m.HasField("log_chunks")).log_chunks.chunks
    assert [c.sequence for c in chunks] == [1, 2]
    assert next(m for m in again if m.HasField("progress")).progress.updates[0].percent == 1
