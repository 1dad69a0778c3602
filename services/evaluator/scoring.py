"""Combining scorers' measures into an honest scorecard (pure; the scorers themselves may run tools)."""

from __future__ import annotations

import enum
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from maw.evaluator.v1 import resources_pb2 as epb

from .scorers import Dimension, Finding, Measure, Scorer, Severity, Work

_log = logging.getLogger("maw.evaluator.scoring")


class Grade(enum.IntEnum):
    """Grade of an overall score (values equal maw.evaluator.v1.Grade)."""

    UNSPECIFIED = epb.GRADE_UNSPECIFIED
    EXCELLENT = epb.GRADE_EXCELLENT
    GOOD = epb.GRADE_GOOD
    ACCEPTABLE = epb.GRADE_ACCEPTABLE
    POOR = epb.GRADE_POOR
    FAIL = epb.GRADE_FAIL


def grade_of(score: float | None) -> Grade:
    """The grade of an overall score (UNSPECIFIED when nothing was measured)."""
    if score is None:
        return Grade.UNSPECIFIED
    for bound, grade in ((9.0, Grade.EXCELLENT), (7.0, Grade.GOOD), (5.0, Grade.ACCEPTABLE), (3.0, Grade.POOR)):
        if score >= bound:
            return grade
    return Grade.FAIL


DEFAULT_WEIGHTS: dict[Dimension, float] = {
    Dimension.CODE_QUALITY: 0.25,
    Dimension.COMPLETENESS: 0.30,
    Dimension.SECURITY: 0.20,
    Dimension.ARCHITECTURE: 0.15,
    Dimension.TESTABILITY: 0.10,
}


@dataclass
class DimensionResult:
    """One dimension of a scorecard."""

    dimension: Dimension
    measured: bool = False
    score: float = 0.0
    weight: float = 0.0
    scorers: list[str] = field(default_factory=list)
    evidence: list[Finding] = field(default_factory=list)
    summary: str = "not measured"


@dataclass
class Scorecard:
    """Every dimension (measured or not), the overall score and its grade, and scorers that broke."""

    dimensions: list[DimensionResult]
    overall: float | None
    grade: Grade
    broken: list[str] = field(default_factory=list)

    @property
    def strengths(self) -> list[str]:
        """Measured dimensions scoring ≥ 8."""
        return [f"{d.dimension.name.lower()}: {d.summary}" for d in self.dimensions if d.measured and d.score >= 8]

    @property
    def weaknesses(self) -> list[str]:
        """Measured dimensions scoring < 6."""
        return [f"{d.dimension.name.lower()}: {d.summary}" for d in self.dimensions if d.measured and d.score < 6]

    def findings(self, min_severity: Severity = Severity.LOW) -> list[Finding]:
        """Every finding at or above ``min_severity``, worst first."""
        found = [f for d in self.dimensions for f in d.evidence if f.severity >= min_severity]
        return sorted(found, key=lambda f: (-f.severity, f.path, f.line))


def combine(measures: Sequence[tuple[str, Measure]], weights: Mapping[Dimension, float]) -> Scorecard:
    """The scorecard of (scorer name, measure) pairs under ``weights`` (any non-negative numbers)."""
    results = {d: DimensionResult(d) for d in Dimension}
    for name, m in measures:
        r = results[m.dimension]
        score = max(0.0, min(10.0, float(m.score)))
        if not r.measured or score < r.score:
            r.score, r.summary = score, m.summary
        r.measured = True
        r.scorers.append(name)
        r.evidence.extend(m.findings)
    measured = [r for r in results.values() if r.measured and weights.get(r.dimension, 0.0) > 0]
    total = sum(weights.get(r.dimension, 0.0) for r in measured)
    overall = None
    if measured and total > 0:
        for r in measured:
            r.weight = weights[r.dimension] / total
        overall = round(sum(r.score * r.weight for r in measured), 1)
    return Scorecard(list(results.values()), overall, grade_of(overall))


def run_scorers(
    work: Work, scorers: Mapping[str, Scorer], names: Sequence[str] = ()
) -> tuple[list[tuple[str, Measure]], list[str]]:
    """Run the named scorers (all when ``names`` is empty) on ``work``: (measures, names that broke).

    A scorer that raises is reported as broken and measures nothing; it never takes the others down.
    """
    chosen = [scorers[n] for n in names if n in scorers] if names else list(scorers.values())
    measures: list[tuple[str, Measure]] = []
    broken: list[str] = []
    for scorer in chosen:
        try:
            measures.extend((scorer.name, m) for m in scorer.score(work))
        except Exception:  # a broken scorer must not lose the evaluation
            _log.exception("scorer %s failed", scorer.name)
            broken.append(scorer.name)
    return measures, broken


def evaluate(
    work: Work, scorers: Mapping[str, Scorer], weights: Mapping[Dimension, float], names: Sequence[str] = ()
) -> Scorecard:
    """Score ``work`` with the chosen scorers and combine the measures."""
    measures, broken = run_scorers(work, scorers, names)
    card = combine(measures, weights)
    card.broken = broken
    return card


__all__ = ["DEFAULT_WEIGHTS", "DimensionResult", "Grade", "Scorecard", "combine", "evaluate", "grade_of", "run_scorers"]
