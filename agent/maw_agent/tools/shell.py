"""`shell`: runs `tool_options["command"]` with `bash -c` in the assignment's working directory.

The exit code is the outcome (0 succeeds). The runtime gives the process its own process group, a
scrubbed environment and the output cap; cancellation and time limits signal the whole group.
"""

from __future__ import annotations

import asyncio
import re
import shutil
from collections.abc import Mapping
from typing import Any

from maw.common.v1 import machine_pb2

from maw_agent.tools.base import ToolAdapter, ToolInfo, ToolResult, ToolRun

_VERSION = re.compile(rb"version ([0-9][^\s(]*)")


class ShellTool(ToolAdapter):
    """A plain command line, for scripted steps (tests, builds, linters)."""

    name = "shell"
    kind = machine_pb2.TOOL_KIND_SHELL

    def __init__(self) -> None:
        self._bash = shutil.which("bash") or "/bin/bash"

    async def detect(self) -> ToolInfo | None:
        try:
            process = await asyncio.create_subprocess_exec(
                self._bash,
                "--version",
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.DEVNULL,
            )
            stdout, _ = await asyncio.wait_for(process.communicate(), timeout=5)
        except (OSError, TimeoutError):
            return None
        match = _VERSION.search(stdout)
        return ToolInfo(version=match.group(1).decode() if match else "", local_only=True, provider="local")

    def check(self, options: Mapping[str, Any]) -> str | None:
        command = options.get("command")
        if not isinstance(command, str) or not command.strip():
            return 'tool_options["command"] must be a non-empty string'
        unknown = sorted(set(options) - {"command"})
        if unknown:
            return f"unknown shell tool option(s): {', '.join(unknown)}"
        return None

    async def run(self, run: ToolRun) -> ToolResult:
        exit_code = await run.run_process([self._bash, "-c", str(run.options["command"])])
        if exit_code == 0:
            return ToolResult(exit_code=0, summary="command succeeded")
        if exit_code < 0:
            return ToolResult(exit_code=exit_code, error_message=f"command killed by signal {-exit_code}")
        return ToolResult(exit_code=exit_code, error_message=f"command exited with code {exit_code}")
