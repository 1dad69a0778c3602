"""`test`: the deterministic test tool, for tests and benchmarks. Runs in the agent's process.

Driven by `tool_options` (all optional; with none it succeeds at once, a no-op for benchmarks):
  sleep_s: float      wait this long (cancellable) before finishing
  echo: str           write this text to stdout
  output_bytes: int   write this many bytes of filler to stdout (in 64 KiB pieces)
  progress: int       report this progress percent before finishing
  hang: bool          never finish on its own (until cancelled or timed out)
  fail: bool          finish as failed (exit code 1 unless exit_code says otherwise)
  exit_code: int      the exit code to report; non-zero fails
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from maw.common.v1 import machine_pb2, work_pb2

from maw_agent.tools.base import ToolAdapter, ToolInfo, ToolResult, ToolRun

_OPTION_TYPES: dict[str, tuple[type, ...]] = {
    "sleep_s": (int, float),
    "echo": (str,),
    "output_bytes": (int, float),
    "progress": (int, float),
    "hang": (bool,),
    "fail": (bool,),
    "exit_code": (int, float),
}
_PIECE = 64 << 10
_FILLER = (b"maw test tool output " * ((_PIECE // 21) + 1))[:_PIECE]


class TestTool(ToolAdapter):
    """Sleeps, echoes, fails or hangs on demand; no subprocess, no working directory."""

    __test__ = False  # not a pytest test class, despite the name
    name = "test"
    kind = machine_pb2.TOOL_KIND_TEST
    needs_workdir = False

    async def detect(self) -> ToolInfo | None:
        return ToolInfo(version="1", local_only=True, provider="local")

    def check(self, options: Mapping[str, Any]) -> str | None:
        for key, value in options.items():
            allowed = _OPTION_TYPES.get(key)
            if allowed is None:
                return f"unknown test tool option {key!r}; known: {', '.join(sorted(_OPTION_TYPES))}"
            if isinstance(value, bool) and bool not in allowed:
                return f"test tool option {key!r} must be a number"
            if not isinstance(value, allowed):
                return f"test tool option {key!r} has the wrong type {type(value).__name__}"
            if key in {"sleep_s", "output_bytes"} and isinstance(value, int | float) and value < 0:
                return f"test tool option {key!r} must not be negative"
        return None

    async def run(self, run: ToolRun) -> ToolResult:
        options = run.options
        if not options:
            return ToolResult(summary="no-op")
        if echo := options.get("echo"):
            run.output(work_pb2.LOG_STREAM_STDOUT, str(echo).encode())
        remaining = int(options.get("output_bytes", 0))
        while remaining > 0:
            piece = _FILLER[: min(remaining, _PIECE)]
            run.output(work_pb2.LOG_STREAM_STDOUT, piece)
            remaining -= len(piece)
            await asyncio.sleep(0)
        if "progress" in options:
            run.progress(int(options["progress"]), "test tool progress")
        if sleep_s := float(options.get("sleep_s", 0)):
            await asyncio.sleep(sleep_s)
        if options.get("hang"):
            await asyncio.Event().wait()
        exit_code = int(options.get("exit_code", 1 if options.get("fail") else 0))
        if options.get("fail") or exit_code != 0:
            return ToolResult(exit_code=exit_code, succeeded=False, error_message="test tool failed on demand")
        return ToolResult(exit_code=0, summary=str(options.get("echo", "test tool succeeded")))
