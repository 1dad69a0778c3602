"""A tool's process in its own process group: start, pump output, signal the whole group.

The process leads a new session (so its group id is its pid) and every child it starts stays in that
group unless it deliberately leaves, so one `killpg` reaches the whole tree. When the leader exits, what
is left of its group is killed, so a tool cannot leave background processes behind (or hold its output
pipes open forever).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from maw.common.v1 import work_pb2

__all__ = ["ToolProcess"]

_READ_SIZE = 64 << 10

OutputSink = Callable[[work_pb2.LogStream.ValueType, bytes], None]


class ToolProcess:
    """One running tool process (group)."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self._process = process
        self.pgid = process.pid
        self._feeder: asyncio.Task[None] | None = None

    @classmethod
    async def start(
        cls,
        argv: Sequence[str],
        *,
        cwd: Path | None,
        env: Mapping[str, str],
        sink: OutputSink,
        stdin: bytes | None = None,
        preexec: Callable[[], None] | None = None,
    ) -> tuple[ToolProcess, asyncio.Task[int]]:
        """Start argv; returns the process and a task that ends with its exit code once output is drained.

        `sink(stream, data)` gets the output of stdout and stderr as it comes. `stdin` is written to the
        process and then closed (None: /dev/null). `preexec` runs in the child before exec (rlimits).
        """
        process = await asyncio.create_subprocess_exec(
            *argv,
            cwd=cwd,
            env=dict(env),
            stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
            preexec_fn=preexec,
        )
        tool = cls(process)
        if stdin is not None:
            tool._feeder = asyncio.create_task(tool._feed(stdin), name=f"tool-stdin-{process.pid}")
        return tool, asyncio.create_task(tool._wait(sink), name=f"tool-process-{process.pid}")

    async def _feed(self, data: bytes) -> None:
        stream = self._process.stdin
        assert stream is not None
        # A tool that exits (or closes its input) early is not an error of the agent's.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            stream.write(data)
            await stream.drain()
        with contextlib.suppress(BrokenPipeError, ConnectionResetError, OSError):
            stream.close()

    @property
    def alive(self) -> bool:
        """Whether the leading process has not exited yet."""
        return self._process.returncode is None

    def signal(self, signum: signal.Signals) -> None:
        """Send a signal to the whole process group (nothing when it is already gone)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pgid, signum)

    async def _wait(self, sink: OutputSink) -> int:
        assert self._process.stdout is not None and self._process.stderr is not None
        pumps = [
            asyncio.create_task(_pump(self._process.stdout, work_pb2.LOG_STREAM_STDOUT, sink)),
            asyncio.create_task(_pump(self._process.stderr, work_pb2.LOG_STREAM_STDERR, sink)),
        ]
        output_closed = asyncio.gather(*pumps)
        waiter = asyncio.ensure_future(self._process.wait())
        either: set[asyncio.Future[Any]] = {waiter, output_closed}
        try:
            # Process.wait() may also wait for the pipes, which a leftover child can hold open; the
            # return code itself is known as soon as the leader is reaped, so look at it too.
            while self._process.returncode is None and not waiter.done():
                await asyncio.wait(either, timeout=0.05, return_when=asyncio.FIRST_COMPLETED)
                if output_closed.done():
                    await waiter
            # Leftover children would keep the pipes open: the tool is over, so is its group.
            self.signal(signal.SIGKILL)
            if self._feeder is not None:
                self._feeder.cancel()
            await output_closed
            code = await waiter
            assert code is not None
            return code
        except asyncio.CancelledError:
            self.signal(signal.SIGKILL)
            if self._feeder is not None:
                self._feeder.cancel()
            waiter.cancel()
            output_closed.cancel()
            raise


async def _pump(reader: asyncio.StreamReader, stream: work_pb2.LogStream.ValueType, sink: OutputSink) -> None:
    while chunk := await reader.read(_READ_SIZE):
        sink(stream, chunk)
