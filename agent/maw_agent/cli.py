"""The `maw-agent` command.

    maw-agent run --config agent.yaml [--server HOST:PORT] [--worker NAME] [--capacity-slots N] ...
    maw-agent run --config agent.yaml --print-config

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
    run.add_argument("--print-config", action="store_true", help="print the effective configuration and exit")
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


def _load(args: argparse.Namespace) -> AgentConfig:
    drop = ("credential",) if args.credential_file is not None else ()
    if not args.labels:
        return load_config(args.config, overrides=_overrides(args, None), drop=drop)
    # --label adds to (and may override single) labels of the file.
    file_labels = _file_labels(args.config)
    return load_config(args.config, overrides=_overrides(args, file_labels), drop=drop)


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
    try:
        config = _load(args)
        if args.print_config:
            sys.stdout.write(yaml.safe_dump(config.redacted(), sort_keys=True))
            return 0
        credential = config.read_credential()
    except ConfigError as exc:
        sys.stderr.write(f"maw-agent: {exc}\n")
        return 2
    configure_logging(config.log_level, config.log_format, [credential])
    return asyncio.run(_run(config))


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
