"""Every RPC of every service × every kind of caller: the auth interceptor lets in exactly whom authz allows.

The RPC list comes from the generated descriptors (services.runtime.authz.all_methods), so a new RPC is
walked here the day it is added. Each call sends an empty request with a short deadline; "allowed" means the
answer is anything but UNAUTHENTICATED or PERMISSION_DENIED (the servicer may well refuse the empty request,
or not be implemented yet: both happen after authentication and authorisation).
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import grpc
import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor
from maw.registry.v1 import (
    auth_service_pb2,
    auth_service_pb2_grpc,
    enrollment_service_pb2,
    enrollment_service_pb2_grpc,
    resources_pb2,
)

from deploy.local import Stack
from services.runtime import authz
from services.runtime.auth import JwtCodec
from services.runtime.config import ServiceSettings
from services.runtime.contracts import services_in
from services.runtime.principal import Principal, PrincipalKind
from tests.integration.conftest import bearer

DENIED = {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED}
SERVICE_OF_PACKAGE = {
    "maw.registry.v1": "registry",
    "maw.scheduler.v1": "scheduler",
    "maw.agent.v1": "scheduler",
    "maw.evaluator.v1": "evaluator",
}
KINDS = ["none", "viewer", "operator", "admin", "agent", "service", "revoked", "expired", "tampered"]


@dataclass(frozen=True)
class Caller:
    """One kind of caller: the credential it sends and the principal authz should see (None: rejected)."""

    credential: str
    principal: Principal | None


def _methods() -> list[tuple[str, str, MethodDescriptor]]:
    found = []
    for package in authz.MAW_PACKAGES:
        for contract in services_in(package):
            for method in contract.descriptor.methods:
                found.append((SERVICE_OF_PACKAGE[package], f"{contract.full_name}/{method.name}", method))
    return found


def _empty_request(method: MethodDescriptor) -> bytes:
    data: bytes = message_factory.GetMessageClass(method.input_type)().SerializeToString()
    return data


async def _code(channel: grpc.aio.Channel, path: str, method: MethodDescriptor, credential: str) -> grpc.StatusCode:
    metadata = bearer(credential) if credential else ()
    identity = lambda b: b  # noqa: E731 - raw bytes in and out
    request = _empty_request(method)
    try:
        if not method.client_streaming and not method.server_streaming:
            await channel.unary_unary(f"/{path}", request_serializer=identity, response_deserializer=identity)(
                request, metadata=metadata, timeout=5
            )
        elif not method.client_streaming:
            call = channel.unary_stream(f"/{path}", request_serializer=identity, response_deserializer=identity)(
                request, metadata=metadata, timeout=1.5
            )
            await call.read()
            call.cancel()
        else:

            async def nothing() -> AsyncIterator[bytes]:
                await asyncio.sleep(3)
                return
                yield b""  # an async generator that sends no message

            stream = channel.stream_stream(f"/{path}", request_serializer=identity, response_deserializer=identity)(
                nothing(), metadata=metadata, timeout=1.5
            )
            await stream.read()
            stream.cancel()
    except grpc.aio.AioRpcError as err:
        return err.code()
    return grpc.StatusCode.OK


def _tamper(token: str) -> str:
    header, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["role"] = "admin"
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).decode().rstrip("=")
    return f"{header}.{forged}.{signature}"


@pytest.fixture(scope="module")
async def callers(
    stack: Stack,
    channels: dict[str, grpc.aio.Channel],
    admin_token: str,
    operator_token: str,
    viewer_token: str,
) -> dict[str, Caller]:
    auth = auth_service_pb2_grpc.AuthServiceStub(channels["registry"])
    created = await auth.CreateApiToken(
        auth_service_pb2.CreateApiTokenRequest(
            api_token=resources_pb2.ApiToken(display_name="to revoke", role=resources_pb2.ROLE_VIEWER)
        ),
        metadata=bearer(admin_token),
        timeout=10,
    )
    await auth.RevokeApiToken(
        auth_service_pb2.RevokeApiTokenRequest(name=created.api_token.name), metadata=bearer(admin_token), timeout=10
    )
    enroll = enrollment_service_pb2_grpc.EnrollmentServiceStub(channels["registry"])
    expiry = datetime.now(UTC) + timedelta(hours=1)
    spec = resources_pb2.EnrollmentToken(display_name="matrix", max_uses=1)
    spec.expire_time.FromDatetime(expiry)
    token = await enroll.CreateEnrollmentToken(
        enrollment_service_pb2.CreateEnrollmentTokenRequest(enrollment_token=spec),
        metadata=bearer(admin_token),
        timeout=10,
    )
    agent = await enroll.EnrollAgent(
        enrollment_service_pb2.EnrollAgentRequest(token=token.secret, worker_id="matrix-agent", hostname="matrix"),
        timeout=10,
    )
    private, public = stack.jwt_keys()
    codec = JwtCodec.from_settings(
        ServiceSettings(jwt_private_key_file=str(private), jwt_public_key_file=str(public)), signer=True
    )
    expired, _ = codec.issue("users/admin", "admin", "expired-session", -120)
    user = PrincipalKind.USER
    return {
        "none": Caller("", None),
        "viewer": Caller(viewer_token, Principal(user, "users/fixture-viewer", "viewer")),
        "operator": Caller(operator_token, Principal(user, "users/fixture-operator", "operator")),
        "admin": Caller(admin_token, Principal(user, "users/admin", "admin")),
        "agent": Caller(agent.agent_credential, Principal(PrincipalKind.AGENT, "workers/matrix-agent")),
        "service": Caller(
            stack.service_credential("scheduler"), Principal(PrincipalKind.SERVICE, "services/scheduler")
        ),
        "revoked": Caller(created.secret, None),
        "expired": Caller(expired, None),
        "tampered": Caller(_tamper(viewer_token), None),
    }


def test_the_matrix_covers_every_rpc_of_every_service() -> None:
    walked = {path for _, path, _ in _methods()}
    assert walked == set(authz.all_methods())
    assert len(walked) > 60


@pytest.mark.parametrize("kind", KINDS)
async def test_each_rpc_admits_exactly_the_callers_authz_allows(
    channels: dict[str, grpc.aio.Channel], callers: dict[str, Caller], kind: str
) -> None:
    caller = callers[kind]
    methods = _methods()
    codes = await asyncio.gather(
        *(_code(channels[service], path, method, caller.credential) for service, path, method in methods)
    )
    wrong = []
    for (_, path, _), code in zip(methods, codes, strict=True):
        rule = authz.rule_for(path)
        assert rule is not None, f"{path} has no authz rule"
        if rule.public:
            expected = "allowed"
        elif caller.principal is None:
            expected = "UNAUTHENTICATED"
        else:
            expected = "allowed" if rule.allows(caller.principal) else "PERMISSION_DENIED"
        got = "allowed" if code not in DENIED else code.name
        if got != expected:
            wrong.append(f"{path}: expected {expected}, got {code.name}")
        if path.startswith("maw.registry.") and code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
            wrong.append(f"{path}: an empty request crashed the registry ({code.name})")
    assert wrong == []


async def test_agents_may_call_nothing_but_the_agent_stream(callers: dict[str, Caller]) -> None:
    agent = callers["agent"].principal
    assert agent is not None
    allowed = [
        path for _, path, _ in _methods() if (rule := authz.rule_for(path)) and not rule.public and rule.allows(agent)
    ]
    assert allowed == ["maw.agent.v1.AgentService/Connect"]
