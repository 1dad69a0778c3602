"""`python -m maw_agent run --config agent.yaml` is `maw-agent run --config agent.yaml`."""

from maw_agent.cli import main

raise SystemExit(main())
