"""One real mesh per test session: embedded PostgreSQL and Redis, the three services, Envoy.

Everything runs as real processes on free ports under a temporary data directory, so the suite can
run beside a developer's `make up`. DATABASE_URL / REDIS_URL, when set, are used instead of the
embedded servers, exactly as `make up` does.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest

from deploy.local import Endpoints, Stack
from tests.integration.clients import Metadata, ScriptedAgent, login


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The whole mesh, started once for the session and stopped at its end."""
    data_dir: Path = tmp_path_factory.mktemp("maw-stack")
    # Short heartbeats, leases and backoff so lease expiry and retries happen within a test's patience.
    timing = {
        "MAW_HEARTBEAT_INTERVAL_S": "0.5",
        "MAW_LEASE_TTL_S": "2",
        "MAW_RETRY_BACKOFF_BASE_S": "0.1",
        "MAW_UNSCHEDULABLE_CHECK_S": "0.5",
    }
    mesh = Stack(data_dir=data_dir, ports=Endpoints.random(), fast_unsafe_postgres=True, extra_env=timing)
    try:
        mesh.start_all()
        yield mesh
    finally:
        mesh.stop()


@pytest.fixture(scope="session")
async def channels(stack: Stack) -> AsyncIterator[dict[str, grpc.aio.Channel]]:
    """An asyncio channel to each service and to the gateway, keyed by name."""
    names = ["registry", "scheduler", "evaluator", "gateway"]
    opened = {name: grpc.aio.insecure_channel(f"127.0.0.1:{stack.ports.service(name)}") for name in names}
    yield opened
    for channel in opened.values():
        await channel.close()


# -- credentials (docs/security.md) --------------------------------------------------------------------------


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    """Call metadata that authenticates with ``token``."""
    return (("authorization", f"Bearer {token}"),)


async def _login(channel: grpc.aio.Channel, username: str, password: str) -> str:
    from maw.registry.v1 import auth_service_pb2, auth_service_pb2_grpc

    reply = await auth_service_pb2_grpc.AuthServiceStub(channel).Login(
        auth_service_pb2.LoginRequest(username=username, password=password), timeout=30
    )
    token: str = reply.tokens.access_token
    return token


async def _user_token(channels: dict[str, grpc.aio.Channel], admin: str, user_id: str, role: int) -> str:
    from maw.registry.v1 import resources_pb2, user_service_pb2, user_service_pb2_grpc

    password = f"{user_id}-password-long"
    await user_service_pb2_grpc.UserServiceStub(channels["registry"]).CreateUser(
        user_service_pb2.CreateUserRequest(
            user_id=user_id,
            user=resources_pb2.User(display_name=user_id, role=role),  # type: ignore[arg-type]
            password=password,
            request_id=f"fixture-{user_id}",
        ),
        metadata=bearer(admin),
        timeout=30,
    )
    return await _login(channels["registry"], user_id, password)


@pytest.fixture(scope="session")
async def admin_token(stack: Stack, channels: dict[str, grpc.aio.Channel]) -> str:
    """An access token of the first admin (user `admin`)."""
    return await _login(channels["registry"], "admin", stack.admin_password)


@pytest.fixture(scope="session")
async def operator_token(channels: dict[str, grpc.aio.Channel], admin_token: str) -> str:
    """An access token of a user with role operator."""
    return await _user_token(channels, admin_token, "fixture-operator", 2)


@pytest.fixture(scope="session")
async def viewer_token(channels: dict[str, grpc.aio.Channel], admin_token: str) -> str:
    """An access token of a user with role viewer."""
    return await _user_token(channels, admin_token, "fixture-viewer", 1)


@pytest.fixture(scope="module")
async def admin(stack: Stack, channels: dict[str, grpc.aio.Channel]) -> Metadata:
    """Call metadata of the first admin, signed in once per module."""
    return await login(channels["registry"], "admin", stack.admin_password)


@pytest.fixture
async def agents() -> AsyncIterator[list[ScriptedAgent]]:
    """The protocol-level agents a test starts (append them); each is stopped when the test ends."""
    started: list[ScriptedAgent] = []
    yield started
    for agent in started:
        await agent.stop()
