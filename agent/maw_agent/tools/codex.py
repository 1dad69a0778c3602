"""`codex`: OpenAI Codex CLI in `exec` mode with JSON events.

Invocation: `codex exec --json --skip-git-repo-check --sandbox MODE [--model M] -`, the prompt on
standard input (`-`).

Output: one JSON event per line (codex-rs/exec/src/exec_events.rs): `{"type": "thread.started",
"thread_id"}`, `{"type": "turn.started"}`, `{"type": "item.started" | "item.updated" | "item.completed",
"item": {"id", "type": "agent_message" | "reasoning" | "command_execution" | "file_change" |
"mcp_tool_call" | "web_search" | "todo_list" | "error", ...}}`, `{"type": "turn.completed", "usage":
{"input_tokens", "cached_input_tokens", "output_tokens"}}`, `{"type": "turn.failed", "error":
{"message"}}`, `{"type": "error", "message"}`.

Every started item becomes a Progress; the last agent message is the summary; usage is summed over
turns (Codex reports no cost). A run succeeds when it exits 0 with a completed turn and no failed one.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from maw.common.v1 import machine_pb2, work_pb2

from maw_agent.tools._cli import (
    CliSettings,
    JsonLines,
    detect_cli,
    full_prompt,
    number,
    obj,
    option_problem,
    text_cap,
)
from maw_agent.tools.base import ToolAdapter, ToolInfo, ToolResult, ToolRun

_SANDBOXES = ("read-only", "workspace-write", "danger-full-access")
_OPTIONS: dict[str, type] = {"model": str, "sandbox": str}


class CodexCliTool(ToolAdapter):
    """Codex CLI (`codex exec --json`)."""

    name = "codex"
    kind = machine_pb2.TOOL_KIND_CODEX_CLI

    def __init__(self) -> None:
        self.settings = CliSettings(command="codex", options={"sandbox": "workspace-write"})

    def configure(self, settings: Mapping[str, Any]) -> None:
        parsed = CliSettings.parse("codex", settings, {"sandbox": str})
        if parsed.options.setdefault("sandbox", "workspace-write") not in _SANDBOXES:
            raise ValueError(f"sandbox: must be one of {', '.join(_SANDBOXES)}")
        self.settings = parsed

    async def detect(self) -> ToolInfo | None:
        return await detect_cli(self.settings, "openai")

    def check(self, options: Mapping[str, Any]) -> str | None:
        if problem := option_problem("codex", options, _OPTIONS):
            return problem
        if options.get("sandbox", "workspace-write") not in _SANDBOXES:
            return f"codex tool option 'sandbox' must be one of {', '.join(_SANDBOXES)}"
        return None

    def argv(self, run: ToolRun) -> list[str]:
        """The command line for one assignment (the prompt goes to stdin)."""
        argv = [self.settings.command, "exec", "--json", "--skip-git-repo-check"]
        argv += ["--sandbox", str(run.options.get("sandbox", self.settings.options["sandbox"]))]
        model = run.assignment.tool.model or str(run.options.get("model", "")) or self.settings.model
        if model:
            argv += ["--model", model]
        return [*argv, *self.settings.extra_args, "-"]

    async def run(self, run: ToolRun) -> ToolResult:
        stream = _CodexStream(run)
        lines = JsonLines(stream.event)
        exit_code = await run.run_process(
            self.argv(run), stdin=full_prompt(run.assignment).encode(), on_stdout=lines.feed
        )
        lines.close()
        return stream.result(exit_code, lines)


class _CodexStream:
    def __init__(self, run: ToolRun) -> None:
        self.run = run
        self.metadata: dict[str, Any] = {}
        self.tokens = work_pb2.TokenUsage()
        self.items = 0
        self.turns_completed = 0
        self.failure = ""
        self.last_message = ""

    def event(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        item = obj(event.get("item"))
        if kind == "thread.started" and isinstance(event.get("thread_id"), str):
            self.metadata["thread_id"] = event["thread_id"]
            self.run.progress(1, "codex started")
        elif kind == "item.started":
            self.items += 1
            what = item.get("type", "item")
            if what == "command_execution" and isinstance(item.get("command"), str):
                what = f"command {text_cap(item['command'], 100)}"
            self.run.progress(min(95, 5 + 3 * self.items), str(what))
        elif kind == "item.completed":
            if item.get("type") == "agent_message" and isinstance(item.get("text"), str):
                self.last_message = item["text"]
            elif item.get("type") == "error" and isinstance(item.get("message"), str):
                self.failure = self.failure or item["message"]
        elif kind == "turn.completed":
            self.turns_completed += 1
            usage = obj(event.get("usage"))
            self.tokens.input_tokens += number(usage.get("input_tokens"))
            self.tokens.cached_input_tokens += number(usage.get("cached_input_tokens"))
            self.tokens.output_tokens += number(usage.get("output_tokens"))
        elif kind == "turn.failed":
            error = obj(event.get("error"))
            self.failure = str(error.get("message") or "turn failed")
        elif kind == "error" and isinstance(event.get("message"), str):
            self.failure = self.failure or event["message"]

    def result(self, exit_code: int, lines: JsonLines) -> ToolResult:
        metadata = dict(self.metadata, turns=self.turns_completed)
        if lines.malformed:
            metadata["malformed_lines"] = lines.malformed
        summary = text_cap(self.last_message)
        if exit_code == 0 and self.turns_completed and not self.failure:
            self.run.progress(100, "codex finished")
            return ToolResult(exit_code=0, summary=summary, metadata=metadata, token_usage=self.tokens)
        if self.failure:
            why = f"codex failed: {text_cap(self.failure, 1000)}"
        elif not lines.events:
            why = "codex printed no JSON events"
            if lines.malformed:
                why += f" ({lines.malformed} malformed line(s), first: {lines.first_malformed!r})"
        else:
            why = "codex ended without a completed turn"
        if exit_code:
            why += f"; exit code {exit_code}"
        return ToolResult(
            exit_code=exit_code or 1,
            succeeded=False,
            error_message=why,
            summary=summary,
            metadata=metadata,
            token_usage=self.tokens,
        )
