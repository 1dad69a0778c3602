"""The one small interface every tool adapter implements, and what the runtime hands an adapter.

An adapter is one file in this package defining one `ToolAdapter` subclass; the package finds it by
itself (see `maw_agent.tools`), so adding a tool touches nothing else. The adapter builds the tool's
invocation and reads its output; the runtime owns everything around it: the slot, the fresh working
directory, the scrubbed environment, time limits, cancellation (process-group signals), log chunks, the
Result and its delivery.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

from maw.agent.v1 import agent_service_pb2 as agent_pb2
from maw.common.v1 import machine_pb2, work_pb2

__all__ = ["ToolAdapter", "ToolInfo", "ToolResult", "ToolRun"]


@dataclass(frozen=True)
class ToolInfo:
    """What Hello advertises about an installed tool."""

    version: str = ""
    models: Sequence[str] = ()
    local_only: bool = True
    provider: str = "local"
    max_concurrency: int = 0


@dataclass
class ToolResult:
    """What the adapter reports when the tool has finished on its own.

    `succeeded` None means "exit code 0". Cancellation and time limits are the runtime's business: it
    overrides the outcome when it stopped the tool.
    """

    exit_code: int = 0
    succeeded: bool | None = None
    summary: str = ""
    error_message: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)
    token_usage: work_pb2.TokenUsage | None = None


class ToolRun(Protocol):
    """The runtime's side of one assignment, as an adapter sees it."""

    @property
    def assignment(self) -> agent_pb2.Assignment:
        """The assignment being run."""

    @property
    def options(self) -> Mapping[str, Any]:
        """`Assignment.tool_options` as plain Python values."""

    @property
    def workdir(self) -> Path | None:
        """The fresh working directory (None for adapters that declare `needs_workdir = False`)."""

    @property
    def env(self) -> Mapping[str, str]:
        """The scrubbed environment for the tool's process."""

    def output(self, stream: work_pb2.LogStream.ValueType, data: bytes) -> None:
        """Report tool output; it becomes log chunks (capped) and the Result's output tail."""

    def progress(self, percent: int, message: str = "") -> None:
        """Report progress, 0 to 100."""

    def note(self, text: str) -> None:
        """A line from the agent itself in the assignment's log (LOG_STREAM_AGENT)."""

    async def run_process(
        self,
        argv: Sequence[str],
        *,
        stdin: bytes | None = None,
        on_stdout: Callable[[bytes], None] | None = None,
    ) -> int:
        """Run argv in its own process group, in `workdir` with `env`, piping its output to `output`.

        `stdin` is written to the process's standard input (then closed; none: /dev/null), so prompts
        never travel on the command line. `on_stdout` sees every piece of standard output as it comes
        (for adapters that parse an event stream), whether or not the log-chunk cap has been reached.
        The runtime applies the sandbox (rlimits, bubblewrap) to the process.

        Returns the exit code (negative signal number when killed). Cancel and time limits signal the
        process group; the call returns once the process has exited and its output is drained.
        """


class ToolAdapter(abc.ABC):
    """One kind of tool. Subclasses set `name` (the configuration's name) and `kind`."""

    name: ClassVar[str]
    kind: ClassVar[machine_pb2.ToolKind.ValueType]
    # Whether the runtime prepares a fresh working directory for each assignment.
    needs_workdir: ClassVar[bool] = True

    @abc.abstractmethod
    async def detect(self) -> ToolInfo | None:
        """Find the tool on this machine; None when it is not usable here."""

    def configure(self, settings: Mapping[str, Any]) -> None:
        """Take this adapter's section of the configuration (`tool_settings.<name>`).

        Raises ValueError naming the offending key; the configuration is then refused. The default
        accepts no settings at all.
        """
        if settings:
            raise ValueError(f"tool {self.name} takes no settings (got {', '.join(sorted(settings))})")

    def check(self, options: Mapping[str, Any]) -> str | None:
        """Why these tool options cannot be run (the assignment is Declined as UNSUPPORTED), or None."""
        return None

    @abc.abstractmethod
    async def run(self, run: ToolRun) -> ToolResult:
        """Run the tool for one assignment until it finishes."""
