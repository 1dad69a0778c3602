"""The scheduler service: tasks, decomposition, the subtask DAG, allocation, leases and the agent streams."""

from .server import DEFINITION

__all__ = ["DEFINITION"]
