"""maw-agent: runs AI coding tools on a worker node for the maw scheduler (see docs/agent.md).

Programmatic use (the CLI does the same)::

    config = maw_agent.load_config(Path("agent.yaml"))
    agent = maw_agent.Agent(config)
    exit_code = await agent.run()      # until agent.stop() (graceful) or agent.stop(immediate=True)
"""

from __future__ import annotations

__version__ = "0.1.0"

from maw_agent.agent import PROTOCOL_VERSION, Agent  # after __version__: agent.py reads it
from maw_agent.config import AgentConfig, ConfigError, load_config, parse_config

__all__ = ["PROTOCOL_VERSION", "Agent", "AgentConfig", "ConfigError", "__version__", "load_config", "parse_config"]
