"""The agent: one stream to the scheduler (AgentService.Connect) and slots that run what it assigns.

It keeps the rules of the protocol (protos/maw/agent/v1/agent_service.proto, header comment) on the agent's side.

`Agent(config).run()` connects, reconnects forever (exponential backoff with full jitter, reset after
a healthy session), and returns an exit code once `stop()` has finished its work: 0 after a graceful
stop (finish or hand back running work, deliver results, Goodbye), 130 after an immediate one.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import logging
import random
import time
from collections.abc import Callable, Iterable
from typing import IO

import grpc
from maw.agent.v1 import agent_service_pb2 as agent_pb2
from maw.agent.v1 import agent_service_pb2_grpc as agent_grpc
from maw.common.v1 import work_pb2

from maw_agent._backoff import Backoff
from maw_agent._execution import Execution, ExecutionSettings
from maw_agent._messages import (
    DEFAULT_HEARTBEAT_S,
    GOOD_DISPOSITIONS,
    PROTOCOL_VERSION,
    ConnectCall,
    SessionTerms,
    call_status,
    cancel_text,
    describe,
    duration_seconds,
    epoch_seconds,
    heartbeat,
    held_assignments,
    hello,
    open_channel,
    refusal,
)
from maw_agent._outbox import Outbox
from maw_agent._resources import ResourceSampler
from maw_agent._sandbox import ensure_sandbox, limits_of, sandbox_of
from maw_agent._sender import send_loop
from maw_agent._spool import LeaseKey, ResultSpool, lease_key
from maw_agent._workspace import Workspaces
from maw_agent.config import AgentConfig
from maw_agent.tools import ToolAdapter, ToolInfo, adapters, usable

__all__ = ["PROTOCOL_VERSION", "Agent", "SessionError"]

EXIT_IMMEDIATE = 130

log = logging.getLogger("maw_agent")

_WATCHDOG_TICK_S = 0.2
_GOODBYE_WAIT_S = 5.0
_HANDBACK_KILL_GRACE_S = 5.0


class SessionError(Exception):
    """A stream ended in a way that calls for a reconnect with backoff."""


@dataclasses.dataclass
class _SessionEnd:
    healthy: bool
    # Set after a Drain: reconnect after this delay instead of the backoff's.
    reconnect_after: float | None = None


class Agent:
    """The maw agent. Create, `await run()`; `stop()` (from a signal handler or a test) ends it."""

    def __init__(self, config: AgentConfig, *, tool_adapters: dict[str, ToolAdapter] | None = None) -> None:
        self.config = config
        self._credential = config.read_credential()
        self._adapters = tool_adapters if tool_adapters is not None else adapters(config.tools, config.tool_settings)
        self._by_kind: dict[int, tuple[ToolAdapter, ToolInfo]] = {}
        self._runs: dict[LeaseKey, Execution] = {}
        self._outbox = Outbox()
        self._backoff = Backoff(config.reconnect_initial_s, config.reconnect_max_s)
        self._settings = ExecutionSettings(
            work_root=config.work_dir / "workspaces",
            keep_workspaces=config.keep_workspaces,
            output_limit_bytes=config.output_limit_bytes,
            result_output_bytes=config.result_output_bytes,
            env_allowlist=tuple(config.env_allowlist),
            credential=self._credential,
            sandbox=sandbox_of(config),
            limits=limits_of(config),
            workspaces=Workspaces(config.work_dir / "git-cache", timeout_s=config.git_timeout_s),
            max_diff_bytes=config.max_diff_bytes,
        )
        self._spool: ResultSpool | None = None
        self._sampler: ResourceSampler | None = None
        self._lock_file: IO[str] | None = None
        # Per session.
        self._terms = SessionTerms(DEFAULT_HEARTBEAT_S, config.max_batch_items)
        self._drain: agent_pb2.Drain | None = None
        self._drain_event = asyncio.Event()
        self._stop_sending = False
        self._goodbye_sent = asyncio.Event()
        # Lifecycle.
        self._stopping = False
        self._immediate = False
        self._done = asyncio.Event()
        self._shutdown_task: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()
        self.exit_code = 0
        self.connected = asyncio.Event()
        self.session_id = ""
        self.sessions = 0

    # --- public ----------------------------------------------------------------------------------

    @property
    def running(self) -> int:
        """Assignments running now."""
        return len(self._runs)

    @property
    def pending_results(self) -> int:
        """Results waiting for their ResultAck."""
        return len(self._spool.pending) if self._spool is not None else 0

    def stop(self, *, immediate: bool = False) -> None:
        """Stop the agent: gracefully (the first call) or at once (`immediate`, or a second call)."""
        if immediate or self._stopping:
            if not self._immediate:
                log.warning("stopping immediately: killing %d running tool(s)", len(self._runs))
                self._immediate = True
                self.exit_code = EXIT_IMMEDIATE
                if self._shutdown_task is not None:
                    self._shutdown_task.cancel()
                self._shutdown_task = asyncio.create_task(self._shutdown_now())
            return
        self._stopping = True
        log.info("stopping: no new work; %d assignment(s) running", len(self._runs))
        self._shutdown_task = asyncio.create_task(self._shutdown())

    async def run(self) -> int:
        """Run until stopped; returns the process exit code."""
        await self._start()
        watchdog = asyncio.create_task(self._watchdog(), name="watchdog")
        try:
            while not self._done.is_set():
                try:
                    end = await self._session()
                except (SessionError, grpc.aio.AioRpcError, TimeoutError, OSError) as exc:
                    log.warning("stream to %s failed: %s", self.config.server, describe(exc))
                    end = _SessionEnd(healthy=False)
                finally:
                    self.connected.clear()
                if self._done.is_set():
                    break
                if end.reconnect_after is not None:
                    self._backoff.reset()
                    delay = end.reconnect_after
                else:
                    if end.healthy:
                        self._backoff.reset()
                    delay = self._backoff.next_delay()
                log.info("reconnecting in %.2f s", delay)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._done.wait(), timeout=delay)
        finally:
            watchdog.cancel()
            await self._teardown()
        return self.exit_code

    # --- start and stop --------------------------------------------------------------------------

    async def _start(self) -> None:
        await ensure_sandbox(self.config.sandbox)
        work_dir = self.config.work_dir
        work_dir.mkdir(parents=True, exist_ok=True)
        self._settings.work_root.mkdir(parents=True, exist_ok=True)
        self._lock_file = (work_dir / "agent.lock").open("w")
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.close()
            raise RuntimeError(f"another maw-agent already uses the work dir {work_dir}") from None
        self._spool = ResultSpool(work_dir / "spool" / "results.log", fsync=self.config.spool_fsync)
        if self._spool.pending:
            log.info("%d result(s) from an earlier run wait for their ack", len(self._spool.pending))
        self._sampler = ResourceSampler(work_dir)
        self._by_kind = await usable(self._adapters)

    async def _teardown(self) -> None:
        for execution in list(self._runs.values()):
            execution.kill_now()
        tasks = [execution.task for execution in self._runs.values() if execution.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=5)
        if self._shutdown_task is not None and not self._shutdown_task.done():
            self._shutdown_task.cancel()
        if self._spool is not None:
            self._spool.close()
        if self._lock_file is not None:
            self._lock_file.close()

    async def _shutdown(self) -> None:
        grace = self.config.shutdown_grace_s
        await self._wait_while(lambda: bool(self._runs), grace)
        handed_back = []
        for execution in list(self._runs.values()):
            handed_back.append(execution.assignment.lease)
            execution.stop(
                work_pb2.OUTCOME_CANCELLED,
                "agent shutting down: handed back",
                min(self.config.cancel_grace_s, _HANDBACK_KILL_GRACE_S),
                discard=True,
            )
        if handed_back:
            log.info("grace period of %g s over: handing back %d assignment(s)", grace, len(handed_back))
        await self._wait_while(lambda: bool(self._runs), _HANDBACK_KILL_GRACE_S + 5)
        # Deliver the results that finished, so the next start has nothing to resend.
        await self._wait_while(lambda: bool(self.pending_results), self.config.result_ack_wait_s)
        if self.connected.is_set() or handed_back:
            await self._say_goodbye(handed_back, agent_pb2.GOODBYE_REASON_SHUTDOWN, "agent stopped", _GOODBYE_WAIT_S)
        if self.pending_results:
            log.warning("%d result(s) not acknowledged; they are kept and sent at the next start", self.pending_results)
        self._done.set()

    async def _shutdown_now(self) -> None:
        handed_back = [execution.assignment.lease for execution in self._runs.values()]
        for execution in list(self._runs.values()):
            execution.discard = True
            execution.kill_now()
        await self._say_goodbye(handed_back, agent_pb2.GOODBYE_REASON_SHUTDOWN, "agent stopped at once", 1.0)
        self._done.set()

    async def _say_goodbye(
        self, handed_back: list[agent_pb2.Lease], reason: agent_pb2.GoodbyeReason.ValueType, message: str, wait: float
    ) -> None:
        if not self.connected.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.connected.wait(), timeout=wait)
        if not self.connected.is_set():
            log.warning("not connected: leaving without Goodbye")
            return
        self._goodbye_sent.clear()
        goodbye = agent_pb2.Goodbye(reason=reason, message=message, handed_back=handed_back)
        self._outbox.add_control(agent_pb2.ConnectRequest(goodbye=goodbye))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._goodbye_sent.wait(), timeout=wait)

    async def _wait_while(self, condition: Callable[[], bool], seconds: float) -> None:
        """Wait until ``condition()`` is false (checked whenever work changes), at most ``seconds``."""
        deadline = time.monotonic() + seconds
        while condition() and time.monotonic() < deadline:
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout=max(deadline - time.monotonic(), 0))

    def _notify(self) -> None:
        self._changed.set()

    # --- the stream ------------------------------------------------------------------------------

    async def _session(self) -> _SessionEnd:
        timeout = self.config.handshake_timeout_s
        async with open_channel(self.config) as channel:
            stub = agent_grpc.AgentServiceStub(channel)
            call = stub.Connect(metadata=(("authorization", f"Bearer {self._credential}"),))
            tasks: list[asyncio.Task[None]] = []
            try:
                await asyncio.wait_for(call.write(self._hello()), timeout)
                first = await asyncio.wait_for(call.read(), timeout)
                if first is grpc.aio.EOF:
                    raise SessionError(f"stream closed before Welcome: {await call_status(call)}")
                assert isinstance(first, agent_pb2.ConnectResponse)
                if first.WhichOneof("message") != "welcome":
                    raise SessionError(f"first message was {first.WhichOneof('message')}, not Welcome")
                self._welcome(first.welcome)
                started = time.monotonic()
                self.connected.set()
                reader = asyncio.create_task(self._read_loop(call), name="reader")
                sender = asyncio.create_task(self._send_loop(call), name="sender")
                tasks = [reader, sender, asyncio.create_task(self._heartbeat_loop(), name="heartbeat")]
                drained = asyncio.create_task(self._drain_event.wait())
                done = asyncio.create_task(self._done.wait())
                waits: set[asyncio.Future[object]] = {reader, sender, drained, done}  # type: ignore[arg-type]
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                drained.cancel()
                done.cancel()
                healthy = time.monotonic() - started >= self.config.healthy_session_s
                if self._drain_event.is_set() or self._done.is_set():
                    return await self._close_gracefully(call, reader, sender, healthy)
                if reader.done():
                    status = await call_status(call)
                    log.warning("scheduler closed the stream: %s", status)
                    return _SessionEnd(healthy=healthy)
                return _SessionEnd(healthy=healthy)
            finally:
                self.connected.clear()
                for task in tasks:
                    task.cancel()
                if tasks:
                    await asyncio.wait(tasks)
                call.cancel()

    async def _close_gracefully(
        self,
        call: ConnectCall,
        reader: asyncio.Task[None],
        sender: asyncio.Task[None],
        healthy: bool,
    ) -> _SessionEnd:
        """Drain or Goodbye: stop writing, half-close, read what is still coming until the deadline."""
        drain = self._drain
        self._stop_sending = True
        self._outbox.ready.set()
        limit = 1.0 if self._immediate else 5.0
        if drain is not None and drain.HasField("deadline"):
            limit = max(0.0, min(30.0, epoch_seconds(drain.deadline) - self._server_now()))
        await asyncio.wait({sender}, timeout=limit)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(call.done_writing(), timeout=max(limit, 0.1))
        await asyncio.wait({reader}, timeout=limit)
        if drain is None:
            return _SessionEnd(healthy=True)
        jitter = duration_seconds(drain.reconnect_jitter)
        log.info("drained (%s): reconnecting within %.2f s", agent_pb2.DrainReason.Name(drain.reason), jitter)
        return _SessionEnd(healthy=True, reconnect_after=random.uniform(0, jitter))  # noqa: S311 - jitter

    def _hello(self) -> agent_pb2.ConnectRequest:
        assert self._sampler is not None and self._spool is not None
        held = held_assignments(self._runs.values(), self._spool.pending.values())
        return hello(self.config, self._by_kind.values(), self._sampler.sample(), held, self.session_id)

    def _welcome(self, welcome: agent_pb2.Welcome) -> None:
        assert self._spool is not None
        self.sessions += 1
        self.session_id = welcome.session_id
        self._drain = None
        self._drain_event.clear()
        self._stop_sending = False
        self._terms = SessionTerms.welcomed(welcome, self.config, self._terms.clock_skew)
        resumed = {lease_key(grant.lease) for grant in welcome.resumed}
        for grant in welcome.resumed:
            self._granted(grant)
        for lease in welcome.released:
            self._release(lease)
        unanswered = [key for key in self._runs if key not in resumed and not self._runs[key].discard]
        if unanswered:
            log.warning("Welcome did not answer for %d held assignment(s); they keep running", len(unanswered))
        self._outbox.new_session(self._spool.pending.values())
        log.info(
            "connected to %s as %s (session %s, heartbeat %.1f s, %d resumed, %d released)",
            welcome.scheduler_replica or self.config.server,
            welcome.worker or self.config.worker,
            welcome.session_id,
            self._terms.heartbeat_s,
            len(welcome.resumed),
            len(welcome.released),
        )

    def _granted(self, grant: agent_pb2.LeaseGrant) -> None:
        """The scheduler (re)grants a lease: take its attempt deadline."""
        execution = self._runs.get(lease_key(grant.lease))
        if execution is not None and grant.HasField("attempt_deadline"):
            execution.attempt_deadline = epoch_seconds(grant.attempt_deadline)

    def _release(self, lease: agent_pb2.Lease) -> None:
        """The scheduler no longer grants this lease: stop the tool and discard its result."""
        assert self._spool is not None
        execution = self._runs.get(lease_key(lease))
        if execution is not None:
            execution.stop(
                work_pb2.OUTCOME_CANCELLED, "lease released by the scheduler", self.config.cancel_grace_s, discard=True
            )
        self._spool.forget(lease)

    async def _read_loop(self, call: ConnectCall) -> None:
        while True:
            message = await call.read()
            if message is grpc.aio.EOF:
                return
            assert isinstance(message, agent_pb2.ConnectResponse)
            self._dispatch(message)

    def _dispatch(self, message: agent_pb2.ConnectResponse) -> None:
        kind = message.WhichOneof("message")
        if kind == "assignments":
            for assignment in message.assignments.assignments:
                self._assign(assignment)
        elif kind == "result_acks":
            self._acks(message.result_acks.acks)
        elif kind == "cancels":
            for cancel in message.cancels.cancels:
                self._cancel(cancel)
        elif kind == "heartbeat_ack":
            for grant in message.heartbeat_ack.leases:
                self._granted(grant)
        elif kind == "drain":
            log.info("scheduler asks to drain: %s", message.drain.message or message.drain.reason)
            self._drain = message.drain
            self._drain_event.set()
        else:
            log.warning("ignoring an unexpected %s message", kind)

    async def _send_loop(self, call: ConnectCall) -> None:
        assert self._spool is not None
        await send_loop(
            call,
            self._outbox,
            self._spool,
            self._terms,
            flush_interval_s=self.config.flush_interval_ms / 1000,
            stopped=lambda: self._stop_sending,
            goodbye_sent=self._goodbye_sent,
        )

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self._terms.heartbeat_s)
            if not self._stop_sending:
                self._outbox.add_control(agent_pb2.ConnectRequest(heartbeat=self._heartbeat()))

    def _heartbeat(self) -> agent_pb2.Heartbeat:
        assert self._sampler is not None
        return heartbeat(self._runs.values(), self._sampler.sample(), self._free_slots())

    def _free_slots(self) -> int:
        return max(0, self.config.capacity_slots - len(self._runs))

    # --- assignments -----------------------------------------------------------------------------

    def _assign(self, assignment: agent_pb2.Assignment) -> None:
        assert self._spool is not None
        key = lease_key(assignment.lease)
        if key in self._runs:
            if not self._runs[key].discard:
                self._outbox.add_accepted(assignment.lease)
            return
        if key in self._spool.pending:
            return  # finished already; its Result is on its way
        found = self._by_kind.get(assignment.tool.kind)
        refused = refusal(
            assignment,
            stopping=self._stopping,
            tool_offered=found is not None,
            free_slots=self.config.capacity_slots - len(self._runs),
        )
        if refused is not None:
            self._decline(assignment, *refused)
            return
        assert found is not None
        adapter, info = found
        execution = Execution(
            assignment=assignment,
            adapter=adapter,
            tool_version=info.version,
            settings=self._settings,
            emit_chunk=self._outbox.add_log_chunk,
            emit_progress=self._outbox.add_progress,
        )
        reason = adapter.check(execution.options)
        if reason is not None:
            self._decline(assignment, agent_pb2.DECLINE_REASON_UNSUPPORTED, reason)
            return
        self._runs[key] = execution
        self._outbox.add_accepted(assignment.lease)
        execution.task = asyncio.create_task(self._execute(execution))

    def _decline(
        self, assignment: agent_pb2.Assignment, reason: agent_pb2.DeclineReason.ValueType, message: str
    ) -> None:
        log.info("declining %s#%d: %s", assignment.lease.subtask, assignment.lease.attempt, message)
        self._outbox.add_declined(agent_pb2.DeclinedAssignment(lease=assignment.lease, reason=reason, message=message))

    async def _execute(self, execution: Execution) -> None:
        assert self._spool is not None
        try:
            result = await execution.execute()
        finally:
            self._runs.pop(execution.key, None)
            self._notify()
        if execution.discard:
            log.info("discarded %s#%d (%s)", *execution.key, execution.stop_message)
            return
        self._spool.add(result)
        self._outbox.add_result(result)

    def _cancel(self, cancel: agent_pb2.Cancel) -> None:
        execution = self._runs.get(lease_key(cancel.lease))
        if execution is None:
            return
        grace = duration_seconds(cancel.grace_period) or self.config.cancel_grace_s
        message = cancel_text(cancel)
        log.info("%s#%d %s", *execution.key, message)
        execution.stop(work_pb2.OUTCOME_CANCELLED, message, grace)

    def _acks(self, acks: Iterable[agent_pb2.ResultAck]) -> None:
        assert self._spool is not None
        for ack in acks:
            self._spool.forget(ack.lease)
            if ack.disposition not in GOOD_DISPOSITIONS:
                log.warning(
                    "result for %s#%d refused (%s): %s",
                    ack.lease.subtask,
                    ack.lease.attempt,
                    agent_pb2.ResultDisposition.Name(ack.disposition),
                    ack.message,
                )
        self._spool.maybe_compact()
        self._notify()

    async def _watchdog(self) -> None:
        """Enforce the attempt deadline and the no-progress limit of every running assignment."""
        while True:
            await asyncio.sleep(_WATCHDOG_TICK_S)
            now = time.time()
            for execution in list(self._runs.values()):
                why = execution.overdue(now, self._terms.clock_skew)
                if why is not None:
                    execution.stop(work_pb2.OUTCOME_TIMED_OUT, why, self.config.cancel_grace_s)

    def _server_now(self) -> float:
        return time.time() + self._terms.clock_skew
