"""The agent's side of AgentService.Connect, against a scheduler stand-in that follows the proto's rules.

The stand-in (FakeScheduler below) is a real grpc.aio server on a free port: it checks the bearer
credential, answers Hello with Welcome, and lets each test push assignments, acks, cancels and drains,
drop the stream, and look at everything the agent sent. The agent is the real one, in process.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2, struct_pb2, timestamp_pb2
from maw.agent.v1 import agent_service_pb2 as pb
from maw.agent.v1 import agent_service_pb2_grpc as pb_grpc
from maw.common.v1 import machine_pb2, work_pb2
from maw_agent import Agent, AgentConfig

CREDENTIAL = "maw_agt_test-credential-0123456789"
WORKER = "workers/w-test"


@dataclass
class Stream:
    """One Connect stream as the stand-in sees it."""

    hello: pb.Hello
    metadata: dict[str, str]
    welcome: pb.Welcome
    received: list[pb.ConnectRequest] = field(default_factory=list)
    outgoing: asyncio.Queue[pb.ConnectResponse] = field(default_factory=asyncio.Queue)
    ending: asyncio.Future[tuple[grpc.StatusCode, str]] = field(default_factory=asyncio.Future)
    half_closed: asyncio.Event = field(default_factory=asyncio.Event)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def items(self, kind: str) -> list[Any]:
        """Every item of one kind the agent sent on this stream, in order."""
        found: list[Any] = []
        for message in self.received:
            if message.WhichOneof("message") != kind:
                continue
            if kind == "accepted":
                found.extend(message.accepted.leases)
            elif kind == "declined":
                found.extend(message.declined.assignments)
            elif kind == "results":
                found.extend(message.results.results)
            elif kind == "log_chunks":
                found.extend(message.log_chunks.chunks)
            elif kind == "progress":
                found.extend(message.progress.updates)
            else:
                found.append(getattr(message, kind))
        return found

    async def until(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        """Wait until predicate() holds for what the agent sent."""
        deadline = time.monotonic() + timeout
        while not predicate():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError("timed out waiting for the agent")
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), timeout=min(remaining, 0.1))

    def send(self, **message: Any) -> None:
        self.outgoing.put_nowait(pb.ConnectResponse(**message))

    def ack(self, results: list[pb.Result]) -> None:
        self.send(
            result_acks=pb.ResultAckBatch(
                acks=[pb.ResultAck(lease=r.lease, disposition=pb.RESULT_DISPOSITION_ACCEPTED) for r in results]
            )
        )

    def end(self, code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE, details: str = "stand-in dropped it") -> None:
        if not self.ending.done():
            self.ending.set_result((code, details))


class FakeScheduler(pb_grpc.AgentServiceServicer):
    """Plays the scheduler's part of the protocol, driven by the test."""

    def __init__(self) -> None:
        self.streams: list[Stream] = []
        self.attempts = 0
        self.new_stream = asyncio.Event()
        self.heartbeat_interval = 5.0
        self.max_batch_items = 500
        self.welcome_extra: Callable[[pb.Hello], dict[str, Any]] = lambda hello: {}
        self.hellos_unanswered = 0

    async def Connect(self, request_iterator: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:  # type: ignore[override]
        self.attempts += 1
        metadata = {key: str(value) for key, value in (context.invocation_metadata() or ())}
        if metadata.get("authorization") != f"Bearer {CREDENTIAL}":
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "unknown credential")
        first = await asyncio.wait_for(context.read(), timeout=10)
        assert isinstance(first, pb.ConnectRequest) and first.HasField("hello"), first
        if self.hellos_unanswered:
            self.hellos_unanswered -= 1
            await asyncio.sleep(30)  # never welcomes: the agent's handshake deadline must end this
        welcome = pb.Welcome(
            session_id=f"s{len(self.streams) + 1}",
            worker=first.hello.worker,
            heartbeat_interval=_duration(self.heartbeat_interval),
            lease_ttl=_duration(self.heartbeat_interval * 3),
            max_batch_items=self.max_batch_items,
            **self.welcome_extra(first.hello),
        )
        welcome.server_time.GetCurrentTime()
        stream = Stream(hello=first.hello, metadata=metadata, welcome=welcome)
        await context.write(pb.ConnectResponse(welcome=welcome))
        self.streams.append(stream)
        self.new_stream.set()

        async def read() -> None:
            while True:
                message = await context.read()
                if message is grpc.aio.EOF:
                    stream.half_closed.set()
                    stream.changed.set()
                    return
                assert isinstance(message, pb.ConnectRequest)
                stream.received.append(message)
                stream.changed.set()

        async def write() -> None:
            while True:
                await context.write(await stream.outgoing.get())

        tasks = [asyncio.create_task(read()), asyncio.create_task(write())]
        try:
            either: set[asyncio.Future[Any]] = {tasks[0], stream.ending}
            await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
            if stream.ending.done():
                code, details = stream.ending.result()
                if code != grpc.StatusCode.OK:
                    await context.abort(code, details)
            else:
                # The agent half-closed: let queued answers out, then end the stream.
                while not stream.outgoing.empty():
                    await asyncio.sleep(0.01)
        finally:
            for task in tasks:
                task.cancel()

    async def next_stream(self, after: int, timeout: float = 10.0) -> Stream:
        """The stream opened after `after` streams existed."""
        deadline = time.monotonic() + timeout
        while len(self.streams) <= after:
            if time.monotonic() > deadline:
                raise AssertionError(f"no stream #{after + 1} (attempts: {self.attempts})")
            self.new_stream.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.new_stream.wait(), timeout=0.1)
        return self.streams[after]


@pytest.fixture
async def scheduler() -> AsyncIterator[tuple[FakeScheduler, int]]:
    server = grpc.aio.server()
    fake = FakeScheduler()
    pb_grpc.add_AgentServiceServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield fake, port
    await server.stop(grace=None)


def agent_config(port: int, work_dir: Path, **extra: Any) -> AgentConfig:
    data: dict[str, Any] = {
        "server": f"127.0.0.1:{port}",
        "credential": CREDENTIAL,
        "worker": WORKER,
        "labels": {"pool": "test"},
        "capacity_slots": 4,
        "tools": ["shell", "test"],
        "work_dir": str(work_dir),
        "reconnect_initial_s": 0.05,
        "reconnect_max_s": 0.2,
        "healthy_session_s": 0.0,
        "cancel_grace_s": 2.0,
        "shutdown_grace_s": 5.0,
        "spool_fsync": False,
    }
    data.update(extra)
    return AgentConfig.model_validate(data)


@pytest.fixture
async def running(
    scheduler: tuple[FakeScheduler, int], tmp_path: Path
) -> AsyncIterator[Callable[..., asyncio.Future[tuple[Agent, asyncio.Task[int]]]]]:
    """Starts agents against the stand-in; stops whatever is still running at the end."""
    started: list[tuple[Agent, asyncio.Task[int]]] = []

    async def start(**extra: Any) -> tuple[Agent, asyncio.Task[int]]:
        agent = Agent(agent_config(scheduler[1], tmp_path / "agent", **extra))
        task = asyncio.create_task(agent.run())
        started.append((agent, task))
        return agent, task

    yield start  # type: ignore[misc]
    for agent, task in started:
        if not task.done():
            agent.stop(immediate=True)
            await asyncio.wait_for(task, timeout=10)


def assignment(subtask: str, kind: int = machine_pb2.TOOL_KIND_TEST, attempt: int = 1, **options: Any) -> pb.Assignment:
    tool_options = struct_pb2.Struct()
    tool_options.update(options)
    return pb.Assignment(
        lease=pb.Lease(subtask=f"tasks/t1/subtasks/{subtask}", attempt=attempt),
        tool=machine_pb2.ToolChoice(kind=kind),  # type: ignore[arg-type]
        tool_options=tool_options,
    )


def _duration(seconds: float) -> duration_pb2.Duration:
    value = duration_pb2.Duration()
    value.FromNanoseconds(int(seconds * 1e9))
    return value


def _in(seconds: float) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(int((time.time() + seconds) * 1e9))
    return stamp


def _alive(pid: int) -> bool:
    """Whether a process runs (a zombie that init has not reaped yet does not)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status


def by_subtask(results: list[pb.Result]) -> dict[str, pb.Result]:
    return {r.lease.subtask.rsplit("/", 1)[1]: r for r in results}


async def test_hello_introduces_the_worker_with_tools_resources_and_the_bearer_credential(
    scheduler: tuple[FakeScheduler, int], running: Any
) -> None:
    fake, _ = scheduler
    agent, _task = await running(capacity_slots=3, privacy_level="sensitive")
    stream = await fake.next_stream(0)
    hello = stream.hello
    assert stream.metadata["authorization"] == f"Bearer {CREDENTIAL}"
    assert hello.worker == WORKER
    assert hello.protocol_version == 1
    assert hello.agent_version
    assert hello.hostname
    assert hello.platform.startswith(sys.platform + "/")
    assert {t.kind for t in hello.tools} == {machine_pb2.TOOL_KIND_SHELL, machine_pb2.TOOL_KIND_TEST}
    assert all(t.version for t in hello.tools)
    assert dict(hello.labels) == {"pool": "test"}
    assert hello.capacity_slots == 3
    assert hello.privacy_level == work_pb2.PRIVACY_LEVEL_SENSITIVE
    assert hello.resources.cpu_count > 0
    assert hello.resources.memory_total_bytes > 0
    assert hello.resources.disk_total_bytes > 0
    assert not hello.held
    await asyncio.wait_for(agent.connected.wait(), 5)
    assert agent.session_id == "s1"


async def test_noop_assignments_are_accepted_run_and_answered_with_batched_results(
    scheduler: tuple[FakeScheduler, int], running: Any
) -> None:
    fake, _ = scheduler
    agent, _task = await running(capacity_slots=200)
    stream = await fake.next_stream(0)
    stream.send(assignments=pb.AssignmentBatch(assignments=[assignment(f"n{i}") for i in range(200)]))
    await stream.until(lambda: len(stream.items("results")) == 200)
    results = stream.items("results")
    assert len(stream.items("accepted")) == 200
    assert {r.outcome for r in results} == {work_pb2.OUTCOME_SUCCEEDED}
    assert {r.tool.kind for r in results} == {machine_pb2.TOOL_KIND_TEST}
    # Batching: 400 items travel in far fewer messages.
    assert len(stream.received) <= 20, len(stream.received)
    # Every Accepted precedes its Result on the wire.
    order = [m.WhichOneof("message") for m in stream.received]
    assert order.index("accepted") < order.index("results")
    assert agent.pending_results == 200
    stream.ack(results)
    await asyncio.sleep(0.2)
    assert agent.pending_results == 0
    assert agent.running == 0


async def test_assignments_the_agent_cannot_start_are_declined_with_the_reason(
    scheduler: tuple[FakeScheduler, int], running: Any
) -> None:
    fake, _ = scheduler
    await running(capacity_slots=1)
    stream = await fake.next_stream(0)
    stream.send(
        assignments=pb.AssignmentBatch(
            assignments=[
                assignment("busy", hang=True),
                assignment("no-slot"),
                assignment("ollama", kind=machine_pb2.TOOL_KIND_OLLAMA),
            ]
        )
    )
    await stream.until(lambda: len(stream.items("declined")) == 2)
    stream.send(cancels=pb.CancelBatch(cancels=[pb.Cancel(lease=assignment("busy").lease)]))
    await stream.until(lambda: len(stream.items("results")) == 1)
    stream.send(
        assignments=pb.AssignmentBatch(
            assignments=[assignment("bad-option", bogus=1), assignment("no-command", kind=machine_pb2.TOOL_KIND_SHELL)]
        )
    )
    await stream.until(lambda: len(stream.items("declined")) == 4)
    reasons = {d.lease.subtask.rsplit("/", 1)[1]: d.reason for d in stream.items("declined")}
    assert reasons == {
        "no-slot": pb.DECLINE_REASON_NO_FREE_SLOT,
        "ollama": pb.DECLINE_REASON_TOOL_UNAVAILABLE,
        "bad-option": pb.DECLINE_REASON_UNSUPPORTED,
        "no-command": pb.DECLINE_REASON_UNSUPPORTED,
    }
    assert [lease.subtask.rsplit("/", 1)[1] for lease in stream.items("accepted")] == ["busy"]


async def test_shell_output_becomes_ordered_log_chunks_and_the_exit_code_the_outcome(
    scheduler: tuple[FakeScheduler, int], running: Any
) -> None:
    fake, _ = scheduler
    await running()
    stream = await fake.next_stream(0)
    stream.send(
        assignments=pb.AssignmentBatch(
            assignments=[
                assignment("ok", kind=machine_pb2.TOOL_KIND_SHELL, command="echo out; echo err >&2"),
                assignment("fails", kind=machine_pb2.TOOL_KIND_SHELL, command="echo failing; exit 3"),
            ]
        )
    )
    await stream.until(lambda: len(stream.items("results")) == 2)
    results = by_subtask(stream.items("results"))
    assert results["ok"].outcome == work_pb2.OUTCOME_SUCCEEDED
    assert results["ok"].exit_code == 0
    assert results["fails"].outcome == work_pb2.OUTCOME_FAILED
    assert results["fails"].exit_code == 3
    assert "failing" in results["fails"].output
    chunks = [c for c in stream.items("log_chunks") if c.lease.subtask.endswith("/ok")]
    assert [c.sequence for c in chunks] == list(range(1, len(chunks) + 1))
    streams = {c.stream: c.data for c in chunks}
    assert streams[work_pb2.LOG_STREAM_STDOUT] == b"out\n"
    assert streams[work_pb2.LOG_STREAM_STDERR] == b"err\n"


async def test_cancel_terms_then_kills_the_process_group_and_reports_cancelled(
    scheduler: tuple[FakeScheduler, int], running: Any, tmp_path: Path
) -> None:
    fake, _ = scheduler
    await running()
    stream = await fake.next_stream(0)
    pids = tmp_path / "pids"
    # Both the shell and its child ignore SIGTERM, so only SIGKILL after the grace period ends them.
    command = f"trap '' TERM; sleep 60 & echo $$ $! > {pids}; wait"
    stream.send(
        assignments=pb.AssignmentBatch(assignments=[assignment("c", kind=machine_pb2.TOOL_KIND_SHELL, command=command)])
    )
    await stream.until(lambda: pids.exists() and len(pids.read_text().split()) == 2)
    shell_pid, child_pid = (int(p) for p in pids.read_text().split())
    started = time.monotonic()
    stream.send(
        cancels=pb.CancelBatch(
            cancels=[
                pb.Cancel(
                    lease=pb.Lease(subtask="tasks/t1/subtasks/c", attempt=1),
                    reason=pb.CANCEL_REASON_TASK_CANCELLED,
                    grace_period=_duration(0.3),
                )
            ]
        )
    )
    await stream.until(lambda: len(stream.items("results")) == 1)
    elapsed = time.monotonic() - started
    result = stream.items("results")[0]
    assert result.outcome == work_pb2.OUTCOME_CANCELLED
    assert "TASK_CANCELLED" in result.error_message
    assert 0.3 <= elapsed < 2.0, elapsed
    assert not _alive(shell_pid)
    assert not _alive(child_pid)
    notes = b"".join(c.data for c in stream.items("log_chunks") if c.stream == work_pb2.LOG_STREAM_AGENT)
    assert b"SIGTERM" in notes and b"SIGKILL" in notes


async def test_attempt_deadline_and_silence_limit_kill_the_tool_as_timed_out(
    scheduler: tuple[FakeScheduler, int], running: Any
) -> None:
    fake, _ = scheduler
    await running()
    stream = await fake.next_stream(0)
    late = assignment("late", hang=True)
    late.attempt_deadline.CopyFrom(_in(0.4))
    silent = assignment("silent", kind=machine_pb2.TOOL_KIND_SHELL, command="sleep 30")
    silent.time_limits.no_progress.CopyFrom(_duration(0.4))
    stream.send(assignments=pb.AssignmentBatch(assignments=[late, silent]))
    started = time.monotonic()
    await stream.until(lambda: len(stream.items("results")) == 2)
    assert time.monotonic() - started < 3.0
    results = by_subtask(stream.items("results"))
    assert results["late"].outcome == work_pb2.OUTCOME_TIMED_OUT
    assert "deadline" in results["late"].error_message
    assert results["silent"].outcome == work_pb2.OUTCOME_TIMED_OUT
    assert "no output" in results["silent"].error_message


async def test_heartbeats_report_resources_and_each_running_tool(
    scheduler: tuple[FakeScheduler, int], running: Any
) -> None:
    fake, _ = scheduler
    fake.heartbeat_interval = 0.2
    await running(capacity_slots=2)
    stream = await fake.next_stream(0)
    stream.send(assignments=pb.AssignmentBatch(assignments=[assignment("hb", echo="hello", hang=True)]))
    await stream.until(lambda: any(h.running for h in stream.items("heartbeat")), timeout=5)
    beat = next(h for h in stream.items("heartbeat") if h.running)
    assert beat.free_slots == 1
    assert beat.resources.memory_total_bytes > 0
    assert beat.resources.HasField("sample_time")
    running_one = beat.running[0]
    assert running_one.lease.subtask == "tasks/t1/subtasks/hb"
    assert running_one.process_alive
    assert running_one.last_output_time.seconds > 0


async def test_a_dropped_stream_reconnects_and_resends_the_unacknowledged_result(
    scheduler: tuple[FakeScheduler, int], running: Any
) -> None:
    fake, _ = scheduler
    agent, _task = await running()
    first = await fake.next_stream(0)
    first.send(assignments=pb.AssignmentBatch(assignments=[assignment("r1", echo="done")]))
    await first.until(lambda: len(first.items("results")) == 1)
    sent = first.items("results")[0]
    first.end(grpc.StatusCode.UNAVAILABLE)  # dropped before the ack
    second = await fake.next_stream(1)
    assert second.hello.previous_session_id == "s1"
    assert [(h.lease.subtask, h.state) for h in second.hello.held] == [("tasks/t1/subtasks/r1", pb.HELD_STATE_FINISHED)]
    await second.until(lambda: len(second.items("results")) == 1)
    assert second.items("results")[0] == sent
    second.ack([sent])
    await asyncio.sleep(0.2)
    assert agent.pending_results == 0


async def test_work_running_across_a_reconnect_is_resumed_not_rerun(
    scheduler: tuple[FakeScheduler, int], running: Any
) -> None:
    fake, _ = scheduler
    fake.welcome_extra = lambda hello: {
        "resumed": [pb.LeaseGrant(lease=h.lease) for h in hello.held if h.state == pb.HELD_STATE_RUNNING]
    }
    await running()
    first = await fake.next_stream(0)
    first.send(assignments=pb.AssignmentBatch(assignments=[assignment("long", sleep_s=0.8)]))
    await first.until(lambda: len(first.items("accepted")) == 1)
    first.end()
    second = await fake.next_stream(1)
    assert [(h.lease.subtask, h.state) for h in second.hello.held] == [
        ("tasks/t1/subtasks/long", pb.HELD_STATE_RUNNING)
    ]
    held_start = second.hello.held[0].start_time
    await second.until(lambda: len(second.items("results")) == 1)
    result = second.items("results")[0]
    assert result.outcome == work_pb2.OUTCOME_SUCCEEDED
    assert result.start_time == held_start  # the same run, not a new one
    assert not second.items("accepted")


async def test_leases_released_in_welcome_stop_their_tools_and_send_no_result(
    scheduler: tuple[FakeScheduler, int], running: Any
) -> None:
    fake, _ = scheduler
    fake.welcome_extra = lambda hello: {"released": [h.lease for h in hello.held]}
    agent, _task = await running()
    first = await fake.next_stream(0)
    first.send(assignments=pb.AssignmentBatch(assignments=[assignment("gone", hang=True)]))
    await first.until(lambda: len(first.items("accepted")) == 1)
    first.end()
    second = await fake.next_stream(1)
    assert len(second.hello.held) == 1
    deadline = time.monotonic() + 5
    while agent.running and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert agent.running == 0
    await asyncio.sleep(0.3)
    assert not second.items("results")
    assert agent.pending_results == 0


async def test_drain_half_closes_the_stream_and_reconnects_while_work_continues(
    scheduler: tuple[FakeScheduler, int], running: Any
) -> None:
    fake, _ = scheduler
    fake.welcome_extra = lambda hello: {"resumed": [pb.LeaseGrant(lease=h.lease) for h in hello.held]}
    await running()
    first = await fake.next_stream(0)
    first.send(assignments=pb.AssignmentBatch(assignments=[assignment("d", sleep_s=1.0)]))
    await first.until(lambda: len(first.items("accepted")) == 1)
    first.send(drain=pb.Drain(reason=pb.DRAIN_REASON_SHUTDOWN, deadline=_in(3), reconnect_jitter=_duration(0.2)))
    await asyncio.wait_for(first.half_closed.wait(), 3)
    second = await fake.next_stream(1)
    assert [h.state for h in second.hello.held] == [pb.HELD_STATE_RUNNING]
    await second.until(lambda: len(second.items("results")) == 1)
    assert second.items("results")[0].outcome == work_pb2.OUTCOME_SUCCEEDED
    assert not first.items("results")


async def test_graceful_stop_declines_new_work_finishes_running_work_then_says_goodbye(
    scheduler: tuple[FakeScheduler, int], running: Any
) -> None:
    fake, _ = scheduler
    agent, task = await running()
    stream = await fake.next_stream(0)
    stream.send(assignments=pb.AssignmentBatch(assignments=[assignment("finish", sleep_s=0.5)]))
    await stream.until(lambda: len(stream.items("accepted")) == 1)
    agent.stop()
    stream.send(assignments=pb.AssignmentBatch(assignments=[assignment("late")]))
    await stream.until(lambda: len(stream.items("declined")) == 1)
    assert stream.items("declined")[0].reason == pb.DECLINE_REASON_SHUTTING_DOWN
    await stream.until(lambda: len(stream.items("results")) == 1)
    stream.ack(stream.items("results"))
    assert await asyncio.wait_for(task, 10) == 0
    goodbyes = stream.items("goodbye")
    assert len(goodbyes) == 1 and not goodbyes[0].handed_back
    assert stream.received[-1].HasField("goodbye")
    assert stream.half_closed.is_set()


async def test_graceful_stop_hands_back_work_that_outlasts_the_grace_period(
    scheduler: tuple[FakeScheduler, int], running: Any
) -> None:
    fake, _ = scheduler
    agent, task = await running(shutdown_grace_s=0.3)
    stream = await fake.next_stream(0)
    stream.send(
        assignments=pb.AssignmentBatch(
            assignments=[assignment("stuck", kind=machine_pb2.TOOL_KIND_SHELL, command="sleep 60")]
        )
    )
    await stream.until(lambda: len(stream.items("accepted")) == 1)
    started = time.monotonic()
    agent.stop()
    assert await asyncio.wait_for(task, 15) == 0
    assert time.monotonic() - started < 3
    goodbye = stream.items("goodbye")[0]
    assert [lease.subtask for lease in goodbye.handed_back] == ["tasks/t1/subtasks/stuck"]
    assert goodbye.reason == pb.GOODBYE_REASON_SHUTDOWN
    assert not stream.items("results")


async def test_a_second_stop_is_immediate(scheduler: tuple[FakeScheduler, int], running: Any) -> None:
    fake, _ = scheduler
    agent, task = await running(shutdown_grace_s=60)
    stream = await fake.next_stream(0)
    stream.send(assignments=pb.AssignmentBatch(assignments=[assignment("h", hang=True)]))
    await stream.until(lambda: len(stream.items("accepted")) == 1)
    agent.stop()
    await asyncio.sleep(0.1)
    agent.stop()
    started = time.monotonic()
    assert await asyncio.wait_for(task, 5) == 130
    assert time.monotonic() - started < 2.5


async def test_results_unacknowledged_at_exit_are_sent_again_by_the_next_agent_process(
    scheduler: tuple[FakeScheduler, int], running: Any
) -> None:
    fake, _ = scheduler
    agent, task = await running(result_ack_wait_s=0.3)
    first = await fake.next_stream(0)
    first.send(assignments=pb.AssignmentBatch(assignments=[assignment("kept", echo="x")]))
    await first.until(lambda: len(first.items("results")) == 1)
    agent.stop()  # the stand-in never acks
    assert await asyncio.wait_for(task, 15) == 0
    _again, _task2 = await running()
    second = await fake.next_stream(1)
    assert [(h.lease.subtask, h.state) for h in second.hello.held] == [
        ("tasks/t1/subtasks/kept", pb.HELD_STATE_FINISHED)
    ]
    await second.until(lambda: len(second.items("results")) == 1)
    assert second.items("results")[0] == first.items("results")[0]


async def test_an_unknown_credential_is_retried_with_backoff_until_stopped(
    scheduler: tuple[FakeScheduler, int], tmp_path: Path
) -> None:
    fake, port = scheduler
    config = agent_config(port, tmp_path / "a", credential="maw_agt_wrong-credential-000000")
    agent = Agent(config)
    task = asyncio.create_task(agent.run())
    await asyncio.sleep(1.0)
    assert fake.attempts >= 3
    assert not fake.streams
    agent.stop()
    assert await asyncio.wait_for(task, 10) == 0


async def test_a_scheduler_that_never_welcomes_is_left_at_the_handshake_deadline(
    scheduler: tuple[FakeScheduler, int], running: Any
) -> None:
    fake, _ = scheduler
    fake.hellos_unanswered = 1
    started = time.monotonic()
    agent, _task = await running(handshake_timeout_s=0.3)
    await fake.next_stream(0, timeout=5)
    assert fake.attempts == 2
    assert 0.3 <= time.monotonic() - started < 2
    await asyncio.wait_for(agent.connected.wait(), 2)


async def test_cli_runs_until_sigterm_then_exits_zero_without_logging_the_credential(
    scheduler: tuple[FakeScheduler, int], tmp_path: Path
) -> None:
    fake, port = scheduler
    config = tmp_path / "agent.yaml"
    config.write_text(
        "server: 127.0.0.1:${MAW_TEST_PORT}\n"
        "credential: ${MAW_TEST_CREDENTIAL}\n"
        f"worker: {WORKER}\n"
        "tools: [test]\n"
        f"work_dir: {tmp_path / 'cli'}\n"
        "log_level: DEBUG\n"
        f"log_file: {tmp_path / 'logs' / 'agent.log'}\n"
    )
    env = {**os.environ, "MAW_TEST_PORT": str(port), "MAW_TEST_CREDENTIAL": CREDENTIAL}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "maw_agent", "run", "--config", str(config), env=env, stderr=subprocess.PIPE
    )
    stream = await fake.next_stream(0, timeout=20)
    stream.send(assignments=pb.AssignmentBatch(assignments=[assignment("cli", echo="from cli")]))
    await stream.until(lambda: len(stream.items("results")) == 1)
    stream.ack(stream.items("results"))
    await asyncio.sleep(0.1)
    process.send_signal(signal.SIGTERM)
    _, stderr = await asyncio.wait_for(process.communicate(), 20)
    assert process.returncode == 0, stderr.decode()
    assert stream.items("goodbye")
    assert CREDENTIAL.encode() not in stderr
    assert b"connected to" in stderr
    logged = (tmp_path / "logs" / "agent.log").read_bytes()
    assert b"connected to" in logged and CREDENTIAL.encode() not in logged
