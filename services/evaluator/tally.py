"""Counting a voting round: which competing solution continues (pure)."""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field

from maw.evaluator.v1 import resources_pb2 as epb


class Method(enum.IntEnum):
    """How votes combine (values equal maw.evaluator.v1.VoteMethod)."""

    MAJORITY = epb.VOTE_METHOD_MAJORITY
    WEIGHTED = epb.VOTE_METHOD_WEIGHTED


@dataclass(frozen=True)
class Entry:
    """One competing solution as the tally sees it."""

    label: str
    score: float | None
    usable: bool = True


@dataclass
class Placed:
    """A solution's place after the count."""

    label: str
    rank: int
    points: float
    first_choices: int
    votes: dict[int, int] = field(default_factory=dict)  # ballot index → the place that ballot gave it


@dataclass
class Outcome:
    """The ranking (best first), the winner's label (None when tied or nothing usable), and why, in words."""

    placed: list[Placed]
    winner: str | None
    reason: str


def valid_ballot(ranking: Sequence[str], compared: Sequence[str]) -> bool:
    """Whether a ranking names every compared solution exactly once (and nothing else)."""
    return len(ranking) == len(compared) and set(ranking) == set(compared)


def _score_key(score: float | None) -> tuple[int, float]:
    return (0, 0.0) if score is None else (1, score)


def tally(entries: Sequence[Entry], ballots: Sequence[Sequence[str]], method: Method = Method.WEIGHTED) -> Outcome:
    """Rank ``entries`` from the reviewers' ``ballots`` (each a ranking of usable labels, best first)."""
    usable = [e for e in entries if e.usable]
    compared = [e.label for e in usable]
    valid = [(i, list(b)) for i, b in enumerate(ballots) if valid_ballot(b, compared)]
    n = len(compared)
    placed = {e.label: Placed(e.label, 0, 0.0, 0) for e in usable}
    for i, ballot in valid:
        for place, label in enumerate(ballot, start=1):
            placed[label].votes[i] = place
            if place == 1:
                placed[label].first_choices += 1
            if method == Method.WEIGHTED:
                placed[label].points += n - place
    score_of = {e.label: e.score for e in usable}
    for label, p in placed.items():
        if method == Method.WEIGHTED:
            p.points = round(p.points + (score_of[label] or 0.0) / 10.0, 4)
        else:
            p.points = float(p.first_choices)

    def key(p: Placed) -> tuple[float, tuple[int, float], int]:
        if not valid:
            return (0.0, _score_key(score_of[p.label]), 0)
        if method == Method.MAJORITY:
            return (float(p.first_choices), _score_key(score_of[p.label]), 0)
        return (p.points, _score_key(score_of[p.label]), p.first_choices)

    order = sorted(placed.values(), key=key, reverse=True)
    failed = [Placed(e.label, 0, 0.0, 0) for e in entries if not e.usable]
    ranked = order + failed
    for place, p in enumerate(ranked, start=1):
        p.rank = place
    basis = "score alone (no valid vote)" if not valid else f"{len(valid)} valid of {len(ballots)} rankings"
    method_word = "by score" if not valid else method.name.lower()
    if not order:
        return Outcome(ranked, None, "no solution is usable (every one failed)")
    if len(order) > 1 and key(order[0]) == key(order[1]):
        return Outcome(ranked, None, f"tie between {order[0].label} and {order[1].label} ({basis}); a person decides")
    best = order[0]
    reason = f"{best.label} wins {method_word}: {basis}"
    if len(order) > 1:
        first, second = key(order[0]), key(order[1])
        if first[0] == second[0]:
            reason += (
                "; the tie was broken by the evaluation score"
                if first[1] != second[1]
                else ("; the tie was broken by first-choice votes")
            )
    if len(usable) == 1 and len(entries) > 1:
        reason = f"{best.label} is the only usable solution"
    return Outcome(ranked, best.label, reason)


__all__ = ["Entry", "Method", "Outcome", "Placed", "tally", "valid_ballot"]
