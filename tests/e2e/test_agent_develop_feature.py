"""Issue 6 end to end: a fresh machine enrolls with a one-time token, runs develop-feature on a git
repository with the stand-in Claude Code (tests/standins/bin/claude), and the diff comes back in the
task's subtask results."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
import yaml
from google.protobuf import timestamp_pb2
from maw.common.v1 import work_pb2
from maw.registry.v1 import enrollment_service_pb2, enrollment_service_pb2_grpc, resources_pb2
from maw.scheduler.v1 import resources_pb2 as spb
from maw.scheduler.v1 import task_service_pb2 as tpb
from maw.scheduler.v1 import task_service_pb2_grpc as tpb_grpc
from maw_agent._sandbox import bwrap_problem

from deploy.local._procs import Child
from tests.e2e.conftest import ROOT, Mesh
from tests.integration.clients import Metadata, eventually
from tests.standins.harness import BIN

pytestmark = pytest.mark.slow


def _git(cwd: Path, *args: str) -> str:
    env = {"PATH": "/usr/bin:/bin", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t"}
    env |= {"GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    return subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True, text=True).stdout.strip()


async def test_an_enrolled_agent_develops_a_feature_and_returns_the_diff(
    mesh: Mesh, registry: grpc.aio.Channel, admin: Metadata, tmp_path: Path
) -> None:
    repo = tmp_path / "project"
    repo.mkdir()
    _git(repo, "init", "-q", "-b", "main")
    (repo / "README.md").write_text("# Project\n")
    _git(repo, "add", ".")
    _git(repo, "commit", "-q", "-m", "initial")
    base = _git(repo, "rev-parse", "HEAD")

    # A one-time enrollment token, as an admin hands it to the owner of the machine.
    expire = timestamp_pb2.Timestamp()
    expire.FromDatetime(datetime.now(UTC) + timedelta(hours=1))
    created = await enrollment_service_pb2_grpc.EnrollmentServiceStub(registry).CreateEnrollmentToken(
        enrollment_service_pb2.CreateEnrollmentTokenRequest(
            enrollment_token=resources_pb2.EnrollmentToken(display_name="garage box", max_uses=1, expire_time=expire),
            request_id=uuid.uuid4().hex,
        ),
        metadata=admin,
        timeout=10,
    )
    worker_id = f"garage-{uuid.uuid4().hex[:6]}"
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "HOME": str(tmp_path),
        "XDG_CONFIG_HOME": str(tmp_path / ".config"),
        "PYTHONPATH": os.pathsep.join([str(ROOT / "agent"), str(ROOT / "gen" / "python")]),
    }
    enroll = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "maw_agent", "enroll", "--server", f"127.0.0.1:{mesh.stack.ports.registry}",
         "--token", created.secret, "--worker", worker_id],
        env=env, capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )  # fmt: skip
    assert enroll.returncode == 0, enroll.stderr
    config = yaml.safe_load((tmp_path / ".config" / "maw-agent" / "agent.yaml").read_text())
    assert {"claude", "gemini"} <= set(config["tools"])

    # `maw-agent run` with the written configuration; the scheduler is reached directly in this mesh.
    argv = [sys.executable, "-m", "maw_agent", "run", "--server", f"127.0.0.1:{mesh.stack.ports.scheduler}",
            "--work-dir", str(tmp_path / "agent-work"), "--capacity-slots", "2"]  # fmt: skip
    if bwrap_problem() is None:
        argv += ["--sandbox", "bwrap"]
    agent = Child(worker_id, argv, mesh.stack.log_dir / f"{worker_id}.log", env, cwd=tmp_path)
    mesh.agents.append(agent)

    async with grpc.aio.insecure_channel(f"127.0.0.1:{mesh.stack.ports.scheduler}") as channel:
        tasks = tpb_grpc.TaskServiceStub(channel)
        task = spb.Task(
            display_name="Add feature()",
            description="Add a function feature() that returns 42 and mention it in the README.",
            workspace=work_pb2.GitWorkspace(repository=str(repo), ref="main"),
        )
        reply = await tasks.CreateTask(
            tpb.CreateTaskRequest(task=task, template="templates/develop-feature", request_id=uuid.uuid4().hex),
            metadata=admin,
            timeout=30,
        )
        name = reply.task.name

        async def result_of(key: str) -> spb.Subtask | None:
            got = await tasks.GetSubtask(tpb.GetSubtaskRequest(name=f"{name}/subtasks/{key}"), metadata=admin)
            return got.subtask if got.subtask.HasField("result") else None

        async def generated() -> spb.Subtask | None:
            return await result_of("generate-code")

        await eventually(generated, 60, "the generate-code result")
        code = await result_of("generate-code")
        assert code is not None
        result = code.result
        assert result.outcome == work_pb2.OUTCOME_SUCCEEDED, result.error_message
        assert result.diff.base_commit == base
        assert "diff --git a/feature.py b/feature.py" in result.diff.unified_diff
        assert {f.path for f in result.diff.files} == {"feature.py", "README.md"}
        assert result.summary == "Added feature() in feature.py; it returns 42."
        assert result.token_usage.cost_micros == 12_300

    # The repository itself was never touched: all work happened in the agent's worktrees.
    assert _git(repo, "status", "--porcelain") == ""
