"""The agent's configuration: a YAML file with `${ENV}` substitution, validated, then CLI overrides.

Substitution happens on the parsed YAML's string values (never on the raw text, so a variable's value
cannot change the document's structure): `${NAME}` is the variable's value and an error naming the key
when it is not set, `${NAME:-default}` falls back to `default` when it is unset or empty, and `$$` is a
literal `$`. Validation errors name the key (`capacity_slots: Input should be greater than 0`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

from maw_agent.tools import adapter_names, adapters

__all__ = ["AgentConfig", "ConfigError", "LimitsConfig", "load_config", "parse_config", "substitute_env"]

_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_HOST_PORT = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):([0-9]{1,5})$")
_WORKER = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")


class ConfigError(ValueError):
    """The configuration is unusable; the message names each offending key."""


class LimitsConfig(BaseModel):
    """Default operating-system limits of every tool process (an assignment's own limits win); 0 = none."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    cpu_s: int = Field(default=0, ge=0, description="CPU seconds (RLIMIT_CPU).")
    memory_bytes: int = Field(default=0, ge=0, description="Address space (RLIMIT_AS).")
    file_size_bytes: int = Field(default=0, ge=0, description="Largest file written (RLIMIT_FSIZE).")
    max_processes: int = Field(default=0, ge=0, description="Processes of the user (RLIMIT_NPROC; not for root).")


class AgentConfig(BaseModel):
    """Everything the agent reads from its configuration. Seconds are floats; sizes are bytes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    server: str = Field(description="The scheduler (or gateway) address, host:port.")
    credential: SecretStr | None = Field(default=None, description="The agent credential (from enrollment).")
    credential_file: Path | None = Field(default=None, description="A file holding the credential.")
    worker: str = Field(description="The worker this agent is: `workers/{worker}` or just `{worker}`.")
    labels: dict[str, str] = Field(default_factory=dict, description="Labels offered to allocation.")
    capacity_slots: int = Field(default=1, ge=1, le=1024, description="Assignments run at once.")
    privacy_level: Literal["normal", "sensitive"] = "normal"
    tools: list[str] = Field(default_factory=lambda: ["shell"], description="Tool adapters enabled.")
    work_dir: Path = Field(default=Path("~/.local/share/maw-agent"), description="Workspaces and the result spool.")
    keep_workspaces: bool = False
    heartbeat_interval_s: float | None = Field(
        default=None, gt=0, description="Overrides Welcome.heartbeat_interval when set."
    )
    handshake_timeout_s: float = Field(default=10.0, gt=0, description="Longest wait for Welcome.")
    reconnect_initial_s: float = Field(default=0.5, gt=0)
    reconnect_max_s: float = Field(default=30.0, gt=0)
    healthy_session_s: float = Field(default=10.0, ge=0, description="A session this long resets the backoff.")
    tls: bool = False
    tls_ca_file: Path | None = None
    tls_server_name: str | None = None
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["text", "json"] = "text"
    log_file: Path | None = Field(default=None, description="Also log to this file (rotated at 10 MiB, 3 kept).")
    shutdown_grace_s: float = Field(default=30.0, ge=0, description="SIGTERM: time to finish running work.")
    result_ack_wait_s: float = Field(default=5.0, ge=0, description="SIGTERM: time to get finished results acked.")
    cancel_grace_s: float = Field(default=10.0, ge=0, description="SIGTERM→SIGKILL when Cancel gives none.")
    output_limit_bytes: int = Field(default=8 << 20, ge=0, description="Tool output streamed as log chunks.")
    result_output_bytes: int = Field(default=64 << 10, ge=0, description="Tail of the output kept in Result.")
    flush_interval_ms: float = Field(default=2.0, ge=0, le=1000, description="Outgoing batch window.")
    max_batch_items: int = Field(default=500, ge=1, description="Used when Welcome sets no limit.")
    spool_fsync: bool = Field(default=True, description="fsync the result spool before sending results.")
    env_allowlist: list[str] = Field(default_factory=list, description="Agent variables every tool may see.")
    tool_settings: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="Per-tool settings, e.g. claude: {command: ..., model: ...}."
    )
    sandbox: Literal["none", "bwrap"] = Field(
        default="none", description="bwrap (recommended): tools in a bubblewrap container; none: rlimits only."
    )
    sandbox_network: bool = Field(default=True, description="bwrap: share the network (cloud AI tools need it).")
    sandbox_hide: list[Path] = Field(default_factory=list, description="bwrap: more files the tools must not see.")
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    max_diff_bytes: int = Field(default=4 << 20, ge=1024, description="Used when an assignment sets no limit.")
    git_timeout_s: float = Field(default=600.0, gt=0, description="Longest clone or fetch of a workspace.")

    @field_validator("server")
    @classmethod
    def _server_is_host_port(cls, value: str) -> str:
        match = _HOST_PORT.match(value)
        if not match or not 0 < int(match.group(2)) < 65536:
            raise ValueError("must be host:port, e.g. scheduler.example.com:443")
        return value

    @field_validator("worker")
    @classmethod
    def _worker_name(cls, value: str) -> str:
        bare = value.removeprefix("workers/")
        if not _WORKER.match(bare):
            raise ValueError("must be workers/{worker} with a lowercase letter/digit/dash id")
        return f"workers/{bare}"

    @field_validator("tools")
    @classmethod
    def _known_tools(cls, value: list[str]) -> list[str]:
        known = adapter_names()
        unknown = [name for name in value if name not in known]
        if unknown:
            raise ValueError(f"unknown tool(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return list(dict.fromkeys(value))

    @field_validator("work_dir", "credential_file", "tls_ca_file")
    @classmethod
    def _expand_user(cls, value: Path | None) -> Path | None:
        return value.expanduser() if value is not None else None

    @field_validator("sandbox_hide")
    @classmethod
    def _expand_users(cls, value: list[Path]) -> list[Path]:
        return [path.expanduser() for path in value]

    @field_validator("tool_settings")
    @classmethod
    def _tool_settings(cls, value: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        known = adapter_names()
        unknown = [name for name in value if name not in known]
        if unknown:
            raise ValueError(f"unknown tool(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        adapters(list(value), value)  # raises ValueError("<tool>: <key>: why")
        return value

    @model_validator(mode="after")
    def _one_credential(self) -> AgentConfig:
        if (self.credential is None) == (self.credential_file is None):
            raise ValueError("set exactly one of credential and credential_file")
        if self.reconnect_max_s < self.reconnect_initial_s:
            raise ValueError("reconnect_max_s must not be below reconnect_initial_s")
        return self

    def read_credential(self) -> str:
        """The credential itself (from the file when one is configured)."""
        if self.credential is not None:
            return self.credential.get_secret_value()
        assert self.credential_file is not None
        try:
            text = self.credential_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(f"credential_file: cannot read {self.credential_file}: {exc.strerror}") from None
        if not text:
            raise ConfigError(f"credential_file: {self.credential_file} is empty")
        return text

    def redacted(self) -> dict[str, Any]:
        """The effective configuration as plain data, credential masked (for --print-config)."""
        data = self.model_dump(mode="json")
        if data.get("credential") is not None:
            data["credential"] = "[REDACTED]"
        return data


def substitute_env(value: Any, env: Mapping[str, str], path: str = "") -> Any:
    """Replace `${NAME}` / `${NAME:-default}` in every string of a parsed YAML tree."""
    if isinstance(value, dict):
        return {key: substitute_env(item, env, _join(path, str(key))) for key, item in value.items()}
    if isinstance(value, list):
        return [substitute_env(item, env, f"{path}[{index}]") for index, item in enumerate(value)]
    if not isinstance(value, str):
        return value

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, default = match.group(1), match.group(2)
        found = env.get(name)
        if default is not None:
            return found if found else default
        if found is None:
            raise ConfigError(f"{path or '<root>'}: environment variable {name} is not set (use ${{{name}:-default}})")
        return found

    return _VAR.sub(replace, value)


def parse_config(
    text: str,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    drop: Collection[str] = (),
    source: str = "<config>",
) -> AgentConfig:
    """Parse YAML text, substitute the environment, apply overrides (CLI flags) and validate.

    Overrides that are None are ignored; keys in `drop` are removed from the file first (a
    `--credential-file` flag replaces a `credential` in the file).
    """
    try:
        raw = yaml.safe_load(text) if text.strip() else {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of keys to values")
    data = substitute_env({k: v for k, v in raw.items() if k not in drop}, os.environ if env is None else env)
    for key, value in (overrides or {}).items():
        if value is not None:
            data[key] = value
    try:
        return AgentConfig.model_validate(data)
    except ValidationError as exc:
        lines = [f"{_location(error['loc'])}: {error['msg'].removeprefix('Value error, ')}" for error in exc.errors()]
        raise ConfigError(f"{source}: invalid configuration:\n  " + "\n  ".join(lines)) from None


def load_config(
    path: Path | None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    drop: Collection[str] = (),
) -> AgentConfig:
    """Read and validate a configuration file (none: flags and defaults only)."""
    if path is None:
        return parse_config("", env=env, overrides=overrides, drop=drop, source="<flags>")
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    return parse_config(text, env=env, overrides=overrides, drop=drop, source=str(path))


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _location(loc: tuple[int | str, ...]) -> str:
    parts = [str(part) for part in loc]
    return ".".join(parts) if parts else "<root>"
