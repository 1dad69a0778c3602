"""The `maw-agent` command.

    maw-agent enroll --server HOST:PORT --token T [--worker NAME]
    maw-agent run [--config agent.yaml] [--server HOST:PORT] [--worker NAME] [--capacity-slots N] ...
    maw-agent run [--config agent.yaml] --print-config
    maw-agent doctor [--config agent.yaml]

Without --config, `run` and `doctor` read the configuration `enroll` wrote in the user config dir
($XDG_CONFIG_HOME/maw-agent/agent.yaml) when there is one.

Flags override the file. Logs go to stderr. SIGTERM (or a first SIGINT) stops gracefully: no new work,
running work finishes within `shutdown_grace_s` or is handed back, Goodbye, exit 0. A second SIGINT (or
SIGTERM) stops at once.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from maw_agent import __version__
from maw_agent._logging import configure_logging
from maw_agent._setup import EnrollError, default_config_path, doctor, enroll, user_config_dir
from maw_agent.agent import Agent
from maw_agent.config import AgentConfig, ConfigError, load_config

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="maw-agent", description="Run AI coding tools for a maw scheduler.")
    parser.add_argument("--version", action="version", version=f"maw-agent {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="connect to the scheduler and run assignments until stopped")
    run.add_argument("--config", "-c", type=Path, help="the YAML configuration file")
    run.add_argument("--server", help="scheduler address, host:port")
    run.add_argument("--credential-file", type=Path, help="file holding the agent credential")
    run.add_argument("--worker", help="the worker name, workers/{worker}")
    run.add_argument("--capacity-slots", type=int, help="assignments run at once")
    run.add_argument("--work-dir", type=Path, help="workspaces and result spool")
    run.add_argument("--tool", action="append", dest="tools", metavar="NAME", help="enable a tool (repeatable)")
    run.add_argument("--label", action="append", dest="labels", metavar="KEY=VALUE", help="a label (repeatable)")
    run.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    run.add_argument("--tls", action=argparse.BooleanOptionalAction, default=None, help="use TLS to the server")
    run.add_argument("--sandbox", choices=["none", "bwrap"], help="how tools are confined (bwrap recommended)")
    run.add_argument("--print-config", action="store_true", help="print the effective configuration and exit")

    join = commands.add_parser("enroll", help="turn this machine into a worker with a one-time enrollment token")
    join.add_argument("--server", required=True, help="the maw gateway (or registry) address, host:port")
    join.add_argument("--token", required=True, help="the one-time enrollment token")
    join.add_argument("--worker", help="the worker id wanted (default: derived from the hostname)")
    join.add_argument("--display-name", default="", help="name shown in the dashboard")
    join.add_argument("--config", "-c", type=Path, help=f"configuration to write (default {default_config_path()})")
    join.add_argument("--credential-file", type=Path, help="where to store the credential (default: next to it)")
    join.add_argument("--tls", action="store_true", help="use TLS to the server")
    join.add_argument("--tls-ca-file", type=Path, help="CA bundle for TLS")

    check = commands.add_parser("doctor", help="check tools, resources, sandbox, server and credential")
    check.add_argument("--config", "-c", type=Path, help="the YAML configuration file")
    check.add_argument("--server", help="check this server instead of the configured one")
    return parser


def _overrides(args: argparse.Namespace, base_labels: dict[str, str] | None) -> dict[str, Any]:
    overrides: dict[str, Any] = {
        "server": args.server,
        "worker": args.worker,
        "capacity_slots": args.capacity_slots,
        "work_dir": args.work_dir,
        "tools": args.tools,
        "log_level": args.log_level,
        "tls": args.tls,
        "sandbox": args.sandbox,
    }
    if args.credential_file is not None:
        overrides["credential_file"] = args.credential_file
    if args.labels:
        labels = dict(base_labels or {})
        for item in args.labels:
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise ConfigError(f"--label: expected KEY=VALUE, got {item!r}")
            labels[key] = value
        overrides["labels"] = labels
    return overrides


def _config_path(args: argparse.Namespace) -> Path | None:
    if args.config is not None:
        return Path(args.config)
    default = default_config_path()
    return default if default.exists() else None


def _load(args: argparse.Namespace) -> AgentConfig:
    drop = ("credential",) if args.credential_file is not None else ()
    path = _config_path(args)
    overrides = _overrides(args, _file_labels(path) if args.labels else None)
    if path is not None:
        # The configuration may hold the credential: a sandboxed tool must not see it either.
        overrides["sandbox_hide"] = [*_file_list(path, "sandbox_hide"), path]
    return load_config(path, overrides=overrides, drop=drop)


def _file_list(path: Path, key: str) -> list[str]:
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return []
    value = raw.get(key) if isinstance(raw, dict) else None
    return [str(item) for item in value] if isinstance(value, list) else []


def _file_labels(path: Path | None) -> dict[str, str]:
    if path is None:
        return {}
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return {}  # load_config reports the problem properly
    labels = raw.get("labels") if isinstance(raw, dict) else None
    return {str(key): str(value) for key, value in labels.items()} if isinstance(labels, dict) else {}


def main(argv: Sequence[str] | None = None) -> int:
    """The console script's entry point; returns the exit code."""
    args = _parser().parse_args(argv)
    if args.command == "enroll":
        return _enroll(args)
    if args.command == "doctor":
        return _doctor(args)
    try:
        config = _load(args)
        if args.print_config:
            sys.stdout.write(yaml.safe_dump(config.redacted(), sort_keys=True))
            return 0
        credential = config.read_credential()
    except ConfigError as exc:
        sys.stderr.write(f"maw-agent: {exc}\n")
        return 2
    configure_logging(config.log_level, config.log_format, [credential], config.log_file)
    try:
        return asyncio.run(_run(config))
    except RuntimeError as exc:
        sys.stderr.write(f"maw-agent: {exc}\n")
        return 1


def _enroll(args: argparse.Namespace) -> int:
    config_file = Path(args.config) if args.config is not None else default_config_path()
    credential_file = args.credential_file or (
        user_config_dir() / "credential" if args.config is None else config_file.with_name("credential")
    )
    try:
        done = asyncio.run(
            enroll(
                server=args.server,
                token=args.token,
                worker=args.worker,
                config_file=config_file,
                credential_file=credential_file,
                tls=args.tls,
                tls_ca_file=args.tls_ca_file,
                display_name=args.display_name,
            )  # fmt: skip
        )
    except (EnrollError, OSError) as exc:
        sys.stderr.write(f"maw-agent: enrollment failed: {exc}\n")
        return 1
    sys.stdout.write(
        f"enrolled as {done.worker}\n"
        f"credential: {done.credential_file} (mode 0600)\n"
        f"configuration: {done.config_file}\n"
        f"tools found: {', '.join(done.tools) or 'none'}\n"
        f"start it with: maw-agent run{'' if args.config is None else f' --config {config_file}'}\n"
    )
    return 0


def _doctor(args: argparse.Namespace) -> int:
    path = _config_path(args)
    config: AgentConfig | None = None
    if path is not None:
        try:
            config = load_config(path)
        except ConfigError as exc:
            sys.stderr.write(f"maw-agent: {exc}\n")
    return asyncio.run(doctor(config, sys.stdout, server=args.server))


async def _run(config: AgentConfig) -> int:
    agent = Agent(config)
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, agent.stop)
    loop.add_signal_handler(signal.SIGINT, agent.stop)
    try:
        return await agent.run()
    finally:
        loop.remove_signal_handler(signal.SIGTERM)
        loop.remove_signal_handler(signal.SIGINT)
