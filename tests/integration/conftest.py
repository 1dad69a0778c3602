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


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The whole mesh, started once for the session and stopped at its end."""
    data_dir: Path = tmp_path_factory.mktemp("maw-stack")
    mesh = Stack(data_dir=data_dir, ports=Endpoints.random(), fast_unsafe_postgres=True)
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
