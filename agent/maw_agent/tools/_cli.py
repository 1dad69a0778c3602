"""Pieces the command-line AI tool adapters share: finding the command, its version, settings, JSON lines.

Private to `maw_agent.tools` (the package skips `_` modules when it looks for adapters).
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from maw.agent.v1 import agent_service_pb2 as agent_pb2

from maw_agent.tools.base import ToolInfo

__all__ = ["CliSettings", "JsonLines", "cli_version", "full_prompt", "number", "text_cap"]

_VERSION = re.compile(r"(\d+\.\d+(?:\.\d+)?(?:[-+.][0-9A-Za-z.]+)?)")
# The longest event line parsed; a longer one is counted as malformed and skipped without being kept.
MAX_LINE_BYTES = 4 << 20
SUMMARY_CHARS = 4000


@dataclass
class CliSettings:
    """`tool_settings.<tool>` of a command-line tool: which command, default model, extra arguments."""

    command: str
    model: str = ""
    extra_args: list[str] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, default_command: str, settings: Mapping[str, Any], known: Mapping[str, type]) -> CliSettings:
        """Validated settings; raises ValueError naming the key."""
        parsed = cls(command=default_command)
        for key, value in settings.items():
            if key == "command":
                if not isinstance(value, str) or not value:
                    raise ValueError("command: must be a non-empty string")
                parsed.command = value
            elif key == "model":
                if not isinstance(value, str):
                    raise ValueError("model: must be a string")
                parsed.model = value
            elif key == "extra_args":
                if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
                    raise ValueError("extra_args: must be a list of strings")
                parsed.extra_args = list(value)
            elif key in known:
                if not isinstance(value, known[key]) or (isinstance(value, bool) and known[key] is not bool):
                    raise ValueError(f"{key}: must be {known[key].__name__}")
                parsed.options[key] = value
            else:
                allowed = ", ".join(sorted({"command", "model", "extra_args", *known}))
                raise ValueError(f"{key}: unknown setting (known: {allowed})")
        return parsed


async def cli_version(command: str, args: Sequence[str] = ("--version",), limit_s: float = 10.0) -> ToolInfo | None:
    """Run `command --version`; None when the command is not on PATH or does not answer."""
    path = shutil.which(command)
    if path is None:
        return None
    try:
        process = await asyncio.create_subprocess_exec(
            path,
            *args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
        )
    except OSError:
        return None
    try:
        stdout, _ = await asyncio.wait_for(process.communicate(), limit_s)
    except TimeoutError:
        process.kill()
        await process.wait()
        return None
    if process.returncode != 0:
        return None
    match = _VERSION.search(stdout.decode("utf-8", errors="replace"))
    return ToolInfo(version=match.group(1) if match else "")


class JsonLines:
    """Splits a byte stream into lines and hands each JSON object to `on_event`; memory stays bounded.

    A line that is not a JSON object, or is longer than `max_line` bytes, is counted in `malformed`
    (and its first bytes kept in `first_malformed` for the error message) and otherwise ignored.
    """

    def __init__(self, on_event: Callable[[dict[str, Any]], None], max_line: int = MAX_LINE_BYTES) -> None:
        self._on_event = on_event
        self._max_line = max_line
        self._buffer = bytearray()
        self._skipping = False
        self.events = 0
        self.malformed = 0
        self.first_malformed = ""

    def feed(self, data: bytes) -> None:
        """Take the next piece of output."""
        start = 0
        while True:
            end = data.find(b"\n", start)
            if end < 0:
                self._append(data[start:])
                return
            self._append(data[start:end])
            self._line_done()
            start = end + 1

    def close(self) -> None:
        """The stream ended; a last line without a newline still counts."""
        if self._buffer or self._skipping:
            self._line_done()

    def _append(self, piece: bytes) -> None:
        if self._skipping:
            return
        if len(self._buffer) + len(piece) > self._max_line:
            self._skipping = True
            self._buffer.clear()
            return
        self._buffer += piece

    def _line_done(self) -> None:
        if self._skipping:
            self._skipping = False
            self._bad(f"a line longer than {self._max_line} bytes")
            return
        line = bytes(self._buffer).strip()
        self._buffer.clear()
        if not line:
            return
        try:
            event = json.loads(line)
        except (ValueError, RecursionError):
            self._bad(line[:200].decode("utf-8", errors="replace"))
            return
        if not isinstance(event, dict):
            self._bad(line[:200].decode("utf-8", errors="replace"))
            return
        self.events += 1
        self._on_event(event)

    def _bad(self, what: str) -> None:
        self.malformed += 1
        if not self.first_malformed:
            self.first_malformed = what


def text_cap(text: str, limit: int = SUMMARY_CHARS) -> str:
    """`text` cut to `limit` characters (with a mark when cut)."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def number(value: Any) -> int:
    """An integer from a JSON value that should be a count (anything else counts as 0)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return 0
    return max(0, int(value))


def full_prompt(assignment: agent_pb2.Assignment) -> str:
    """The prompt for an AI tool: the assignment's instructions, what the dependencies did, and what a
    correction must fix (their diffs are already applied to a git workspace)."""
    parts = [assignment.prompt or assignment.display_name or assignment.key]
    done = [dep for dep in assignment.context.dependencies if dep.summary]
    if done:
        lines = [f"- {dep.display_name or dep.key}: {text_cap(dep.summary, 1000)}" for dep in done]
        parts.append("## Done before this step\n" + "\n".join(lines))
    if assignment.HasField("correction"):
        correction = assignment.correction
        lines = [f"## Correction {correction.cycle}: fix what the reviewers found"]
        if correction.previous_summary:
            lines.append(f"Previous attempt: {text_cap(correction.previous_summary, 1000)}")
        for feedback in correction.feedback:
            if feedback.text:
                lines.append(f"- {feedback.text}")
            for finding in feedback.findings:
                where = f"{finding.path}:{finding.line}" if finding.line else finding.path
                lines.append(f"  - {where}: {finding.message}" if where else f"  - {finding.message}")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def obj(value: Any) -> dict[str, Any]:
    """`value` when it is a JSON object, else an empty one (event fields are never trusted)."""
    return value if isinstance(value, dict) else {}


def string(value: Any) -> str:
    """`value` when it is a JSON string, else ""."""
    return value if isinstance(value, str) else ""


def option_problem(tool: str, options: Mapping[str, Any], known: Mapping[str, type | tuple[type, ...]]) -> str | None:
    """The first unknown or mistyped key of an assignment's tool options, in words (None when all fit)."""
    for key, value in options.items():
        if key not in known:
            return f"unknown {tool} tool option {key!r}; known: {', '.join(sorted(known))}"
        if not isinstance(value, known[key]):
            return f"{tool} tool option {key!r} has the wrong type {type(value).__name__}"
    return None


async def detect_cli(settings: CliSettings, provider: str) -> ToolInfo | None:
    """What a cloud command-line tool reports about itself, or None when its command is not here."""
    found = await cli_version(settings.command)
    if found is None:
        return None
    models = [settings.model] if settings.model else []
    return ToolInfo(version=found.version, models=models, local_only=False, provider=provider)
