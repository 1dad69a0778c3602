"""The evaluator service: scoring, peer review, correction cycles and human checkpoints."""

from .server import DEFINITION

__all__ = ["DEFINITION"]
