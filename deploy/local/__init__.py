"""The local stack behind ``make up`` and the test suite: embedded PostgreSQL and Redis, the three
services, Envoy and a local agent, as supervised child processes. See docs/local-stack.md."""

from .stack import Endpoints, Stack, free_port

__all__ = ["Endpoints", "Stack", "free_port"]
