"""The mesh a benchmark runs on: its own PostgreSQL (fsync on), Redis, the three services and real agents."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType

import grpc
from maw.common.v1 import machine_pb2
from maw.scheduler.v1 import stats_service_pb2, stats_service_pb2_grpc

from deploy.local import Endpoints, Stack
from tests.integration.clients import Metadata, enroll, login

__all__ = ["AGENT_TOOLS", "ROOT", "BenchMesh", "Proc"]

ROOT = Path(__file__).resolve().parents[1]
# Every agent offers both paths: the in-process TEST no-op and the SHELL tool's real subprocess.
AGENT_TOOLS = {"test": machine_pb2.TOOL_KIND_TEST, "shell": machine_pb2.TOOL_KIND_SHELL}
_SETPRIV = shutil.which("setpriv")


class Proc:
    """A child of the benchmark in its own process group, killed with the benchmark if it dies first."""

    def __init__(self, name: str, argv: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.name = name
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("ab") as out:
            command = [_SETPRIV, "--pdeathsig", "SIGTERM", "--", *argv] if _SETPRIV else argv
            self.proc = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                env=env, start_new_session=True,
            )  # fmt: skip

    @property
    def pid(self) -> int:
        """Its process id (setpriv execs the command in place)."""
        return self.proc.pid

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM its process group; SIGKILL if it is still there after ``timeout``."""
        if self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)


class BenchMesh:
    """Starts everything under a fresh temporary directory; ``async with`` it, then read its fields."""

    def __init__(self, agents: int, slots: int) -> None:
        self.agents, self.slots = agents, slots
        self.data = Path(tempfile.mkdtemp(prefix="maw-bench-"))
        self.stack = Stack(data_dir=self.data, ports=Endpoints.random(), database_url="", redis_url="")
        self.stack.database_url = self.stack.redis_url = ""  # always its own servers, fsync on: "durable" means it
        self.procs: list[Proc] = []
        self.admin: Metadata = ()
        self.repository = ""

    @property
    def scheduler(self) -> str:
        """host:port of the scheduler."""
        return f"127.0.0.1:{self.stack.ports.scheduler}"

    @property
    def database_url(self) -> str:
        """The embedded PostgreSQL's URL."""
        return self.stack.database_url

    @property
    def redis_url(self) -> str:
        """The embedded Redis's URL."""
        return self.stack.redis_url

    def pids(self) -> dict[str, int]:
        """Every long-lived process of the mesh by name: postgres, redis, the services, agent-0…"""
        return {name: c.pid for name, c in self.stack.children.items()} | {p.name: p.pid for p in self.procs}

    async def __aenter__(self) -> BenchMesh:
        try:
            await asyncio.to_thread(self._start_servers)
            self.repository = str(await asyncio.to_thread(self._make_repository))
            await self._start_agents()
        except BaseException:
            self.stop()
            raise
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def _start_servers(self) -> None:
        self.stack.start_postgres()
        self.stack.start_redis()
        for name in ("registry", "scheduler", "evaluator"):
            self.stack.start_service(name, wait=False)
        for name in ("registry", "scheduler", "evaluator"):
            self.stack.wait_serving(name, self.stack.ports.service(name))

    def _make_repository(self) -> Path:
        """A one-commit git repository the subprocess mode's workspaces are checked out from."""
        repo = self.data / "repo"
        repo.mkdir()
        (repo / "README.md").write_text("bench workspace\n")
        env = {**os.environ, "GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "bench@localhost",
               "GIT_COMMITTER_NAME": "bench", "GIT_COMMITTER_EMAIL": "bench@localhost"}  # fmt: skip
        for argv in (["init", "-q", "-b", "main"], ["add", "README.md"], ["commit", "-q", "-m", "bench"]):
            subprocess.run(["git", "-C", str(repo), *argv], check=True, env=env, capture_output=True)
        return repo

    async def _start_agents(self) -> None:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{self.stack.ports.registry}") as registry:
            self.admin = await login(registry, "admin", self.stack.admin_password)
            for i in range(self.agents):
                worker, credential = await enroll(registry, self.admin, f"bench-{i}", list(AGENT_TOOLS.values()))
                cred_file = self.data / f"agent-{i}.credential"
                cred_file.write_text(credential)
                cred_file.chmod(0o600)
                argv = [
                    sys.executable, "-m", "maw_agent", "run", "--server", self.scheduler, "--worker", worker,
                    "--credential-file", str(cred_file), "--capacity-slots", str(self.slots),
                    "--work-dir", str(self.data / f"agent-{i}"), "--log-level", "WARNING",
                ]  # fmt: skip
                for tool in AGENT_TOOLS:
                    argv += ["--tool", tool]
                self.procs.append(Proc(f"agent-{i}", argv, self.stack.log_dir / f"agent-{i}.log"))
        async with grpc.aio.insecure_channel(self.scheduler) as channel:
            stats = stats_service_pb2_grpc.StatsServiceStub(channel)
            deadline = time.monotonic() + 60
            while True:
                got = await stats.GetStats(stats_service_pb2.GetStatsRequest(), metadata=self.admin, timeout=5)
                if got.total_slots >= self.agents * self.slots:
                    return
                if time.monotonic() > deadline:
                    raise RuntimeError(f"agents did not connect: {got.total_slots} slots of {self.agents * self.slots}")
                await asyncio.sleep(0.2)

    def stop(self) -> None:
        """Stop the agents, then the stack; remove the data directory."""
        for proc in self.procs:
            proc.stop()
        self.procs.clear()
        self.stack.stop()
        shutil.rmtree(self.data, ignore_errors=True)
