"""One assignment running in a slot: the runtime's side of the tool adapter interface.

An Execution prepares the working directory and the scrubbed environment, runs the adapter, turns tool
output into log chunks (capped) and a Result, and knows how to stop the tool: SIGTERM to its process
group, a grace period, SIGKILL (or, for in-process tools, task cancellation).
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shutil
import signal
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from google.protobuf import json_format, timestamp_pb2
from maw.agent.v1 import agent_service_pb2 as agent_pb2
from maw.common.v1 import work_pb2

from maw_agent._process import ToolProcess
from maw_agent._sandbox import Limits, Sandbox
from maw_agent._spool import LeaseKey, lease_key
from maw_agent._workspace import Workspace, WorkspaceError, Workspaces
from maw_agent.tools.base import ToolAdapter, ToolResult

__all__ = ["Execution", "ExecutionSettings", "scrubbed_env"]

log = logging.getLogger(__name__)

_CHUNK_LIMIT = 64 << 10
# Variables of the agent's environment every tool gets; everything else needs an allow-list entry.
BASE_ENV = ("PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ")
_DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"
_UNSAFE_PATH_CHARS = re.compile(r"[^A-Za-z0-9_.-]+")


@dataclass(frozen=True)
class ExecutionSettings:
    """What every execution needs from the agent's configuration."""

    work_root: Path
    keep_workspaces: bool
    output_limit_bytes: int
    result_output_bytes: int
    env_allowlist: Sequence[str]
    credential: str
    sandbox: Sandbox = field(default_factory=Sandbox)
    limits: Limits = field(default_factory=Limits)
    workspaces: Workspaces | None = None
    max_diff_bytes: int = 4 << 20


def scrubbed_env(
    assignment: agent_pb2.Assignment,
    settings: ExecutionSettings,
    workdir: Path | None,
    source: Mapping[str, str] | None = None,
    home: Path | None = None,
) -> dict[str, str]:
    """The environment of a tool: allow-listed variables and Assignment.env, never the credential."""
    source = os.environ if source is None else source
    names = [*BASE_ENV, *settings.env_allowlist, *assignment.env_allowlist]
    env = {name: source[name] for name in names if name in source}
    env.setdefault("PATH", _DEFAULT_PATH)
    if workdir is not None:
        env["HOME"] = str(home or workdir)
        env["PWD"] = str(workdir)
    env["MAW_SUBTASK"] = assignment.lease.subtask
    env["MAW_ATTEMPT"] = str(assignment.lease.attempt)
    env.update(assignment.env)
    secret = settings.credential
    return {name: value for name, value in env.items() if not secret or secret not in value}


class Execution:
    """One accepted assignment from start to Result. Implements `maw_agent.tools.ToolRun`."""

    def __init__(
        self,
        *,
        assignment: agent_pb2.Assignment,
        adapter: ToolAdapter,
        tool_version: str,
        settings: ExecutionSettings,
        emit_chunk: Callable[[agent_pb2.LogChunk], None],
        emit_progress: Callable[[agent_pb2.Progress], None],
    ) -> None:
        self._assignment = assignment
        self.key: LeaseKey = lease_key(assignment.lease)
        self.adapter = adapter
        self._tool_version = tool_version
        self._settings = settings
        self._emit_chunk = emit_chunk
        self._emit_progress = emit_progress
        fields = assignment.tool_options.fields
        self._options: dict[str, Any] = json_format.MessageToDict(assignment.tool_options) if fields else {}
        self._workdir: Path | None = None
        self._root: Path | None = None  # the assignment's directory (a worktree's root)
        self._home: Path | None = None  # HOME of a tool working in a git workspace (outside the worktree)
        self._workspace: Workspace | None = None
        self._env: dict[str, str] | None = None
        self._limits = settings.limits.merged(assignment.resource_limits)
        self._output_limit = settings.output_limit_bytes
        if assignment.resource_limits.output_bytes > 0:
            self._output_limit = min(self._output_limit, assignment.resource_limits.output_bytes)
        self._stdout_hook: Callable[[bytes], None] | None = None
        self.start_time = time.time()
        self.last_output_time = self.start_time
        self.progress_percent = 0
        self.attempt_deadline = _seconds(assignment.attempt_deadline)
        no_progress = assignment.time_limits.no_progress
        self.no_progress_s = no_progress.seconds + no_progress.nanos / 1e9 if no_progress.ByteSize() else None
        self.process: ToolProcess | None = None
        self.task: asyncio.Task[None] | None = None
        self.stop_outcome: work_pb2.Outcome.ValueType | None = None
        self.stop_message = ""
        self.discard = False
        self._stopper: asyncio.Task[None] | None = None
        self._sequence = 0
        self._offsets = {work_pb2.LOG_STREAM_STDOUT: 0, work_pb2.LOG_STREAM_STDERR: 0, work_pb2.LOG_STREAM_AGENT: 0}
        self._streamed = 0
        self._stream_truncated = False
        self._tail = bytearray()
        self._output_total = 0

    # --- ToolRun ---------------------------------------------------------------------------------

    @property
    def assignment(self) -> agent_pb2.Assignment:
        return self._assignment

    @property
    def options(self) -> Mapping[str, Any]:
        return self._options

    @property
    def workdir(self) -> Path | None:
        return self._workdir

    @property
    def env(self) -> Mapping[str, str]:
        if self._env is None:
            self._env = scrubbed_env(self._assignment, self._settings, self._workdir, home=self._home)
        return self._env

    def output(self, stream: work_pb2.LogStream.ValueType, data: bytes) -> None:
        if not data:
            return
        if stream == work_pb2.LOG_STREAM_STDOUT and self._stdout_hook is not None:
            self._stdout_hook(data)
        self.last_output_time = time.time()
        self._output_total += len(data)
        keep = self._settings.result_output_bytes
        if keep:
            self._tail += data
            if len(self._tail) > keep:
                del self._tail[: len(self._tail) - keep]
        room = self._output_limit - self._streamed
        if room <= 0:
            if not self._stream_truncated:
                self._stream_truncated = True
                self.note(f"output beyond {self._output_limit} bytes is not streamed")
            return
        self._chunk(stream, data[:room])
        self._streamed += min(room, len(data))

    def progress(self, percent: int, message: str = "") -> None:
        self.progress_percent = max(0, min(100, int(percent)))
        self._emit_progress(
            agent_pb2.Progress(
                lease=self._assignment.lease, percent=self.progress_percent, message=message, time=_timestamp()
            )
        )

    async def run_process(
        self,
        argv: Sequence[str],
        *,
        stdin: bytes | None = None,
        on_stdout: Callable[[bytes], None] | None = None,
    ) -> int:
        if self.stop_outcome is not None:
            raise asyncio.CancelledError
        writable: list[Path] = []
        readable: list[Path] = []
        if self._workspace is not None:
            writable, readable = self._workspace.writable, self._workspace.readable
        elif self._workdir is not None:
            writable = [self._workdir]
        if self._home is not None:
            writable.append(self._home)
        wrapped = self._settings.sandbox.wrap(argv, cwd=self._workdir, writable=writable, readable=readable)
        self._stdout_hook = on_stdout
        try:
            self.process, waiter = await ToolProcess.start(
                wrapped, cwd=self._workdir, env=self.env, sink=self.output, stdin=stdin, preexec=self._limits.preexec()
            )
            if self.stop_outcome is not None:  # stopped while it started
                self.process.signal(signal.SIGKILL)
            return await waiter
        finally:
            self._stdout_hook = None

    # --- runtime ---------------------------------------------------------------------------------

    def note(self, text: str) -> None:
        """A line from the agent itself in the assignment's log (LOG_STREAM_AGENT)."""
        self._chunk(work_pb2.LOG_STREAM_AGENT, f"[maw-agent] {text}\n".encode())

    @property
    def process_alive(self) -> bool:
        """Whether the tool is running (its process, or the in-process adapter)."""
        if self.process is not None:
            return self.process.alive
        return self.task is not None and not self.task.done()

    async def execute(self) -> agent_pb2.Result:
        """Run the tool to its end and build the Result."""
        started = time.time()
        self.start_time = started
        tool_result = ToolResult()
        outcome: work_pb2.Outcome.ValueType = work_pb2.OUTCOME_FAILED
        diff: work_pb2.Diff | None = None
        try:
            if self.adapter.needs_workdir:
                await self._prepare()
            self.last_output_time = time.time()
            tool_result = await self.adapter.run(self)
            succeeded = tool_result.exit_code == 0 if tool_result.succeeded is None else tool_result.succeeded
            outcome = work_pb2.OUTCOME_SUCCEEDED if succeeded else work_pb2.OUTCOME_FAILED
            if self._workspace is not None and self.stop_outcome is None:
                limit = self._assignment.max_diff_bytes or self._settings.max_diff_bytes
                diff, line = await self._workspace.diff(limit)
                self.note(f"workspace change: {line}")
                if not tool_result.summary:
                    tool_result.summary = line
        except asyncio.CancelledError:
            if self.stop_outcome is None:
                raise
        except WorkspaceError as exc:
            self.note(f"workspace: {exc}")
            tool_result = ToolResult(exit_code=-1, error_message=f"workspace: {exc}")
            outcome = work_pb2.OUTCOME_FAILED
        except Exception as exc:
            log.warning("tool %s failed on %s: %s", self.adapter.name, self._assignment.lease.subtask, exc)
            tool_result = ToolResult(exit_code=-1, error_message=f"the agent could not run the tool: {exc}")
            outcome = work_pb2.OUTCOME_FAILED
        finally:
            cleanup = asyncio.ensure_future(self._remove_workdir())
            try:
                await asyncio.shield(cleanup)
            except asyncio.CancelledError:
                if self.stop_outcome is None:
                    raise
        if self.stop_outcome is not None:
            outcome = self.stop_outcome
            if self.process is not None and self.process.alive:
                self.process.signal(signal.SIGKILL)
            tool_result.error_message = self.stop_message
        result = self._result(outcome, tool_result, started, time.time())
        if diff is not None:
            result.diff.CopyFrom(diff)
        return result

    def overdue(self, now: float, clock_skew: float) -> str | None:
        """Why this assignment must time out at ``now`` (attempt deadline passed, silent too long), or None.

        The attempt deadline is the scheduler's time: ``clock_skew`` is how far its clock is ahead of ours.
        """
        if self.stop_outcome is not None:
            return None
        if self.attempt_deadline is not None and now + clock_skew >= self.attempt_deadline:
            return "attempt deadline passed"
        silent = self.no_progress_s
        if silent is not None and now - self.last_output_time >= silent:
            return f"no output for {silent:g} s"
        return None

    def stop(self, outcome: work_pb2.Outcome.ValueType, message: str, grace: float, *, discard: bool = False) -> None:
        """Stop the tool (once): SIGTERM to its group, `grace` seconds, SIGKILL; the Result says `outcome`."""
        self.discard = self.discard or discard
        if self.stop_outcome is not None:
            return
        self.stop_outcome = outcome
        self.stop_message = message
        self._stopper = asyncio.create_task(self._terminate(grace), name=f"stop-{self.key[0]}#{self.key[1]}")

    def kill_now(self) -> None:
        """SIGKILL at once (agent exiting immediately)."""
        if self.process is not None:
            self.process.signal(signal.SIGKILL)
        if self.task is not None:
            self.task.cancel()

    async def _terminate(self, grace: float) -> None:
        task = self.task
        if task is None or task.done():
            return
        if self.process is not None and self.process.alive:
            self.note(f"stopping: SIGTERM to the process group, SIGKILL after {grace:g} s ({self.stop_message})")
            self.process.signal(signal.SIGTERM)
            done, _ = await asyncio.wait({task}, timeout=grace)
            if done:
                return
            self.note("grace period over: SIGKILL to the process group")
            self.process.signal(signal.SIGKILL)
            done, _ = await asyncio.wait({task}, timeout=5)
            if done:
                return
        task.cancel()

    async def _prepare(self) -> None:
        """The fresh directory, or the git worktree when the assignment names a repository."""
        subtask, attempt = self.key
        name = _UNSAFE_PATH_CHARS.sub("_", subtask.removeprefix("tasks/"))[-150:] + f".a{attempt}"
        path = self._settings.work_root / name
        self._root = path
        if not self._assignment.workspace.repository:
            if path.exists():
                shutil.rmtree(path, ignore_errors=True)
            path.mkdir(parents=True)
            self._workdir = path
            return
        if self._settings.workspaces is None:
            raise WorkspaceError("git workspaces are not configured on this agent")
        home = self._settings.work_root / (name + ".home")
        shutil.rmtree(home, ignore_errors=True)
        home.mkdir(parents=True)
        self._home = home
        self._workspace = await self._settings.workspaces.prepare(self._assignment, path, os.environ, self.note)
        self._workdir = self._workspace.cwd

    async def _remove_workdir(self) -> None:
        if self._root is None or self._settings.keep_workspaces:
            return
        if self._settings.workspaces is not None and self._assignment.workspace.repository:
            await self._settings.workspaces.release(self._workspace, self._root)
        shutil.rmtree(self._root, ignore_errors=True)
        if self._home is not None:
            shutil.rmtree(self._home, ignore_errors=True)

    def _chunk(self, stream: work_pb2.LogStream.ValueType, data: bytes) -> None:
        for start in range(0, len(data), _CHUNK_LIMIT):
            piece = data[start : start + _CHUNK_LIMIT]
            self._sequence += 1
            self._emit_chunk(
                agent_pb2.LogChunk(
                    lease=self._assignment.lease,
                    stream=stream,
                    sequence=self._sequence,
                    offset=self._offsets[stream],
                    data=piece,
                    time=_timestamp(),
                )
            )
            self._offsets[stream] += len(piece)

    def _result(
        self, outcome: work_pb2.Outcome.ValueType, tool_result: ToolResult, started: float, finished: float
    ) -> agent_pb2.Result:
        result = agent_pb2.Result(
            lease=self._assignment.lease,
            outcome=outcome,
            exit_code=tool_result.exit_code,
            summary=tool_result.summary,
            output=self._tail.decode("utf-8", errors="replace"),
            output_truncated=self._output_total > len(self._tail),
            error_message=tool_result.error_message,
            tool=self._assignment.tool,
            tool_version=self._tool_version,
        )
        result.start_time.FromNanoseconds(int(started * 1e9))
        result.finish_time.FromNanoseconds(int(finished * 1e9))
        result.duration.FromNanoseconds(int((finished - started) * 1e9))
        if tool_result.token_usage is not None:
            result.token_usage.CopyFrom(tool_result.token_usage)
        if tool_result.metadata:
            result.tool_metadata.update(tool_result.metadata)
        return result


def _timestamp() -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(time.time_ns())
    return stamp


def _seconds(stamp: timestamp_pb2.Timestamp) -> float | None:
    """A Timestamp as epoch seconds; None when unset."""
    if not stamp.seconds and not stamp.nanos:
        return None
    return stamp.seconds + stamp.nanos / 1e9
