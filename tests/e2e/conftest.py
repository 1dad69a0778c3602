"""End-to-end fixtures: a mesh with two scheduler replicas, real maw-agent processes."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest

from deploy.local import Endpoints, Stack, free_port
from deploy.local._procs import Child
from tests.integration.clients import Metadata, enroll, login

ROOT = Path(__file__).resolve().parents[2]
TIMING = {
    "MAW_HEARTBEAT_INTERVAL_S": "0.5",
    "MAW_LEASE_TTL_S": "2",
    "MAW_RETRY_BACKOFF_BASE_S": "0.1",
    "MAW_UNSCHEDULABLE_CHECK_S": "0.5",
    "MAW_DRAIN_TIMEOUT_S": "2",
}


class Mesh:
    """The stack plus helpers to add scheduler replicas and agents as real processes."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.extra: list[Child] = []
        self.agents: list[Child] = []

    def add_scheduler(self, name: str) -> tuple[Child, int]:
        """Another scheduler replica on its own port, sharing PostgreSQL and Redis."""
        port = free_port()
        env = self.stack.service_env("scheduler") | {"MAW_PORT": str(port), "MAW_REPLICA_ID": name}
        child = Child(
            name, [sys.executable, "-m", "services.scheduler"], self.stack.log_dir / f"{name}.log", env, cwd=ROOT
        )
        self.extra.append(child)
        self.stack.children[name] = child
        self.stack.wait_serving(name, port)
        return child, port

    async def agent(
        self, registry: grpc.aio.Channel, admin: Metadata, name: str, server_port: int, tools: list[str], slots: int = 4
    ) -> Child:
        """Enroll a worker and start a real maw-agent process for it."""
        kinds = {"test": 6, "shell": 5}
        worker, credential = await enroll(registry, admin, name, [kinds[t] for t in tools])  # type: ignore[misc]
        cred = self.stack.data_dir / f"{name}.credential"
        cred.write_text(credential)
        cred.chmod(0o600)
        argv = [
            sys.executable, "-m", "maw_agent", "run", "--server", f"127.0.0.1:{server_port}", "--worker", worker,
            "--credential-file", str(cred), "--capacity-slots", str(slots),
            "--work-dir", str(self.stack.data_dir / name),
        ]  # fmt: skip
        for tool in tools:
            argv += ["--tool", tool]
        child = Child(name, argv, self.stack.log_dir / f"{name}.log", cwd=ROOT)
        self.agents.append(child)
        return child

    async def wait_slots(self, admin: Metadata, port: int, slots: int) -> None:
        """Wait until the scheduler replica on ``port`` holds streams with ``slots`` slots in all."""
        from maw.scheduler.v1 import stats_service_pb2, stats_service_pb2_grpc

        from tests.integration.clients import eventually

        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stats = stats_service_pb2_grpc.StatsServiceStub(channel)

            async def connected() -> bool:
                got = await stats.GetStats(stats_service_pb2.GetStatsRequest(), metadata=admin, timeout=5)
                return bool(got.total_slots >= slots)

            await eventually(connected, 30, f"agents with {slots} slots to connect")

    def stop_agents(self) -> None:
        for child in self.agents:
            child.stop()
        self.agents.clear()

    def stop(self) -> None:
        self.stop_agents()
        for child in self.extra:
            child.stop()


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    """PostgreSQL, Redis, registry and one scheduler replica; tests add replicas and agents."""
    stack = Stack(
        data_dir=tmp_path_factory.mktemp("e2e"), ports=Endpoints.random(), fast_unsafe_postgres=True, extra_env=TIMING
    )
    mesh = Mesh(stack)
    try:
        stack.start_postgres()
        stack.start_redis()
        stack.start_service("registry")
        stack.start_service("scheduler")
        yield mesh
    finally:
        mesh.stop()
        stack.stop()


@pytest.fixture(scope="module")
async def registry(mesh: Mesh) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{mesh.stack.ports.registry}") as channel:
        yield channel


@pytest.fixture(scope="module")
async def admin(mesh: Mesh, registry: grpc.aio.Channel) -> Metadata:
    return await login(registry, "admin", mesh.stack.admin_password)


@pytest.fixture(autouse=True)
def fresh_agents(mesh: Mesh) -> Iterator[None]:
    """Each test starts the agents it needs; none outlives it."""
    yield
    mesh.stop_agents()
