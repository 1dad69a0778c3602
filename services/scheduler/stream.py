"""maw.agent.v1.AgentService: the agent's one bidirectional stream, translated for the engine."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc
from maw.agent.v1 import agent_service_pb2 as apb
from maw.agent.v1 import agent_service_pb2_grpc as apb_grpc

from services.runtime import MawError, invalid_argument, permission_denied, unavailable
from services.runtime.principal import PrincipalKind, current_principal

from .engine import Engine
from .session import Closed, Session

_log = logging.getLogger("maw.scheduler.stream")
PROTOCOL_VERSION = 1
MAX_SLOTS = 256


def _hello_problems(hello: apb.Hello) -> list[tuple[str, str]]:
    problems = []
    if not hello.worker.startswith("workers/") or len(hello.worker) > 80:
        problems.append(("hello.worker", "must be workers/{worker}"))
    if not 1 <= hello.capacity_slots <= MAX_SLOTS:
        problems.append(("hello.capacity_slots", f"must be 1-{MAX_SLOTS}"))
    if hello.protocol_version not in (0, PROTOCOL_VERSION):
        problems.append(("hello.protocol_version", f"this scheduler speaks version {PROTOCOL_VERSION}"))
    return problems


class AgentService(apb_grpc.AgentServiceServicer):
    """One session per stream; the engine does the work."""

    def __init__(self, engine: Engine, hello_timeout_s: float) -> None:
        self.engine = engine
        self.hello_timeout_s = hello_timeout_s

    async def Connect(
        self, request_iterator: AsyncIterator[apb.ConnectRequest], context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[apb.ConnectResponse]:
        if self.engine.draining:
            # Send the agent straight on to another replica rather than welcome it for a moment.
            raise unavailable("this scheduler replica is draining; reconnect to another", 0.2)
        try:
            first = await asyncio.wait_for(anext(request_iterator), self.hello_timeout_s)
        except TimeoutError:
            raise MawError(grpc.StatusCode.DEADLINE_EXCEEDED, "no Hello within the handshake deadline") from None
        except StopAsyncIteration:
            return
        if first.WhichOneof("message") != "hello":
            raise invalid_argument([("message", "the first message of a stream must be hello")])
        hello = first.hello
        problems = _hello_problems(hello)
        if problems:
            raise invalid_argument(problems)
        principal = current_principal()
        if principal.kind == PrincipalKind.AGENT and principal.name != hello.worker:
            raise permission_denied(f"this credential speaks for {principal.name}, not {hello.worker}", "WRONG_WORKER")
        if principal.kind not in (PrincipalKind.AGENT, PrincipalKind.ANONYMOUS):
            raise permission_denied("only agent credentials may open an agent stream", "NOT_AN_AGENT")
        session = Session(
            worker=hello.worker,
            capacity=hello.capacity_slots,
            tools={t.kind: t.local_only for t in hello.tools if t.kind},
            labels=dict(hello.labels),
            privacy_level=hello.privacy_level or 1,
            resources=hello.resources,
            hello=hello,
        )
        welcome = await self.engine.open_session(session, hello.held)
        _log.info(
            "agent connected",
            extra={
                "worker": session.worker,
                "session": session.session_id,
                "slots": session.capacity,
                "resumed": len(welcome.resumed),
            },  # fmt: skip
        )
        reader = asyncio.create_task(self._read(request_iterator, session))
        try:
            yield apb.ConnectResponse(welcome=welcome)
            while True:
                item = await session.outbox.get()
                if isinstance(item, Closed):
                    if item.code == "OK":
                        return
                    raise MawError(getattr(grpc.StatusCode, item.code), item.message)
                yield item
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader
            self.engine.close_session(session)
            _log.info("agent disconnected", extra={"worker": session.worker, "session": session.session_id})

    async def _read(self, requests: AsyncIterator[apb.ConnectRequest], session: Session) -> None:
        engine = self.engine
        try:
            async for message in requests:
                kind = message.WhichOneof("message")
                if kind == "heartbeat":
                    engine.heartbeat(session, message.heartbeat)
                elif kind == "accepted":
                    engine.accepted(session, message.accepted.leases)
                elif kind == "declined":
                    engine.declined(session, message.declined.assignments)
                elif kind == "progress":
                    engine.progress(session, message.progress.updates)
                elif kind == "log_chunks":
                    engine.log_chunks(session, message.log_chunks.chunks)
                elif kind == "results":
                    engine.results(session, message.results.results)
                elif kind == "goodbye":
                    engine.handed_back(session, message.goodbye.handed_back)
                    session.draining = True
                elif kind == "hello":
                    session.close("INVALID_ARGUMENT", "hello may only be the first message")
                    return
        except Exception as exc:  # the stream broke; the session ends
            _log.info("agent stream ended: %s", type(exc).__name__, extra={"worker": session.worker})
        session.close("OK", "")
