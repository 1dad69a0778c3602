"""Voting rounds' pure rules: their states, solution names and order, the expected count, cards and instructions."""

from __future__ import annotations

import re
from collections.abc import Sequence

from maw.evaluator.v1 import evaluation_intake_service_pb2 as ipb
from maw.evaluator.v1 import resources_pb2 as epb

from . import voting_store
from .reviews import RANKING_FORMAT
from .scorers import Dimension, Finding, Severity
from .scoring import DimensionResult, Scorecard, grade_of
from .tally import Method

COLLECTING, VOTING, DECIDED = epb.VOTING_STATE_COLLECTING, epb.VOTING_STATE_VOTING, epb.VOTING_STATE_DECIDED
TIED, OVERRIDDEN = epb.VOTING_STATE_TIED, epb.VOTING_STATE_OVERRIDDEN
_ALT = re.compile(r"-alt-(\d+)$")
LABELS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def key_of(name: str) -> str:
    """`tasks/{task}/subtasks/{subtask}` → subtask key."""
    return name.rsplit("/", 1)[-1]


def ordinal_of(key: str, logical: str) -> int:
    """0 for the logical subtask, i for its competitor `<key>-alt-<i>` (scheduler/voting.py names them)."""
    if key == logical:
        return 0
    match = _ALT.search(key)
    return int(match.group(1)) if match else 0


def expected_solutions(registration: ipb.RegisterTaskRequest | None, logical: str, fallback: int) -> int:
    """How many solutions compete for ``logical``: the logical subtask and its `-alt-<i>` competitors as
    decomposed (the scheduler fixed them at creation), else the policy's number."""
    if registration is None:
        return fallback
    keys = {s.key for s in registration.subtasks}
    count = 1
    while alt_key(logical, count) in keys:
        count += 1
    return count if count > 1 else fallback


def alt_key(key: str, i: int) -> str:
    """The key of the ``i``-th competitor of ``key`` (as scheduler/voting.py names it)."""
    suffix = f"-alt-{i}"
    return key[: 63 - len(suffix)] + suffix


def method_of(policy: epb.Policy) -> Method:
    """The policy's vote method (WEIGHTED when unspecified)."""
    return Method.MAJORITY if policy.voting.method == epb.VOTE_METHOD_MAJORITY else Method.WEIGHTED


def card_of(evaluation: epb.Evaluation) -> Scorecard:
    """A stored evaluation back as a scorecard (to decide on a winner's score after the vote)."""
    known = {int(d) for d in Dimension}
    dims = [
        DimensionResult(
            Dimension(d.dimension),
            d.measured,
            d.score,
            d.weight,
            list(d.scorers),
            [
                Finding(f.path, f.line, Severity(f.severity or Severity.MEDIUM), f.message, f.rule, f.scorer)
                for f in d.evidence
            ],
            d.summary,
        )  # fmt: skip
        for d in evaluation.dimensions
        if d.dimension in known
    ]
    overall = evaluation.overall_score if evaluation.grade != epb.GRADE_UNSPECIFIED else None
    return Scorecard(dims, overall, grade_of(overall))


def ranking_instructions(round_: epb.VotingRound, usable: Sequence[voting_store.SolutionRow], task: str) -> str:
    """What each ranking reviewer is asked (the scheduler adds each solution's change)."""
    lines = [
        f"{len(usable)} agents solved the same subtask ({key_of(round_.subtask)}) independently. Compare their"
        " solutions and rank them, best first. Do not change any file.",
        "The solutions, by label:",
        *(f"- {s.label}: {key_of(s.subtask)}" for s in usable),
    ]
    if task:
        lines += ["", "The task:", task[:8000]]
    lines += [
        "",
        "Answer with exactly one JSON object (alone, or in a ```json fenced block) as the LAST thing you print,",
        'e.g. {"ranking": ["B", "A"], "summary": "why"}.',
        RANKING_FORMAT,
    ]
    return "\n".join(lines)


__all__ = [
    "COLLECTING",
    "DECIDED",
    "LABELS",
    "OVERRIDDEN",
    "TIED",
    "VOTING",
    "alt_key",
    "card_of",
    "expected_solutions",
    "key_of",
    "method_of",
    "ordinal_of",
    "ranking_instructions",
]
