"""Checking the opaque credentials only the registry knows: the interface and its remote implementation."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from datetime import UTC
from typing import Any, Protocol

import grpc
from maw.registry.v1 import (
    credential_intake_service_pb2,
    credential_intake_service_pb2_grpc,
    resources_pb2,
    worker_intake_service_pb2,
    worker_intake_service_pb2_grpc,
)

from ..config import ServiceSettings
from ..errors import permission_denied, unauthenticated, unavailable
from ..internal import internal_channel
from ..principal import Principal, PrincipalKind
from .credentials import Authenticated, AuthMethod

_log = logging.getLogger("maw.auth")


class CredentialVerifier(Protocol):
    """Checks the opaque credentials only the registry can check."""

    async def api_token(self, secret: str) -> Authenticated:
        """The user an API token acts for; raises UNAUTHENTICATED when it is not valid."""
        ...

    async def agent(self, secret: str) -> Authenticated:
        """The worker an agent credential belongs to; UNAUTHENTICATED / PERMISSION_DENIED when not valid."""
        ...


# Role numbers to the role names principals carry ("viewer", "operator", "admin").
ROLE_NAMES = {
    value.number: value.name.removeprefix("ROLE_").lower()
    for value in resources_pb2.Role.DESCRIPTOR.values
    if value.number != resources_pb2.ROLE_UNSPECIFIED
}


class RemoteVerifier:
    """Asks the registry (internal RPCs with this service's credential)."""

    def __init__(self, settings: ServiceSettings) -> None:
        self._settings = settings
        self._channel: grpc.aio.Channel | None = None

    def _open(self) -> grpc.aio.Channel:
        if self._channel is None:
            self._channel = internal_channel(self._settings, self._settings.registry_addr)
        return self._channel

    async def _call(self, call: Callable[[], Awaitable[Any]]) -> Any:
        try:
            return await call()
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
                raise unauthenticated(exc.details() or "invalid credential", "CREDENTIAL_INVALID") from exc
            if exc.code() == grpc.StatusCode.PERMISSION_DENIED:
                raise permission_denied(exc.details() or "credential refused", "CREDENTIAL_REVOKED") from exc
            _log.warning("registry could not check a credential: %s", exc.code().name)
            raise unavailable("the registry cannot check credentials right now", 1.0) from exc

    async def api_token(self, secret: str) -> Authenticated:
        stub = credential_intake_service_pb2_grpc.CredentialIntakeServiceStub(self._open())
        request = credential_intake_service_pb2.AuthenticateApiTokenRequest(secret=secret)
        reply = await self._call(lambda: stub.AuthenticateApiToken(request, timeout=5))
        expire = reply.expire_time.ToDatetime(tzinfo=UTC) if reply.HasField("expire_time") else None
        principal = Principal(PrincipalKind.USER, reply.user, ROLE_NAMES.get(reply.role, ""), reply.api_token)
        return Authenticated(principal, AuthMethod.API_TOKEN, expire, reply.api_token)

    async def agent(self, secret: str) -> Authenticated:
        stub = worker_intake_service_pb2_grpc.WorkerIntakeServiceStub(self._open())
        request = worker_intake_service_pb2.AuthenticateAgentRequest(agent_credential=secret)
        reply = await self._call(lambda: stub.AuthenticateAgent(request, timeout=5))
        name = reply.worker.name
        return Authenticated(Principal(PrincipalKind.AGENT, name, "", name), AuthMethod.AGENT_CREDENTIAL)

    async def close(self) -> None:
        """Close the channel to the registry."""
        if self._channel is not None:
            await self._channel.close()
