"""Tool adapters run through the agent's real execution runtime (no stream): shell and the test tool."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import struct_pb2
from maw.agent.v1 import agent_service_pb2 as pb
from maw.common.v1 import machine_pb2, work_pb2
from maw_agent._execution import Execution, ExecutionSettings
from maw_agent.tools import ToolAdapter, adapter_names, adapters

CREDENTIAL = "maw_agt_unit-credential-abcdef"


class Recorder:
    """Collects what an execution emits."""

    def __init__(self) -> None:
        self.chunks: list[pb.LogChunk] = []
        self.progress: list[pb.Progress] = []

    def stdout(self) -> bytes:
        return b"".join(c.data for c in self.chunks if c.stream == work_pb2.LOG_STREAM_STDOUT)


def settings(tmp_path: Path, **overrides: Any) -> ExecutionSettings:
    values: dict[str, Any] = {
        "work_root": tmp_path / "ws",
        "keep_workspaces": False,
        "output_limit_bytes": 1 << 20,
        "result_output_bytes": 4096,
        "env_allowlist": (),
        "credential": CREDENTIAL,
    }
    values.update(overrides)
    return ExecutionSettings(**values)


def make(
    tmp_path: Path, tool: str, options: dict[str, Any], recorder: Recorder, **kwargs: Any
) -> tuple[Execution, pb.Assignment]:
    adapter: ToolAdapter = adapters([tool])[tool]
    tool_options = struct_pb2.Struct()
    tool_options.update(options)
    assignment = pb.Assignment(
        lease=pb.Lease(subtask="tasks/t/subtasks/s", attempt=2),
        tool=machine_pb2.ToolChoice(kind=adapter.kind),
        tool_options=tool_options,
        env_allowlist=kwargs.pop("env_allowlist", []),
        env=kwargs.pop("env", {}),
    )
    execution = Execution(
        assignment=assignment,
        adapter=adapter,
        tool_version="1",
        settings=settings(tmp_path, **kwargs),
        emit_chunk=recorder.chunks.append,
        emit_progress=recorder.progress.append,
    )
    return execution, assignment


async def run(execution: Execution) -> pb.Result:
    result: list[pb.Result] = []

    async def body() -> None:
        result.append(await execution.execute())

    execution.task = asyncio.create_task(body())
    await asyncio.wait_for(execution.task, 20)
    return result[0]


def test_every_adapter_module_is_found_without_being_listed() -> None:
    assert {"shell", "test"} <= adapter_names()
    kinds = {adapter.kind for adapter in adapters().values()}
    assert {machine_pb2.TOOL_KIND_SHELL, machine_pb2.TOOL_KIND_TEST} <= kinds


async def test_shell_detects_bash_with_its_version() -> None:
    info = await adapters(["shell"])["shell"].detect()
    assert info is not None and info.version[0].isdigit()


@pytest.mark.parametrize(
    ("command", "outcome", "code"),
    [
        ("true", work_pb2.OUTCOME_SUCCEEDED, 0),
        ("exit 7", work_pb2.OUTCOME_FAILED, 7),
        ("kill -9 $$", work_pb2.OUTCOME_FAILED, -9),
    ],
)
async def test_shell_exit_codes_decide_the_outcome(tmp_path: Path, command: str, outcome: int, code: int) -> None:
    execution, _ = make(tmp_path, "shell", {"command": command}, Recorder())
    result = await run(execution)
    assert (result.outcome, result.exit_code) == (outcome, code)
    assert result.lease.attempt == 2
    assert result.duration.ToNanoseconds() > 0


async def test_shell_runs_in_a_fresh_workdir_that_is_removed_afterwards(tmp_path: Path) -> None:
    recorder = Recorder()
    execution, _ = make(tmp_path, "shell", {"command": "pwd; ls -A | wc -l; echo $HOME"}, recorder)
    result = await run(execution)
    lines = recorder.stdout().decode().split()
    assert lines[0] == lines[2]
    assert lines[0].startswith(str(tmp_path / "ws"))
    assert lines[1] == "0"
    assert result.outcome == work_pb2.OUTCOME_SUCCEEDED
    assert not Path(lines[0]).exists()


async def test_shell_environment_is_scrubbed_and_never_holds_the_credential(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AGENT_SECRET", "do-not-leak")
    monkeypatch.setenv("ALLOWED_KEY", "passes")
    monkeypatch.setenv("MAW_AGENT_CREDENTIAL", CREDENTIAL)
    recorder = Recorder()
    execution, _ = make(
        tmp_path,
        "shell",
        {"command": "env"},
        recorder,
        env_allowlist=["ALLOWED_KEY", "MAW_AGENT_CREDENTIAL"],
        env={"FROM_ASSIGNMENT": "yes", "SNEAKY": f"x{CREDENTIAL}"},
    )
    await run(execution)
    env = dict(line.split("=", 1) for line in recorder.stdout().decode().splitlines() if "=" in line)
    assert env["ALLOWED_KEY"] == "passes"
    assert env["FROM_ASSIGNMENT"] == "yes"
    assert env["MAW_SUBTASK"] == "tasks/t/subtasks/s"
    assert env["MAW_ATTEMPT"] == "2"
    assert "AGENT_SECRET" not in env
    assert "MAW_AGENT_CREDENTIAL" not in env
    assert "SNEAKY" not in env
    assert CREDENTIAL.encode() not in recorder.stdout()


async def test_cancel_kills_the_whole_process_group_within_the_grace_period(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    command = f"trap '' TERM; sleep 60 & sleep 60 & echo $! > {pids}; wait"
    execution, _ = make(tmp_path, "shell", {"command": command}, Recorder())
    task = asyncio.create_task(run(execution))
    while not pids.exists() or not pids.read_text().strip():
        await asyncio.sleep(0.02)
    child = int(pids.read_text())
    started = time.monotonic()
    execution.stop(work_pb2.OUTCOME_CANCELLED, "cancelled by test", grace=0.5)
    result = await task
    elapsed = time.monotonic() - started
    assert result.outcome == work_pb2.OUTCOME_CANCELLED
    assert result.error_message == "cancelled by test"
    assert 0.5 <= elapsed < 2.0
    assert not _alive(child)


async def test_a_tool_that_obeys_sigterm_stops_without_waiting_for_the_grace_period(tmp_path: Path) -> None:
    execution, _ = make(tmp_path, "shell", {"command": "echo started; sleep 60"}, Recorder())
    task = asyncio.create_task(run(execution))
    while execution.process is None:
        await asyncio.sleep(0.01)
    started = time.monotonic()
    execution.stop(work_pb2.OUTCOME_TIMED_OUT, "attempt deadline passed", grace=10)
    result = await task
    assert time.monotonic() - started < 1.0
    assert result.outcome == work_pb2.OUTCOME_TIMED_OUT
    assert result.exit_code == -15


async def test_background_children_do_not_outlive_a_finished_tool(tmp_path: Path) -> None:
    pids = tmp_path / "pid"
    execution, _ = make(tmp_path, "shell", {"command": f"sleep 60 & echo $! > {pids}"}, Recorder())
    result = await run(execution)
    assert result.outcome == work_pb2.OUTCOME_SUCCEEDED
    assert not _alive(int(pids.read_text()))


async def test_huge_output_is_capped_in_log_chunks_and_the_result(tmp_path: Path) -> None:
    recorder = Recorder()
    execution, _ = make(
        tmp_path,
        "shell",
        {"command": "head -c 3000000 /dev/zero | tr '\\0' x; echo; echo END"},
        recorder,
        output_limit_bytes=200_000,
        result_output_bytes=1000,
    )
    result = await run(execution)
    streamed = recorder.stdout()
    assert len(streamed) == 200_000
    assert all(len(c.data) <= 64 << 10 for c in recorder.chunks)
    assert [c.sequence for c in recorder.chunks] == list(range(1, len(recorder.chunks) + 1))
    assert len(result.output) == 1000 and result.output.endswith("END\n")
    assert result.output_truncated
    notes = b"".join(c.data for c in recorder.chunks if c.stream == work_pb2.LOG_STREAM_AGENT)
    assert b"not streamed" in notes


async def test_the_test_tool_with_no_options_succeeds_at_once_without_a_workdir(tmp_path: Path) -> None:
    execution, _ = make(tmp_path, "test", {}, Recorder())
    result = await run(execution)
    assert result.outcome == work_pb2.OUTCOME_SUCCEEDED
    assert execution.workdir is None
    assert not (tmp_path / "ws").exists()


async def test_the_test_tool_echoes_writes_reports_progress_and_fails_on_demand(tmp_path: Path) -> None:
    recorder = Recorder()
    execution, _ = make(
        tmp_path, "test", {"echo": "hi ", "output_bytes": 100, "progress": 40, "exit_code": 3}, recorder
    )
    result = await run(execution)
    assert recorder.stdout().startswith(b"hi ")
    assert len(recorder.stdout()) == 103
    assert [p.percent for p in recorder.progress] == [40]
    assert (result.outcome, result.exit_code) == (work_pb2.OUTCOME_FAILED, 3)
    failed, _ = make(tmp_path, "test", {"fail": True}, Recorder())
    assert (await run(failed)).exit_code == 1


async def test_a_hanging_test_tool_ends_when_stopped(tmp_path: Path) -> None:
    execution, _ = make(tmp_path, "test", {"hang": True}, Recorder())
    task = asyncio.create_task(run(execution))
    await asyncio.sleep(0.05)
    assert execution.process_alive
    execution.stop(work_pb2.OUTCOME_CANCELLED, "stop", grace=10)
    result = await asyncio.wait_for(task, 1)
    assert result.outcome == work_pb2.OUTCOME_CANCELLED


@pytest.mark.parametrize(
    ("tool", "options", "problem"),
    [
        ("test", {"sleep_s": "long"}, "wrong type"),
        ("test", {"hang": 1}, "wrong type"),
        ("test", {"sleep_s": -1}, "negative"),
        ("test", {"explode": True}, "unknown"),
        ("shell", {}, "command"),
        ("shell", {"command": "  "}, "command"),
        ("shell", {"command": "ls", "cwd": "/"}, "unknown"),
    ],
)
def test_options_an_adapter_cannot_run_are_refused_before_starting(
    tool: str, options: dict[str, Any], problem: str
) -> None:
    reason = adapters([tool])[tool].check(options)
    assert reason is not None and problem in reason


def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status


def test_alive_helper_sees_this_process() -> None:
    assert _alive(os.getpid())
