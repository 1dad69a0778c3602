"""`ollama`: a local model through Ollama's HTTP API, streaming. Runs in the agent's process.

Host: `tool_settings.ollama.host`, else `$OLLAMA_HOST`, else http://127.0.0.1:11434. Detection asks
`GET /api/version` ({"version"}) and `GET /api/tags` ({"models": [{"name"}, ...]}); the tool is local-only
(fit for sensitive work) when the host is a loopback address.

A run is `POST /api/generate` {"model", "prompt", "stream": true, ["system", "options"]} (or, with
tool option `api: chat`, `POST /api/chat` {"model", "messages": [...], "stream": true}). The answer is
NDJSON: `{"model", "created_at", "response": "<fragment>", "done": false}` (chat: `"message": {"role",
"content"}`) per fragment, then `{"done": true, "done_reason", "total_duration", "prompt_eval_count",
"eval_count", ...}`; a failure is `{"error": "..."}` (with an HTTP error status, or inside the stream).

Fragments are the tool's output (log chunks, capped by the runtime); token counts come from the last
line; local models cost nothing. Ollama writes no files: an assignment's git workspace is not prepared.
"""

from __future__ import annotations

import ipaddress
import json
import os
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from maw.common.v1 import machine_pb2, work_pb2

from maw_agent.tools._cli import JsonLines, full_prompt, number, option_problem, text_cap
from maw_agent.tools._http import HttpError, request
from maw_agent.tools.base import ToolAdapter, ToolInfo, ToolResult, ToolRun

DEFAULT_HOST = "http://127.0.0.1:11434"
_OPTIONS: dict[str, type] = {"model": str, "api": str, "system": str, "options": dict}
_SETTINGS: dict[str, type] = {"host": str, "model": str, "connect_timeout_s": float}
_ERROR_BODY_BYTES = 4096


class OllamaTool(ToolAdapter):
    """A model served by Ollama, through its HTTP API."""

    name = "ollama"
    kind = machine_pb2.TOOL_KIND_OLLAMA
    needs_workdir = False

    def __init__(self) -> None:
        self.host = os.environ.get("OLLAMA_HOST") or DEFAULT_HOST
        self.model = ""
        self.connect_timeout_s = 5.0
        self.models: list[str] = []

    def configure(self, settings: Mapping[str, Any]) -> None:
        for key, value in settings.items():
            wanted = _SETTINGS.get(key)
            if wanted is None:
                raise ValueError(f"{key}: unknown setting (known: {', '.join(sorted(_SETTINGS))})")
            if isinstance(value, bool) or not isinstance(value, (int, float) if wanted is float else wanted):
                raise ValueError(f"{key}: must be {wanted.__name__}")
        host = str(settings.get("host") or os.environ.get("OLLAMA_HOST") or DEFAULT_HOST)
        if "://" not in host:
            host = f"http://{host}"
        parts = urlsplit(host)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"host: must be http(s)://host[:port], got {host!r}")
        self.host = host.rstrip("/")
        self.model = str(settings.get("model", ""))
        self.connect_timeout_s = float(settings.get("connect_timeout_s", 5.0))

    @property
    def local_only(self) -> bool:
        """Whether the host is this machine (a loopback address or localhost)."""
        hostname = urlsplit(self.host).hostname or ""
        if hostname == "localhost":
            return True
        try:
            return ipaddress.ip_address(hostname).is_loopback
        except ValueError:
            return False

    async def detect(self) -> ToolInfo | None:
        try:
            version = await self._get_json("/api/version")
            tags = await self._get_json("/api/tags")
        except (HttpError, ValueError):
            return None
        listed = tags.get("models")
        if not isinstance(listed, list):
            listed = []
        self.models = [str(m["name"]) for m in listed if isinstance(m, dict) and isinstance(m.get("name"), str)]
        return ToolInfo(
            version=str(version.get("version", "")),
            models=self.models,
            local_only=self.local_only,
            provider="local" if self.local_only else "ollama",
        )

    async def _get_json(self, path: str) -> dict[str, Any]:
        response = await request("GET", self.host + path, limit_s=self.connect_timeout_s)
        try:
            if response.status != 200:
                raise HttpError(f"GET {path}: HTTP {response.status}")
            data = json.loads(await response.read(1 << 20))
        finally:
            response.close()
        if not isinstance(data, dict):
            raise ValueError(f"GET {path}: not a JSON object")
        return data

    def check(self, options: Mapping[str, Any]) -> str | None:
        if problem := option_problem("ollama", options, _OPTIONS):
            return problem
        if options.get("api", "generate") not in ("generate", "chat"):
            return "ollama tool option 'api' must be 'generate' or 'chat'"
        return None

    def payload(self, run: ToolRun) -> tuple[str, dict[str, Any]]:
        """The endpoint path and request body for one assignment."""
        options = run.options
        model = run.assignment.tool.model or str(options.get("model", "")) or self.model
        if not model and self.models:
            model = self.models[0]
        prompt = full_prompt(run.assignment)
        body: dict[str, Any] = {"model": model, "stream": True}
        if options.get("api") == "chat":
            messages = [{"role": "system", "content": options["system"]}] if options.get("system") else []
            body["messages"] = [*messages, {"role": "user", "content": prompt}]
            path = "/api/chat"
        else:
            body["prompt"] = prompt
            if options.get("system"):
                body["system"] = options["system"]
            path = "/api/generate"
        if options.get("options"):
            body["options"] = dict(options["options"])
        return path, body

    async def run(self, run: ToolRun) -> ToolResult:
        path, body = self.payload(run)
        if not body["model"]:
            return ToolResult(exit_code=1, succeeded=False, error_message="no ollama model given and none is pulled")
        predict = body.get("options", {}).get("num_predict")
        stream = _OllamaStream(run, int(predict) if isinstance(predict, int | float) and predict > 0 else 0)
        run.progress(1, f"ollama {body['model']} started")
        try:
            response = await request("POST", self.host + path, body, limit_s=self.connect_timeout_s)
        except HttpError as exc:
            return ToolResult(exit_code=1, succeeded=False, error_message=f"ollama: {exc}")
        try:
            if response.status != 200:
                text = (await response.read(_ERROR_BODY_BYTES)).decode("utf-8", errors="replace")
                return ToolResult(
                    exit_code=1, succeeded=False, error_message=f"ollama: HTTP {response.status}: {_error_of(text)}"
                )
            lines = JsonLines(stream.event)
            async for piece in response.body():
                lines.feed(piece)
            lines.close()
        except HttpError as exc:
            return stream.result(lines_broken=str(exc))
        finally:
            response.close()
        return stream.result(malformed=lines.malformed, first_malformed=lines.first_malformed)


class _OllamaStream:
    def __init__(self, run: ToolRun, num_predict: int) -> None:
        self.run = run
        self.num_predict = num_predict
        self.fragments = 0
        self.head: list[str] = []
        self.head_chars = 0
        self.final: dict[str, Any] | None = None
        self.error = ""

    def event(self, event: dict[str, Any]) -> None:
        if isinstance(event.get("error"), str):
            self.error = event["error"]
            return
        message = event.get("message")
        text = message.get("content") if isinstance(message, dict) else event.get("response")
        if isinstance(text, str) and text:
            self.run.output(work_pb2.LOG_STREAM_STDOUT, text.encode())
            if self.head_chars < 4000:
                self.head.append(text)
                self.head_chars += len(text)
            self.fragments += 1
            if self.fragments % 32 == 0:
                if self.num_predict:
                    percent = min(95, 100 * self.fragments // self.num_predict)
                else:
                    percent = min(95, 5 + self.fragments // 50)
                self.run.progress(percent, f"{self.fragments} tokens")
        if event.get("done") is True:
            self.final = event

    def result(self, *, malformed: int = 0, first_malformed: str = "", lines_broken: str = "") -> ToolResult:
        summary = text_cap("".join(self.head))
        metadata: dict[str, Any] = {"fragments": self.fragments}
        if malformed:
            metadata["malformed_lines"] = malformed
        final = self.final
        if self.error or final is None:
            if self.error:
                why = f"ollama: {self.error}"
            elif lines_broken:
                why = f"ollama: the stream broke off: {lines_broken}"
            else:
                why = "ollama: the stream ended without a done line"
                if malformed:
                    why += f" ({malformed} malformed line(s), first: {first_malformed!r})"
            return ToolResult(exit_code=1, succeeded=False, error_message=why, summary=summary, metadata=metadata)
        for key in ("model", "done_reason", "total_duration", "eval_duration"):
            if isinstance(final.get(key), str | int) and not isinstance(final.get(key), bool):
                metadata[key] = final[key]
        tokens = work_pb2.TokenUsage(
            input_tokens=number(final.get("prompt_eval_count")), output_tokens=number(final.get("eval_count"))
        )
        self.run.progress(100, "ollama finished")
        return ToolResult(exit_code=0, summary=summary, metadata=metadata, token_usage=tokens)


def _error_of(text: str) -> str:
    try:
        data = json.loads(text)
    except ValueError:
        return text_cap(text.strip(), 500) or "no body"
    if isinstance(data, dict) and isinstance(data.get("error"), str):
        return str(data["error"])
    return text_cap(text.strip(), 500)
