"""`claude`: Anthropic Claude Code, headless, with its streaming JSON output.

Invocation: `claude -p --output-format stream-json --verbose [--model M] [--max-turns N]
[--permission-mode MODE] [--allowedTools T ...]`, the prompt on standard input (never on the command
line, so it neither hits the argument size limit nor shows in `ps`).

Output: one JSON object per line. `{"type": "system", "subtype": "init", "session_id", "model", "tools",
...}` first; `{"type": "assistant", "message": {"content": [{"type": "text", "text"} | {"type":
"tool_use", "name", "input"}], "usage": {...}}}` and `{"type": "user", ...}` (tool results) while it works;
last `{"type": "result", "subtype": "success" | "error_max_turns" | "error_during_execution", "is_error",
"result", "num_turns", "duration_ms", "duration_api_ms", "session_id", "total_cost_usd", "usage":
{"input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens", "output_tokens"}}`.

Each tool use becomes a Progress (percent from turns used of `max_turns`, else a slow estimate below
95); the result event gives the summary, token usage and cost. No result event, a result that is an
error, or a non-zero exit fails the run.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from maw.common.v1 import machine_pb2, work_pb2

from maw_agent.tools._cli import CliSettings, JsonLines, detect_cli, full_prompt, number, obj, text_cap
from maw_agent.tools.base import ToolAdapter, ToolInfo, ToolResult, ToolRun

_PERMISSION_MODES = ("default", "acceptEdits", "bypassPermissions", "plan")
_OPTIONS: dict[str, type | tuple[type, ...]] = {
    "model": str,
    "max_turns": int,
    "permission_mode": str,
    "allowed_tools": list,
    "append_system_prompt": str,
}


class ClaudeCodeTool(ToolAdapter):
    """Claude Code in headless mode (`claude -p --output-format stream-json`)."""

    name = "claude"
    kind = machine_pb2.TOOL_KIND_CLAUDE_CODE

    def __init__(self) -> None:
        self.settings = CliSettings(command="claude", options={"permission_mode": "acceptEdits"})

    def configure(self, settings: Mapping[str, Any]) -> None:
        parsed = CliSettings.parse("claude", settings, {"permission_mode": str, "max_turns": int})
        mode = parsed.options.setdefault("permission_mode", "acceptEdits")
        if mode not in _PERMISSION_MODES:
            raise ValueError(f"permission_mode: must be one of {', '.join(_PERMISSION_MODES)}")
        self.settings = parsed

    async def detect(self) -> ToolInfo | None:
        return await detect_cli(self.settings, "anthropic")

    def check(self, options: Mapping[str, Any]) -> str | None:
        for key, value in options.items():
            wanted = _OPTIONS.get(key)
            if wanted is None:
                return f"unknown claude tool option {key!r}; known: {', '.join(sorted(_OPTIONS))}"
            if isinstance(value, bool) or not isinstance(value, wanted if wanted is not int else (int, float)):
                return f"claude tool option {key!r} has the wrong type {type(value).__name__}"
        if "permission_mode" in options and options["permission_mode"] not in _PERMISSION_MODES:
            return f"claude tool option 'permission_mode' must be one of {', '.join(_PERMISSION_MODES)}"
        if "max_turns" in options and int(options["max_turns"]) < 1:
            return "claude tool option 'max_turns' must be at least 1"
        if "allowed_tools" in options and not all(isinstance(t, str) for t in options["allowed_tools"]):
            return "claude tool option 'allowed_tools' must be a list of strings"
        return None

    def argv(self, run: ToolRun) -> list[str]:
        """The command line for one assignment (the prompt goes to stdin)."""
        options = run.options
        argv = [self.settings.command, "-p", "--output-format", "stream-json", "--verbose"]
        model = run.assignment.tool.model or str(options.get("model", "")) or self.settings.model
        if model:
            argv += ["--model", model]
        max_turns = options.get("max_turns", self.settings.options.get("max_turns"))
        if max_turns:
            argv += ["--max-turns", str(int(max_turns))]
        argv += ["--permission-mode", str(options.get("permission_mode", self.settings.options["permission_mode"]))]
        if options.get("allowed_tools"):
            argv += ["--allowedTools", *[str(tool) for tool in options["allowed_tools"]]]
        if options.get("append_system_prompt"):
            argv += ["--append-system-prompt", str(options["append_system_prompt"])]
        return [*argv, *self.settings.extra_args]

    async def run(self, run: ToolRun) -> ToolResult:
        max_turns = run.options.get("max_turns", self.settings.options.get("max_turns"))
        stream = _ClaudeStream(run, int(max_turns) if max_turns else 0)
        lines = JsonLines(stream.event)
        exit_code = await run.run_process(
            self.argv(run), stdin=full_prompt(run.assignment).encode(), on_stdout=lines.feed
        )
        lines.close()
        return stream.result(exit_code, lines)


class _ClaudeStream:
    """The state of one Claude Code event stream."""

    def __init__(self, run: ToolRun, max_turns: int) -> None:
        self.run = run
        self.max_turns = max_turns
        self.metadata: dict[str, Any] = {}
        self.turns = 0
        self.last_text = ""
        self.final: dict[str, Any] | None = None

    def event(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if kind == "system" and event.get("subtype") == "init":
            for key in ("session_id", "model", "permissionMode", "cwd"):
                if isinstance(event.get(key), str):
                    self.metadata[key] = event[key]
            self.run.progress(1, f"claude started ({self.metadata.get('model', 'default model')})")
        elif kind == "assistant":
            self.turns += 1
            message = event.get("message")
            content = message.get("content") if isinstance(message, dict) else None
            for block in content if isinstance(content, list) else []:
                if not isinstance(block, dict):
                    continue
                if block.get("type") == "text" and isinstance(block.get("text"), str):
                    self.last_text = block["text"]
                elif block.get("type") == "tool_use":
                    self.run.progress(self._percent(), f"tool {block.get('name', '?')}")
        elif kind == "result":
            self.final = event

    def _percent(self) -> int:
        if self.max_turns:
            return min(95, 100 * self.turns // self.max_turns)
        return min(95, 5 + 3 * self.turns)

    def result(self, exit_code: int, lines: JsonLines) -> ToolResult:
        metadata = dict(self.metadata)
        if lines.malformed:
            metadata["malformed_lines"] = lines.malformed
        final = self.final
        if final is None:
            why = "claude ended without a result event"
            if lines.malformed:
                why += f" ({lines.malformed} malformed line(s), first: {lines.first_malformed!r})"
            if exit_code:
                why += f"; exit code {exit_code}"
            return ToolResult(exit_code=exit_code or 1, succeeded=False, error_message=why, metadata=metadata)
        for key in ("subtype", "num_turns", "duration_ms", "duration_api_ms", "session_id"):
            if isinstance(final.get(key), str | int | float) and not isinstance(final.get(key), bool):
                metadata[key] = final[key]
        text = final.get("result") if isinstance(final.get("result"), str) else self.last_text
        usage = obj(final.get("usage"))
        cached = number(usage.get("cache_read_input_tokens"))
        tokens = work_pb2.TokenUsage(
            input_tokens=number(usage.get("input_tokens")) + number(usage.get("cache_creation_input_tokens")) + cached,
            output_tokens=number(usage.get("output_tokens")),
            cached_input_tokens=cached,
            currency_code="USD",
        )
        cost = final.get("total_cost_usd")
        if isinstance(cost, int | float) and not isinstance(cost, bool) and cost >= 0:
            tokens.cost_micros = round(cost * 1_000_000)
        failed = bool(final.get("is_error")) or final.get("subtype") != "success" or exit_code != 0
        if failed:
            why = f"claude {final.get('subtype', 'error')}: {text_cap(str(text or ''), 1000)}".rstrip(": ")
            if exit_code:
                why += f" (exit code {exit_code})"
            return ToolResult(
                exit_code=exit_code or 1,
                succeeded=False,
                error_message=why,
                summary=text_cap(str(text or "")),
                metadata=metadata,
                token_usage=tokens,
            )
        self.run.progress(100, "claude finished")
        return ToolResult(exit_code=0, summary=text_cap(str(text or "")), metadata=metadata, token_usage=tokens)
