"""The gRPC server bootstrap every maw service uses.

A service declares a :class:`ServiceDefinition` (its name, port, proto packages, migrations and a
function that builds its servicers); :func:`run_service` does the rest the same way for all of them:
settings, logging, tracing, migrations, PostgreSQL and Redis, interceptors, health reporting per
service, server reflection, message-size limits, keepalive, and a graceful stop on SIGTERM/SIGINT.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_delay, wait_exponential_jitter

from . import cache, db, migrate
from .auth import Authenticator, AuthInterceptor
from .config import ServiceSettings
from .contracts import ContractService, services_in
from .interceptors import ErrorInterceptor
from .logs import configure_logging
from .telemetry import configure_tracing, tracing_interceptor

_log = logging.getLogger("maw.server")


@dataclass
class Resources:
    """What a running service shares with its servicers."""

    settings: ServiceSettings
    engine: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]
    redis: Redis
    health: health.aio.HealthServicer
    auth: Authenticator
    on_stop: list[Callable[[], Awaitable[None]]] = field(default_factory=list)


Builder = Callable[[Resources], Awaitable[Mapping[str, object]]]


async def _no_servicers(_: Resources) -> Mapping[str, object]:
    return {}


@dataclass(frozen=True)
class ServiceDefinition:
    """How one service is served: everything :func:`run_service` needs to know about it."""

    name: str
    default_port: int
    proto_packages: tuple[str, ...]
    migrations: Path | None = None
    build: Builder = _no_servicers

    @property
    def schema(self) -> str:
        """The PostgreSQL schema this service owns."""
        return self.name


def _unimplemented_servicer(contract: ContractService) -> object:
    """An instance whose every RPC answers UNIMPLEMENTED (async, as grpc.aio requires)."""

    def make(rpc: str) -> Callable[..., Awaitable[None]]:
        async def method(self: object, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{contract.full_name}/{rpc} is not implemented yet")

        return method

    methods = {m.name: make(m.name) for m in contract.descriptor.methods}
    cls = type(f"Unimplemented{contract.descriptor.name}", (contract.servicer_base,), methods)
    return cls()


def server_options(settings: ServiceSettings) -> list[tuple[str, int]]:
    """Channel arguments shared by all services: size limits and keepalive for long-lived streams."""
    return [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.so_reuseport", 0),
    ]


class _Service:
    def __init__(self, definition: ServiceDefinition, settings: ServiceSettings) -> None:
        self.definition = definition
        self.settings = settings
        self.contracts = [c for pkg in definition.proto_packages for c in services_in(pkg)]
        self.health = health.aio.HealthServicer()
        self.stopping = asyncio.Event()
        self.port = 0

    async def _set_health(self, status: int) -> None:
        for name in ["", *(c.full_name for c in self.contracts)]:
            await self.health.set(name, status)

    async def _migrate(self) -> None:
        if self.definition.migrations is None or not self.settings.migrate_on_start:
            return
        async for attempt in AsyncRetrying(
            stop=stop_after_delay(60),
            wait=wait_exponential_jitter(initial=0.2, max=3),
            retry=retry_if_exception_type(Exception),
            reraise=True,
        ):
            with attempt:
                await asyncio.to_thread(
                    migrate.upgrade, self.definition.migrations, self.settings.database_url, self.definition.schema
                )
        _log.info("migrations applied", extra={"schema": self.definition.schema})

    async def _watch_dependencies(self, resources: Resources) -> None:
        healthy: bool | None = None
        while not self.stopping.is_set():
            try:
                await asyncio.wait_for(db.ping(resources.engine), timeout=5)
                await asyncio.wait_for(cache.ping(resources.redis), timeout=5)
                now = True
            except Exception as exc:  # any failure of a dependency makes us NOT_SERVING
                now = False
                if healthy is not False:
                    _log.warning("dependency check failed: %s", type(exc).__name__)
            if now != healthy and not self.stopping.is_set():
                await self._set_health(
                    health_pb2.HealthCheckResponse.SERVING if now else health_pb2.HealthCheckResponse.NOT_SERVING
                )
                healthy = now
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), timeout=self.settings.dependency_check_interval_s)

    async def run(self) -> None:
        settings = self.settings
        provider = configure_tracing(self.definition.name, settings.otlp_endpoint)
        await self._migrate()
        engine = db.create_engine(settings.database_url, self.definition.schema, settings.db_pool_size)
        redis = cache.create_redis(settings.redis_url)
        authenticator = Authenticator(self.definition.name, settings, redis)
        resources = Resources(settings, engine, db.session_factory(engine), redis, self.health, authenticator)
        implemented = await self.definition.build(resources)
        await authenticator.start()

        server = grpc.aio.server(
            # Errors wrap auth, so auth's refusals become statuses with details like any other error.
            interceptors=[tracing_interceptor(provider), ErrorInterceptor(), AuthInterceptor(authenticator)],
            options=server_options(settings),
        )
        for contract in self.contracts:
            servicer = implemented.get(contract.full_name) or _unimplemented_servicer(contract)
            contract.add_to_server(servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            [c.full_name for c in self.contracts] + [health.SERVICE_NAME, reflection.SERVICE_NAME], server
        )
        # Nothing is SERVING until the first dependency check passes.
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        port = settings.port or self.definition.default_port
        self.port = server.add_insecure_port(f"{settings.host}:{port}")
        await server.start()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        watcher = asyncio.create_task(self._watch_dependencies(resources))
        _log.info(
            "serving",
            extra={"service": self.definition.name, "address": f"{settings.host}:{self.port}"},
        )
        await self.stopping.wait()

        _log.info("stopping", extra={"grace_s": settings.shutdown_grace_s})
        await self.health.enter_graceful_shutdown()
        for hook in reversed(resources.on_stop):
            await hook()
        await server.stop(settings.shutdown_grace_s)
        await watcher
        await authenticator.stop()
        await redis.aclose()
        await engine.dispose()
        provider.shutdown()
        _log.info("stopped")


def run_service(definition: ServiceDefinition, settings: ServiceSettings | None = None) -> None:
    """Serve ``definition`` until SIGTERM/SIGINT; the process entry point of each service."""
    settings = settings or ServiceSettings()
    configure_logging(definition.name, settings.log_level, settings.log_format)
    asyncio.run(_Service(definition, settings).run())
