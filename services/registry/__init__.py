"""The registry service: users, roles, tokens, agent enrollment, the worker catalog, presence and the activity log."""

from .server import DEFINITION

__all__ = ["DEFINITION"]
