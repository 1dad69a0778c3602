"""The AI tool adapters against stand-ins that speak each tool's real output format.

Formats and invocations (tests/standins/README.md has the full list):
- Claude Code headless `claude -p --output-format stream-json --verbose`: JSON lines system/init,
  assistant, user, result {subtype, is_error, result, num_turns, session_id, total_cost_usd, usage}
  (Claude Code headless docs, summarised at
  https://dev.to/aobaworks/claude-code-output-format-json-fields-jq-python-parsing-3edj).
- Gemini CLI headless `gemini -p ... --output-format json`: one object {response, stats, error}; exit
  codes 0/1/42/53 (https://geminicli.com/docs/cli/headless/).
- Codex CLI `codex exec --json -`: thread.started, turn.started, item.*, turn.completed {usage},
  turn.failed, error (https://raw.githubusercontent.com/openai/codex/main/codex-rs/exec/src/exec_events.rs).
- Ollama HTTP API: NDJSON /api/generate and /api/chat, final line done=true with prompt_eval_count and
  eval_count (https://docs.ollama.com/api/streaming).
"""

from __future__ import annotations

import asyncio
import os
import resource
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from google.protobuf import json_format
from maw.common.v1 import work_pb2
from maw_agent.tools._cli import JsonLines

from tests.standins.harness import Recorder, adapter, execution, run, standins_on_path
from tests.standins.ollama_server import MODELS, VERSION, OllamaStandIn

CLI_TOOLS = ["claude", "gemini", "codex"]


@pytest.fixture(autouse=True)
def _standins(monkeypatch: pytest.MonkeyPatch) -> None:
    standins_on_path(monkeypatch)


@pytest.fixture(scope="module")
def ollama() -> Iterator[OllamaStandIn]:
    with OllamaStandIn() as server:
        yield server


# --- detection ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tool", "version", "provider"),
    [("claude", "1.0.98", "anthropic"), ("gemini", "0.9.0", "google"), ("codex", "0.46.0", "openai")],
)
async def test_a_cli_tool_on_path_is_detected_with_its_version(tool: str, version: str, provider: str) -> None:
    info = await adapter(tool).detect()
    assert info is not None
    assert (info.version, info.provider, info.local_only) == (version, provider, False)


async def test_a_cli_tool_missing_from_path_is_not_offered(monkeypatch: pytest.MonkeyPatch) -> None:
    assert await adapter("claude", {"command": "no-such-claude-binary"}).detect() is None


async def test_ollama_is_detected_with_its_version_and_pulled_models_as_local_only(ollama: OllamaStandIn) -> None:
    info = await adapter("ollama", {"host": ollama.url}).detect()
    assert info is not None
    assert (info.version, list(info.models), info.local_only, info.provider) == (VERSION, MODELS, True, "local")


async def test_an_unreachable_ollama_is_not_offered() -> None:
    assert await adapter("ollama", {"host": "http://127.0.0.1:9", "connect_timeout_s": 1.0}).detect() is None


def test_bad_tool_settings_are_refused_naming_the_key() -> None:
    with pytest.raises(ValueError, match="claude: permission_mode"):
        adapter("claude", {"permission_mode": "yes-to-all"})
    with pytest.raises(ValueError, match="ollama: host"):
        adapter("ollama", {"host": "ftp://x"})
    with pytest.raises(ValueError, match="gemini: colour: unknown setting"):
        adapter("gemini", {"colour": "blue"})


def test_unknown_or_mistyped_tool_options_are_declined() -> None:
    assert "unknown claude tool option" in (adapter("claude").check({"temperature": 1}) or "")
    assert "wrong type" in (adapter("claude").check({"max_turns": "five"}) or "")
    assert "approval_mode" in (adapter("gemini").check({"approval_mode": "always"}) or "")
    assert adapter("codex").check({"sandbox": "read-only", "model": "gpt-5"}) is None
    assert "'api'" in (adapter("ollama").check({"api": "completions"}) or "")


# --- invocations -------------------------------------------------------------------------------------


def test_claude_is_invoked_headless_with_stream_json_and_the_prompt_on_stdin(tmp_path: Path) -> None:
    claude = adapter("claude", {"model": "default-model", "extra_args": ["--add-dir", "/srv"]})
    prompt = "A secret plan that must not be in ps"
    run_ = execution(tmp_path, claude, prompt=prompt, options={"max_turns": 5, "allowed_tools": ["Edit", "Bash"]})
    argv = claude.argv(run_)  # type: ignore[attr-defined]
    assert argv[:5] == ["claude", "-p", "--output-format", "stream-json", "--verbose"]
    assert argv[argv.index("--model") + 1] == "default-model"
    assert argv[argv.index("--max-turns") + 1] == "5"
    assert argv[argv.index("--permission-mode") + 1] == "acceptEdits"
    assert argv[argv.index("--allowedTools") + 1 : argv.index("--allowedTools") + 3] == ["Edit", "Bash"]
    assert argv[-2:] == ["--add-dir", "/srv"]
    assert not any(prompt in arg for arg in argv)


def test_codex_reads_the_prompt_from_stdin_and_gemini_from_p_unless_it_is_too_long(tmp_path: Path) -> None:
    codex = adapter("codex")
    argv = codex.argv(execution(tmp_path, codex))  # type: ignore[attr-defined]
    assert argv[:3] == ["codex", "exec", "--json"] and argv[-1] == "-"
    gemini = adapter("gemini")
    short, stdin = gemini.argv(execution(tmp_path, gemini), "short prompt")  # type: ignore[attr-defined]
    assert short[-2:] == ["-p", "short prompt"] and stdin is None
    assert short[1:3] == ["--output-format", "json"]
    long, stdin = gemini.argv(execution(tmp_path, gemini), "x" * 100_000)  # type: ignore[attr-defined]
    assert stdin == b"x" * 100_000 and "x" * 100_000 not in long


# --- runs --------------------------------------------------------------------------------------------


async def test_claude_success_reports_summary_tokens_cost_progress_and_log_chunks(tmp_path: Path) -> None:
    recorder = Recorder()
    result = await run(execution(tmp_path, adapter("claude"), recorder=recorder))
    assert result.outcome == work_pb2.OUTCOME_SUCCEEDED, result.error_message
    assert result.summary == "Added feature() in feature.py; it returns 42."
    usage = result.token_usage
    assert (usage.input_tokens, usage.cached_input_tokens, usage.output_tokens) == (2000, 500, 60)
    assert (usage.cost_micros, usage.currency_code) == (12_300, "USD")
    assert result.tool_metadata["num_turns"] == 2 and result.tool_metadata["model"] == "claude-sonnet-4-5"
    assert [p.message for p in recorder.progress][-2:] == ["tool Write", "claude finished"]
    assert recorder.progress[-1].percent == 100
    assert b'"type": "result"' in recorder.stdout()


async def test_gemini_success_reports_the_response_and_token_counts(tmp_path: Path) -> None:
    result = await run(execution(tmp_path, adapter("gemini"), recorder=Recorder()))
    assert result.outcome == work_pb2.OUTCOME_SUCCEEDED, result.error_message
    assert result.summary == "Reviewed the change: it looks correct."
    usage = result.token_usage
    assert (usage.input_tokens, usage.output_tokens, usage.cached_input_tokens) == (2400, 160, 1000)
    assert json_format.MessageToDict(result.tool_metadata)["models"] == ["gemini-2.5-pro"]


async def test_codex_success_reports_the_last_agent_message_usage_and_item_progress(tmp_path: Path) -> None:
    recorder = Recorder()
    result = await run(execution(tmp_path, adapter("codex"), recorder=recorder))
    assert result.outcome == work_pb2.OUTCOME_SUCCEEDED, result.error_message
    assert result.summary == "Added codex_feature.py with VALUE = 7."
    usage = result.token_usage
    assert (usage.input_tokens, usage.cached_input_tokens, usage.output_tokens) == (24763, 24448, 122)
    assert "command bash -lc ls" in [p.message for p in recorder.progress]
    assert str(result.tool_metadata["thread_id"]).startswith("0199")


@pytest.mark.parametrize("tool", CLI_TOOLS)
async def test_malformed_output_fails_with_a_message_that_says_so(tmp_path: Path, tool: str) -> None:
    result = await run(execution(tmp_path, adapter(tool), prompt="standin:malformed"))
    assert result.outcome == work_pb2.OUTCOME_FAILED
    assert any(word in result.error_message for word in ("malformed", "did not print a JSON object", "no JSON"))


@pytest.mark.parametrize("tool", CLI_TOOLS)
async def test_a_non_zero_exit_fails_with_the_exit_code(tmp_path: Path, tool: str) -> None:
    result = await run(execution(tmp_path, adapter(tool), prompt="standin:exit=3"))
    assert (result.outcome, result.exit_code) == (work_pb2.OUTCOME_FAILED, 3)
    assert "exit code 3" in result.error_message


@pytest.mark.parametrize(
    ("tool", "message"),
    [("claude", "error_during_execution"), ("gemini", "quota exceeded"), ("codex", "usage limit")],
)
async def test_an_error_reported_by_the_tool_fails_the_run_with_its_message(
    tmp_path: Path, tool: str, message: str
) -> None:
    result = await run(execution(tmp_path, adapter(tool), prompt="standin:fail"))
    assert result.outcome == work_pb2.OUTCOME_FAILED
    assert message in result.error_message


@pytest.mark.parametrize("tool", CLI_TOOLS)
async def test_a_hanging_tool_is_killed_when_its_time_is_up(tmp_path: Path, tool: str) -> None:
    running = execution(tmp_path, adapter(tool), prompt="standin:hang")
    task = asyncio.create_task(run(running))
    while running.process is None:
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.3)
    pid = running.process.pgid
    running.stop(work_pb2.OUTCOME_TIMED_OUT, "attempt deadline passed", grace=0.5)
    result = await task
    assert result.outcome == work_pb2.OUTCOME_TIMED_OUT
    assert result.error_message == "attempt deadline passed"
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


@pytest.mark.parametrize(("tool", "succeeds"), [("claude", True), ("codex", True), ("gemini", False)])
async def test_huge_output_is_capped_and_parsed_in_bounded_memory(tmp_path: Path, tool: str, succeeds: bool) -> None:
    recorder = Recorder()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = await run(
        execution(
            tmp_path,
            adapter(tool),
            prompt="standin:huge",
            recorder=recorder,
            output_limit_bytes=500_000,
            result_output_bytes=2000,
        )  # fmt: skip
    )
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert (result.outcome == work_pb2.OUTCOME_SUCCEEDED) is succeeds, result.error_message
    assert len(recorder.stdout()) == 500_000  # about 40 MB printed; the rest was not streamed
    assert len(result.output) <= 2000 and result.output_truncated
    assert len(result.summary) <= 4000
    assert grown_mib < 64, f"the agent grew by {grown_mib:.0f} MiB for 40 MB of output"
    if not succeeds:
        assert "more than" in result.error_message


def test_event_lines_longer_than_the_cap_are_skipped_without_being_kept() -> None:
    events: list[dict[str, Any]] = []
    lines = JsonLines(events.append, max_line=1000)
    lines.feed(b'{"a": 1}\n{"b": "' + b"x" * 5000)
    assert len(lines._buffer) == 0  # the bound is the point of the test
    lines.feed(b'"}\n{"c"')
    lines.feed(b": 3}")
    lines.close()
    assert events == [{"a": 1}, {"c": 3}]
    assert lines.malformed == 1 and "longer than 1000" in lines.first_malformed


# --- ollama ------------------------------------------------------------------------------------------


async def _ollama_run(tmp_path: Path, server: OllamaStandIn, prompt: str, **options: Any) -> tuple[Any, Recorder]:
    tool = adapter("ollama", {"host": server.url})
    await tool.detect()
    recorder = Recorder()
    result = await run(execution(tmp_path, tool, prompt=prompt, options=options, recorder=recorder))
    return result, recorder


@pytest.mark.parametrize("api", ["generate", "chat"])
async def test_ollama_streams_fragments_as_output_and_reports_token_counts(
    tmp_path: Path, ollama: OllamaStandIn, api: str
) -> None:
    result, recorder = await _ollama_run(tmp_path, ollama, "Say hi", api=api, model="qwen2.5-coder:7b")
    assert result.outcome == work_pb2.OUTCOME_SUCCEEDED, result.error_message
    assert recorder.stdout() == b"That's a"
    assert result.summary == "That's a"
    assert (result.token_usage.input_tokens, result.token_usage.output_tokens) == (26, 3)
    assert result.token_usage.cost_micros == 0
    assert result.tool_metadata["done_reason"] == "stop"


async def test_ollama_with_an_unknown_model_fails_with_the_servers_error(tmp_path: Path, ollama: OllamaStandIn) -> None:
    result, _ = await _ollama_run(tmp_path, ollama, "hi", model="nope:1b")
    assert result.outcome == work_pb2.OUTCOME_FAILED
    assert "HTTP 404" in result.error_message and "model 'nope:1b' not found" in result.error_message


@pytest.mark.parametrize(
    ("prompt", "message"),
    [("standin:malformed", "without a done line (1 malformed"), ("standin:fail", "out of memory")],
)
async def test_ollama_malformed_or_failing_streams_fail_the_run(
    tmp_path: Path, ollama: OllamaStandIn, prompt: str, message: str
) -> None:
    result, _ = await _ollama_run(tmp_path, ollama, prompt)
    assert result.outcome == work_pb2.OUTCOME_FAILED
    assert message in result.error_message


async def test_a_hanging_ollama_request_is_cancelled_when_its_time_is_up(tmp_path: Path, ollama: OllamaStandIn) -> None:
    tool = adapter("ollama", {"host": ollama.url})
    await tool.detect()
    running = execution(tmp_path, tool, prompt="standin:hang")
    task = asyncio.create_task(run(running))
    while running.last_output_time == running.start_time:
        await asyncio.sleep(0.02)
    running.stop(work_pb2.OUTCOME_TIMED_OUT, "no output for 1 s", grace=0.5)
    result = await asyncio.wait_for(task, 5)
    assert result.outcome == work_pb2.OUTCOME_TIMED_OUT


async def test_huge_ollama_output_is_capped(tmp_path: Path, ollama: OllamaStandIn) -> None:
    tool = adapter("ollama", {"host": ollama.url})
    await tool.detect()
    recorder = Recorder()
    result = await run(execution(tmp_path, tool, prompt="standin:huge", recorder=recorder, output_limit_bytes=100_000))
    assert result.outcome == work_pb2.OUTCOME_SUCCEEDED
    assert len(recorder.stdout()) == 100_000
    assert len(result.summary) <= 4000 and result.token_usage.output_tokens == 2000


def test_ollama_host_defaults_to_the_environment_then_localhost(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OLLAMA_HOST", "gpu-box:11434")
    tool = adapter("ollama")
    assert tool.host == "http://gpu-box:11434" and not tool.local_only  # type: ignore[attr-defined]
    monkeypatch.delenv("OLLAMA_HOST")
    assert adapter("ollama").host == "http://127.0.0.1:11434"  # type: ignore[attr-defined]
    assert os.environ.get("OLLAMA_HOST") is None
