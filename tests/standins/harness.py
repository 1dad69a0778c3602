"""Runs one assignment through the agent's real execution runtime (no stream), for adapter tests."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import struct_pb2
from maw.agent.v1 import agent_service_pb2 as pb
from maw.common.v1 import machine_pb2, work_pb2
from maw_agent._execution import Execution, ExecutionSettings
from maw_agent._sandbox import Limits, Sandbox
from maw_agent._workspace import Workspaces
from maw_agent.tools import ToolAdapter, adapters

BIN = Path(__file__).resolve().parent / "bin"
CREDENTIAL = "maw_agt_standin-credential-0123456789"


def standins_on_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Put the stand-in tools first on PATH (for detection and for the tools' own environment)."""
    monkeypatch.setenv("PATH", f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")


@dataclass
class Recorder:
    """Collects what an execution emits."""

    chunks: list[pb.LogChunk] = field(default_factory=list)
    progress: list[pb.Progress] = field(default_factory=list)

    def stream(self, stream: work_pb2.LogStream.ValueType) -> bytes:
        return b"".join(c.data for c in self.chunks if c.stream == stream)

    def stdout(self) -> bytes:
        return self.stream(work_pb2.LOG_STREAM_STDOUT)


def adapter(tool: str, settings: Mapping[str, Any] | None = None) -> ToolAdapter:
    return adapters([tool], {tool: dict(settings or {})})[tool]


def execution(
    tmp_path: Path,
    tool: ToolAdapter,
    *,
    prompt: str = "Add a feature.",
    options: Mapping[str, Any] | None = None,
    recorder: Recorder | None = None,
    assignment: pb.Assignment | None = None,
    **settings: Any,
) -> Execution:
    tool_options = struct_pb2.Struct()
    tool_options.update(dict(options or {}))
    base = pb.Assignment(
        lease=pb.Lease(subtask="tasks/t/subtasks/s", attempt=1),
        key="s",
        tool=machine_pb2.ToolChoice(kind=tool.kind),
        tool_options=tool_options,
        prompt=prompt,
    )
    if assignment is not None:
        base.MergeFrom(assignment)
    values: dict[str, Any] = {
        "work_root": tmp_path / "work" / "workspaces",
        "keep_workspaces": False,
        "output_limit_bytes": 1 << 20,
        "result_output_bytes": 4096,
        "env_allowlist": (),
        "credential": CREDENTIAL,
        "sandbox": Sandbox(),
        "limits": Limits(),
        "workspaces": Workspaces(tmp_path / "work" / "git-cache"),
    }
    values.update(settings)
    recorder = recorder if recorder is not None else Recorder()
    return Execution(
        assignment=base,
        adapter=tool,
        tool_version="test",
        settings=ExecutionSettings(**values),
        emit_chunk=recorder.chunks.append,
        emit_progress=recorder.progress.append,
    )


async def run(execution: Execution, timeout: float = 60) -> pb.Result:
    """Run to the end, as the agent does (the execution's task is set, so stop() works)."""
    results: list[pb.Result] = []

    async def body() -> None:
        results.append(await execution.execute())

    execution.task = asyncio.create_task(body())
    await asyncio.wait_for(execution.task, timeout)
    return results[0]
