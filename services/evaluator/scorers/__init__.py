"""Scorers: one small interface (:class:`Scorer`), registered by name, one scorer per file (docs/evaluation.md)."""

from ._base import Dimension, Finding, Measure, Scorer, Severity, Work, register, registered, unregister
from .bandit import BanditScorer
from .ruff import RuffScorer
from .secrets import SecretsScorer
from .size import SizeScorer
from .tests_present import TestsPresentScorer

__all__ = [
    "BanditScorer",
    "Dimension",
    "Finding",
    "Measure",
    "RuffScorer",
    "Scorer",
    "SecretsScorer",
    "Severity",
    "SizeScorer",
    "TestsPresentScorer",
    "Work",
    "register",
    "registered",
    "unregister",
]
