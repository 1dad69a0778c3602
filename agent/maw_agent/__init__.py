"""maw-agent: runs AI coding tools on a worker node for the maw scheduler (see docs/packaging.md)."""
