"""The one small interface every scorer implements, and the registry of scorers by name."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Protocol

from maw.common.v1 import work_pb2
from maw.evaluator.v1 import resources_pb2 as epb

from ..diffs import ChangedFile


class Dimension(enum.IntEnum):
    """A quality dimension (values equal maw.evaluator.v1.Dimension)."""

    CODE_QUALITY = epb.DIMENSION_CODE_QUALITY
    COMPLETENESS = epb.DIMENSION_COMPLETENESS
    SECURITY = epb.DIMENSION_SECURITY
    ARCHITECTURE = epb.DIMENSION_ARCHITECTURE
    TESTABILITY = epb.DIMENSION_TESTABILITY


class Severity(enum.IntEnum):
    """How bad a finding is (values equal maw.common.v1.Severity)."""

    INFO = work_pb2.SEVERITY_INFO
    LOW = work_pb2.SEVERITY_LOW
    MEDIUM = work_pb2.SEVERITY_MEDIUM
    HIGH = work_pb2.SEVERITY_HIGH
    CRITICAL = work_pb2.SEVERITY_CRITICAL


@dataclass(frozen=True)
class Finding:
    """One piece of evidence: where, how bad, what, and which rule said so."""

    path: str
    line: int
    severity: Severity
    message: str
    rule: str = ""
    scorer: str = ""


@dataclass(frozen=True)
class Work:
    """What a scorer judges: the changed files of one result, and what was asked."""

    files: tuple[ChangedFile, ...]
    subtask_type: int = 0
    instructions: str = ""
    summary: str = ""

    def python_sources(self) -> list[ChangedFile]:
        """Changed Python files that still exist."""
        return [f for f in self.files if f.path.endswith(".py") and not f.deleted]


@dataclass(frozen=True)
class Measure:
    """A scorer's score for one dimension (0–10), with its evidence."""

    dimension: Dimension
    score: float
    summary: str
    findings: tuple[Finding, ...] = field(default_factory=tuple)


class Scorer(Protocol):
    """A scorer: a name (what policies list) and a function from work to measures.

    Return no measure for a dimension you could not judge (e.g. no Python file to lint): an
    unmeasured dimension is left out of the overall score, never counted as perfect. ``score`` runs
    in a worker thread, so it may block (run a subprocess) but must not touch the event loop.
    """

    name: str

    def score(self, work: Work) -> list[Measure]:
        """The measures of ``work``."""
        ...


_REGISTRY: dict[str, Scorer] = {}


def register(scorer: Scorer) -> Scorer:
    """Make ``scorer`` available under ``scorer.name`` (a later one of the same name replaces it)."""
    _REGISTRY[scorer.name] = scorer
    return scorer


def unregister(name: str) -> None:
    """Remove the scorer called ``name`` (tests use it to clean up)."""
    _REGISTRY.pop(name, None)


def registered() -> dict[str, Scorer]:
    """Every registered scorer, by name."""
    return dict(_REGISTRY)


def penalised(findings: list[Finding], per_severity: dict[Severity, float]) -> float:
    """10 minus the penalty of each finding by severity, clamped to 0–10."""
    return max(0.0, min(10.0, 10.0 - sum(per_severity.get(f.severity, 1.0) for f in findings)))
