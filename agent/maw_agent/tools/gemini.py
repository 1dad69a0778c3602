"""`gemini`: Google Gemini CLI in non-interactive (headless) mode with JSON output.

Invocation: `gemini --output-format json [--model M] [--approval-mode MODE] -p <prompt>`; a prompt too
long for the command line goes to standard input instead (headless mode appends `-p` to what it reads
there), with a short `-p` pointing at it.

Output: one JSON object on standard output when the run ends: `{"response": "...", "stats": {"models":
{"<model>": {"api": {"totalRequests", "totalErrors", "totalLatencyMs"}, "tokens": {"prompt",
"candidates", "total", "cached", "thoughts", "tool"}}}, "tools": {...}, "files": {"totalLinesAdded",
"totalLinesRemoved"}}, "error": {"type", "message", "code"}}` (`error` only when it failed). Exit codes:
0 success, 1 general or API error, 42 input error, 53 turn limit exceeded. The CLI reports no progress
while it works, so progress is "started" and "finished"; the CLI gives no cost.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from maw.common.v1 import machine_pb2, work_pb2

from maw_agent.tools._cli import (
    CliSettings,
    detect_cli,
    full_prompt,
    number,
    obj,
    option_problem,
    string,
    text_cap,
)
from maw_agent.tools.base import ToolAdapter, ToolInfo, ToolResult, ToolRun

_APPROVAL_MODES = ("default", "auto_edit", "yolo")
_OPTIONS: dict[str, type] = {"model": str, "approval_mode": str}
# Longest prompt passed with -p; longer ones go to standard input.
_ARGV_PROMPT_BYTES = 64 << 10
# Longest JSON document parsed (the response plus stats); beyond it the output is not kept.
_MAX_DOCUMENT_BYTES = 16 << 20
_EXIT_CODES = {42: "input error (invalid prompt or arguments)", 53: "turn limit exceeded"}


class GeminiCliTool(ToolAdapter):
    """Gemini CLI in headless mode (`gemini -p ... --output-format json`)."""

    name = "gemini"
    kind = machine_pb2.TOOL_KIND_GEMINI_CLI

    def __init__(self) -> None:
        self.settings = CliSettings(command="gemini", options={"approval_mode": "auto_edit"})

    def configure(self, settings: Mapping[str, Any]) -> None:
        parsed = CliSettings.parse("gemini", settings, {"approval_mode": str})
        mode = parsed.options.setdefault("approval_mode", "auto_edit")
        if mode not in _APPROVAL_MODES:
            raise ValueError(f"approval_mode: must be one of {', '.join(_APPROVAL_MODES)}")
        self.settings = parsed

    async def detect(self) -> ToolInfo | None:
        return await detect_cli(self.settings, "google")

    def check(self, options: Mapping[str, Any]) -> str | None:
        if problem := option_problem("gemini", options, _OPTIONS):
            return problem
        if options.get("approval_mode", "auto_edit") not in _APPROVAL_MODES:
            return f"gemini tool option 'approval_mode' must be one of {', '.join(_APPROVAL_MODES)}"
        return None

    def argv(self, run: ToolRun, prompt: str) -> tuple[list[str], bytes | None]:
        """The command line and standard input for one assignment."""
        argv = [self.settings.command, "--output-format", "json"]
        model = run.assignment.tool.model or str(run.options.get("model", "")) or self.settings.model
        if model:
            argv += ["--model", model]
        argv += ["--approval-mode", str(run.options.get("approval_mode", self.settings.options["approval_mode"]))]
        argv += self.settings.extra_args
        if len(prompt.encode()) <= _ARGV_PROMPT_BYTES:
            return [*argv, "-p", prompt], None
        return [*argv, "-p", "Follow the instructions above."], prompt.encode()

    async def run(self, run: ToolRun) -> ToolResult:
        argv, stdin = self.argv(run, full_prompt(run.assignment))
        document = _Document()
        run.progress(1, "gemini started")
        exit_code = await run.run_process(argv, stdin=stdin, on_stdout=document.feed)
        return document.result(run, exit_code)


class _Document:
    """Standard output, kept up to a bound, parsed as one JSON object at the end."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.too_big = False

    def feed(self, piece: bytes) -> None:
        if self.too_big:
            return
        if len(self.data) + len(piece) > _MAX_DOCUMENT_BYTES:
            self.too_big = True
            self.data.clear()
            return
        self.data += piece

    def result(self, run: ToolRun, exit_code: int) -> ToolResult:
        meaning = _EXIT_CODES.get(exit_code, "")
        if self.too_big:
            return ToolResult(
                exit_code=exit_code or 1,
                succeeded=False,
                error_message=f"gemini printed more than {_MAX_DOCUMENT_BYTES} bytes; output not parsed",
            )
        try:
            parsed = json.loads(self.data) if self.data.strip() else None
        except (ValueError, RecursionError):
            parsed = None
        if not isinstance(parsed, dict):
            start = bytes(self.data[:200]).decode("utf-8", errors="replace")
            why = "gemini did not print a JSON object" + (f" (got {start!r})" if start.strip() else "")
            if exit_code:
                why += f"; exit code {exit_code}" + (f": {meaning}" if meaning else "")
            return ToolResult(exit_code=exit_code or 1, succeeded=False, error_message=why)
        metadata: dict[str, Any] = {}
        tokens = work_pb2.TokenUsage()
        stats = obj(parsed.get("stats"))
        models = obj(stats.get("models"))
        for model, figures in models.items():
            counts = figures.get("tokens") if isinstance(figures, dict) else None
            if not isinstance(counts, dict):
                continue
            tokens.input_tokens += number(counts.get("prompt"))
            tokens.output_tokens += number(counts.get("candidates")) + number(counts.get("thoughts"))
            tokens.cached_input_tokens += number(counts.get("cached"))
            metadata.setdefault("models", []).append(str(model))
        files = obj(stats.get("files"))
        for key in ("totalLinesAdded", "totalLinesRemoved"):
            if key in files:
                metadata[key] = number(files[key])
        response = string(parsed.get("response"))
        error = parsed.get("error")
        if isinstance(error, dict) or exit_code != 0:
            message = error.get("message") if isinstance(error, dict) else ""
            why = f"gemini failed: {message or meaning or f'exit code {exit_code}'}"
            if isinstance(error, dict) and error.get("type"):
                metadata["error_type"] = str(error["type"])
            return ToolResult(
                exit_code=exit_code or 1,
                succeeded=False,
                error_message=why,
                summary=text_cap(response),
                metadata=metadata,
                token_usage=tokens,
            )
        run.progress(100, "gemini finished")
        return ToolResult(exit_code=0, summary=text_cap(response), metadata=metadata, token_usage=tokens)
