"""The sandbox of a tool process: rlimits in every mode, bubblewrap isolation in `sandbox: bwrap`.

The bubblewrap tests run wherever bwrap is installed and may create namespaces (they do in the test
container, as root); elsewhere they are skipped with the reason `bwrap_problem()` gives.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from maw.agent.v1 import agent_service_pb2 as pb
from maw.common.v1 import work_pb2
from maw_agent._sandbox import Limits, Sandbox, bwrap_problem, sandbox_of
from maw_agent.config import parse_config

from tests.standins.harness import CREDENTIAL, Recorder, adapter, execution, run, standins_on_path

BWRAP_PROBLEM = bwrap_problem()
needs_bwrap = pytest.mark.skipif(BWRAP_PROBLEM is not None, reason=f"bubblewrap unusable here: {BWRAP_PROBLEM}")
ALLOCATE = f"{sys.executable} -c 'b = bytearray(400 * 1024 * 1024); print(\"allocated\")'"


def bwrap_sandbox(tmp_path: Path, credential_file: Path) -> Sandbox:
    config = parse_config(
        f"server: s:1\nworker: w\ncredential_file: {credential_file}\nwork_dir: {tmp_path / 'work'}\nsandbox: bwrap\n"
    )
    return sandbox_of(config)


@pytest.fixture
def credential_file(tmp_path: Path) -> Path:
    path = tmp_path / "config" / "credential"
    path.parent.mkdir()
    path.write_text(CREDENTIAL)
    path.chmod(0o600)
    return path


@pytest.mark.parametrize("mode", ["none", pytest.param("bwrap", marks=needs_bwrap)])
async def test_a_tool_cannot_exceed_its_memory_limit(tmp_path: Path, credential_file: Path, mode: str) -> None:
    sandbox = bwrap_sandbox(tmp_path, credential_file) if mode == "bwrap" else Sandbox()
    (tmp_path / "work").mkdir(exist_ok=True)
    recorder = Recorder()
    limited = pb.Assignment(resource_limits=work_pb2.ResourceLimits(memory_bytes=256 << 20))
    result = await run(
        execution(tmp_path, adapter("shell"), options={"command": ALLOCATE}, assignment=limited,
                  recorder=recorder, sandbox=sandbox)
    )  # fmt: skip
    assert result.outcome == work_pb2.OUTCOME_FAILED
    assert b"MemoryError" in recorder.stream(work_pb2.LOG_STREAM_STDERR)
    assert b"allocated" not in recorder.stdout()
    # The same allocation passes without the limit: the limit is what stopped it.
    free = await run(execution(tmp_path, adapter("shell"), options={"command": ALLOCATE}, sandbox=sandbox))
    assert free.outcome == work_pb2.OUTCOME_SUCCEEDED, free.output


async def test_cpu_time_and_file_size_limits_stop_the_tool(tmp_path: Path) -> None:
    busy = await run(
        execution(tmp_path, adapter("shell"), options={"command": "while :; do :; done"}, limits=Limits(cpu_s=1))
    )
    assert busy.outcome == work_pb2.OUTCOME_FAILED
    assert busy.exit_code in (-24, 128 + 24, -9)  # SIGXCPU (bash may report it as 152), SIGKILL at the hard limit
    big = await run(
        execution(
            tmp_path,
            adapter("shell"),
            options={"command": "head -c 2000000 /dev/zero > big"},
            assignment=pb.Assignment(resource_limits=work_pb2.ResourceLimits(file_size_bytes=1 << 20)),
        )  # fmt: skip
    )
    assert big.outcome == work_pb2.OUTCOME_FAILED


def test_the_assignments_limits_win_over_the_agents_defaults() -> None:
    defaults = Limits(cpu_s=60, memory_bytes=1 << 30, file_size_bytes=0, max_processes=64)
    merged = defaults.merged(work_pb2.ResourceLimits(memory_bytes=1 << 20, file_size_bytes=5))
    assert merged == Limits(cpu_s=60, memory_bytes=1 << 20, file_size_bytes=5, max_processes=64)
    assert Limits().preexec() is None


@needs_bwrap
async def test_in_bwrap_a_tool_cannot_read_the_agent_credential_file_or_an_environment_secret(
    tmp_path: Path, credential_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MAW_AGENT_CREDENTIAL", CREDENTIAL)
    monkeypatch.setenv("SOME_TOKEN", "agent-only-secret")
    spool = tmp_path / "work" / "spool"
    spool.mkdir(parents=True)
    (spool / "results.log").write_text("results of other assignments")
    command = (
        f"cat {credential_file}; echo cred-exit=$?; env; cat {spool / 'results.log'}; echo spool-exit=$?; "
        f"echo planted > {tmp_path / 'outside'}; echo write-exit=$?; echo mine > mine.txt; cat mine.txt"
    )
    recorder = Recorder()
    result = await run(
        execution(tmp_path, adapter("shell"), options={"command": command}, recorder=recorder,
                  sandbox=bwrap_sandbox(tmp_path, credential_file))
    )  # fmt: skip
    out = recorder.stdout().decode()
    assert result.outcome == work_pb2.OUTCOME_SUCCEEDED, result.output
    assert CREDENTIAL not in out and "agent-only-secret" not in out
    # (Under /tmp, as here, the file is gone with the private /tmp; elsewhere it reads as /dev/null.)
    assert "results of other assignments" not in out and "spool-exit=1" in out
    assert not (tmp_path / "outside").exists()
    assert "mine" in out.splitlines()[-1]


async def test_without_bwrap_the_environment_secret_is_still_scrubbed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SOME_TOKEN", "agent-only-secret")
    recorder = Recorder()
    await run(execution(tmp_path, adapter("shell"), options={"command": "env"}, recorder=recorder))
    assert b"agent-only-secret" not in recorder.stdout()


@needs_bwrap
async def test_claude_runs_inside_bwrap_in_a_git_workspace(
    tmp_path: Path, credential_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.integration.test_agent_workspace import git

    standins_on_path(monkeypatch)
    repo = tmp_path / "origin"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    (repo / "README.md").write_text("# x\n")
    git(repo, "add", ".")
    git(repo, "commit", "-q", "-m", "x")
    (tmp_path / "work").mkdir()
    assignment = pb.Assignment(workspace=work_pb2.GitWorkspace(repository=str(repo)))
    result = await run(
        execution(tmp_path, adapter("claude"), assignment=assignment, sandbox=bwrap_sandbox(tmp_path, credential_file))
    )
    assert result.outcome == work_pb2.OUTCOME_SUCCEEDED, result.error_message + result.output
    assert sorted(f.path for f in result.diff.files) == ["README.md", "feature.py"]


def test_bwrap_wraps_the_command_with_the_credential_hidden_and_the_workdir_writable(tmp_path: Path) -> None:
    credential = tmp_path / "cred"
    credential.write_text("x")
    (tmp_path / "work").mkdir()
    sandbox = Sandbox(mode="bwrap", private_dirs=(tmp_path / "work",), hidden_files=(credential,))
    argv = sandbox.wrap(["claude", "-p"], cwd=tmp_path / "work" / "a", writable=[tmp_path / "work" / "a"])
    assert argv[0] == "bwrap" and argv[-3:] == ["--", "claude", "-p"]
    joined = " ".join(argv)
    assert f"--tmpfs {tmp_path / 'work'}" in joined
    assert f"--ro-bind /dev/null {credential}" in joined
    assert f"--bind {tmp_path / 'work' / 'a'} {tmp_path / 'work' / 'a'}" in joined
    assert "--share-net" in argv and "--unshare-all" in argv
    assert Sandbox().wrap(["claude"], cwd=None, writable=[]) == ["claude"]
