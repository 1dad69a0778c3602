"""Starting, stopping and surviving: `make up`'s supervisor, SIGTERM, dependencies that go away."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import psutil
import psycopg
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from deploy.local import Endpoints, Stack, free_port
from deploy.local._procs import Child

ROOT = Path(__file__).resolve().parents[2]
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _eventually(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def _status(port: int) -> int | None:
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
            status: int = reply.status
            return status
    except grpc.RpcError:
        return None


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _local_agent_slots(data_dir: Path, ports: dict[str, int]) -> int:
    from maw.registry.v1 import auth_service_pb2, auth_service_pb2_grpc
    from maw.scheduler.v1 import stats_service_pb2, stats_service_pb2_grpc

    password = (data_dir / "secrets" / "admin-password").read_text().strip()
    with grpc.insecure_channel(f"127.0.0.1:{ports['registry']}") as registry:
        login = auth_service_pb2_grpc.AuthServiceStub(registry).Login(
            auth_service_pb2.LoginRequest(username="admin", password=password), timeout=5
        )
    with grpc.insecure_channel(f"127.0.0.1:{ports['scheduler']}") as scheduler:
        stats = stats_service_pb2_grpc.StatsServiceStub(scheduler).GetStats(
            stats_service_pb2.GetStatsRequest(),
            metadata=(("authorization", f"Bearer {login.tokens.access_token}"),),
            timeout=5,
        )
    slots: int = stats.total_slots
    return slots


def _start_up(data_dir: Path) -> tuple[subprocess.Popen[bytes], dict[str, object]]:
    (data_dir / "up.json").unlink(missing_ok=True)
    proc = subprocess.Popen(
        [sys.executable, "-m", "deploy.local", "up", "--random-ports", "--data-dir", str(data_dir)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=(data_dir / "up.out").open("ab"),
        start_new_session=True,
    )
    _eventually(lambda: (data_dir / "up.json").exists() or proc.poll() is not None, 120, "make up to start")
    assert proc.poll() is None, (data_dir / "up.out").read_text()[-3000:]
    state: dict[str, object] = json.loads((data_dir / "up.json").read_text())
    return proc, state


def _ctrl_c(proc: subprocess.Popen[bytes]) -> int:
    proc.send_signal(signal.SIGINT)
    return proc.wait(timeout=60)


@pytest.mark.slow
def test_ctrl_c_stops_every_process_and_the_next_start_finds_the_data(tmp_path: Path) -> None:
    proc, state = _start_up(tmp_path)
    try:
        pids: dict[str, int] = state["pids"]  # type: ignore[assignment]
        ports: dict[str, int] = state["ports"]  # type: ignore[assignment]
        assert set(pids) == {"postgres", "redis", "registry", "scheduler", "evaluator", "dashboard", "envoy", "agent"}
        descendants = {p.pid for p in psutil.Process(proc.pid).children(recursive=True)}
        assert set(pids.values()) <= descendants
        for name in ("registry", "scheduler", "evaluator", "gateway"):
            assert _status(ports[name]) == SERVING, name
        _eventually(lambda: _local_agent_slots(tmp_path, ports) == 2, 30, "the local agent to connect")
        with psycopg.connect(str(state["database_url"]), autocommit=True) as conn:
            conn.execute("CREATE TABLE public.survives_restart (note text)")
            conn.execute("INSERT INTO public.survives_restart VALUES ('still here')")
    finally:
        code = _ctrl_c(proc)
    assert code == 0, (tmp_path / "up.out").read_text()[-3000:]
    leftovers = [pid for pid in descendants if not _gone(pid)]
    assert leftovers == []

    proc, state = _start_up(tmp_path)
    try:
        with psycopg.connect(str(state["database_url"])) as conn:
            row = conn.execute("SELECT note FROM public.survives_restart").fetchone()
        assert row == ("still here",)
    finally:
        assert _ctrl_c(proc) == 0


@pytest.mark.slow
def test_kill_9_of_the_supervisor_leaves_no_orphan(tmp_path: Path) -> None:
    proc, state = _start_up(tmp_path)
    pids: dict[str, int] = state["pids"]  # type: ignore[assignment]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    _eventually(lambda: all(_gone(pid) for pid in pids.values()), 30, "children to die with the supervisor")


@pytest.fixture
def small_stack(tmp_path: Path) -> Iterator[Stack]:
    """PostgreSQL, Redis and the registry alone, with a fast dependency check."""
    mesh = Stack(
        data_dir=tmp_path,
        ports=Endpoints.random(),
        fast_unsafe_postgres=True,
        extra_env={"MAW_DEPENDENCY_CHECK_INTERVAL_S": "0.2"},
    )
    mesh.database_url = mesh.redis_url = ""  # this test restarts them, so never an operator's servers
    try:
        mesh.start_postgres()
        mesh.start_redis()
        mesh.start_service("registry")
        yield mesh
    finally:
        mesh.stop()


def _restart(mesh: Stack, name: str, start: Callable[[], str]) -> None:
    mesh.children.pop(name).kill()
    if name == "redis":
        mesh.redis_url = ""
    else:
        mesh.database_url = ""
    _eventually(lambda: _status(mesh.ports.registry) == NOT_SERVING, 30, f"NOT_SERVING without {name}")
    start()
    _eventually(lambda: _status(mesh.ports.registry) == SERVING, 60, f"SERVING once {name} is back")


@pytest.mark.slow
def test_health_follows_redis_going_away_and_coming_back(small_stack: Stack) -> None:
    _restart(small_stack, "redis", small_stack.start_redis)
    assert small_stack.children["registry"].alive()


@pytest.mark.slow
def test_health_follows_postgres_going_away_and_coming_back(small_stack: Stack) -> None:
    _restart(small_stack, "postgres", small_stack.start_postgres)
    assert small_stack.children["registry"].alive()


@pytest.mark.slow
def test_sigterm_stops_a_service_gracefully(stack: Stack, tmp_path: Path) -> None:
    port = free_port()
    env = stack.service_env("evaluator") | {"MAW_PORT": str(port), "MAW_LOG_FORMAT": "json"}
    child = Child("evaluator-extra", [sys.executable, "-m", "services.evaluator"], tmp_path / "e.log", env, cwd=ROOT)
    try:
        _eventually(lambda: _status(port) == SERVING, 60, "the extra evaluator to serve")
        child.signal(signal.SIGTERM)
        assert child.proc.wait(timeout=20) == 0
    finally:
        child.stop()
    messages = [json.loads(line)["message"] for line in (tmp_path / "e.log").read_text().splitlines()]
    assert messages[-2:] == ["stopping", "stopped"] or messages[-1] == "stopped"
