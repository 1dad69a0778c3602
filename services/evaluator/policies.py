"""Policies as protos: the default, the overlay rule, validation, and the domain view of a policy."""

from __future__ import annotations

import math
from datetime import timedelta

from google.protobuf import duration_pb2
from maw.common.v1 import work_pb2
from maw.evaluator.v1 import resources_pb2 as epb

from .judgement import Frequency, Rules, Trigger
from .scorers import Dimension, registered
from .scoring import DEFAULT_WEIGHTS

DEFAULT_NAME = "policies/default"
MAX_REVIEWERS = 5  # per result and per voting round; the scheduler creates at most this many (scheduler/reviews.py)
MAX_SOLUTIONS = 10  # competing solutions per voted subtask (scheduler/voting.py)
_FREQUENCIES = {int(f) for f in Frequency}
_NOT_REVIEWED = {work_pb2.SUBTASK_TYPE_UNSPECIFIED, work_pb2.SUBTASK_TYPE_REVIEW}
_SUBTASK_TYPES = frozenset(work_pb2.SubtaskType.values()) - _NOT_REVIEWED
# FREQUENCY is off in the built-in default (a task that sets its own checkpoint_frequency turns it on, see
# overlay): on by default it would stop every task four times for a person. ERROR is off too: a subtask failing
# for good fails its task unless the task's policy asks for ERROR (then a person decides). docs/evaluation.md.
# Peer review is off too (reviewers=0): it doubles AI spend and needs a second worker or tool; a task asks for
# it with policy.peer_review.reviewers, an admin may turn it on for everyone with UpdatePolicy(policies/default).
_DEFAULT_TRIGGERS = [
    epb.CHECKPOINT_TRIGGER_LOW_SCORE,
    epb.CHECKPOINT_TRIGGER_ESCALATION,
    epb.CHECKPOINT_TRIGGER_TIME_BUDGET,
    epb.CHECKPOINT_TRIGGER_MANUAL,
]


def default_policy() -> epb.Policy:
    """The built-in `policies/default` (used until someone updates it)."""
    budget = duration_pb2.Duration()
    budget.FromTimedelta(timedelta(hours=24))
    return epb.Policy(
        name=DEFAULT_NAME,
        weights=[epb.DimensionWeight(dimension=int(d), weight=w) for d, w in DEFAULT_WEIGHTS.items()],  # type: ignore[arg-type]
        acceptance_threshold=5.0,
        review_threshold=7.0,
        max_correction_cycles=3,
        checkpoint_frequency=work_pb2.CHECKPOINT_FREQUENCY_MEDIUM,
        triggers=_DEFAULT_TRIGGERS,
        time_budget=budget,
        peer_review=epb.PeerReviewPolicy(reviewers=0),  # off: see the comment above
        voting=epb.VotingPolicy(),
    )


def overlay(base: epb.Policy, given: epb.Policy) -> epb.Policy:
    """``base`` with every non-zero field of ``given`` replacing it (the proto's overlay rule)."""
    out = epb.Policy()
    out.CopyFrom(base)
    if given.weights:
        del out.weights[:]
        out.weights.extend(given.weights)
    for scalar in ("acceptance_threshold", "review_threshold", "max_correction_cycles", "checkpoint_frequency"):
        value = getattr(given, scalar)
        if value:
            setattr(out, scalar, value)
    if given.triggers:
        del out.triggers[:]
        out.triggers.extend(given.triggers)
    elif given.checkpoint_frequency and epb.CHECKPOINT_TRIGGER_FREQUENCY not in out.triggers:
        out.triggers.append(epb.CHECKPOINT_TRIGGER_FREQUENCY)  # asking for a frequency asks for its stops
    for message in ("time_budget", "peer_review", "voting"):
        if given.HasField(message):
            getattr(out, message).CopyFrom(getattr(given, message))
    if given.scorers:
        del out.scorers[:]
        out.scorers.extend(given.scorers)
    return out


def problems(policy: epb.Policy, prefix: str = "policy") -> list[tuple[str, str]]:
    """Field violations of a policy (thresholds 0–10, weights ≥ 0 and once each, known scorers)."""
    found: list[tuple[str, str]] = []
    for name in ("acceptance_threshold", "review_threshold"):
        value = getattr(policy, name)
        if not math.isfinite(value) or not 0.0 <= value <= 10.0:
            found.append((f"{prefix}.{name}", "must be between 0 and 10"))
    if not 0 <= policy.max_correction_cycles <= 10:
        found.append((f"{prefix}.max_correction_cycles", "must be between 0 and 10"))
    seen: set[int] = set()
    for i, w in enumerate(policy.weights):
        if w.dimension not in {int(d) for d in Dimension}:
            found.append((f"{prefix}.weights[{i}].dimension", "must be a dimension"))
        elif w.dimension in seen:
            found.append((f"{prefix}.weights[{i}].dimension", "given twice"))
        seen.add(w.dimension)
        if not math.isfinite(w.weight) or w.weight < 0:
            found.append((f"{prefix}.weights[{i}].weight", "must be 0 or more"))
    if policy.checkpoint_frequency not in work_pb2.CheckpointFrequency.values():
        found.append((f"{prefix}.checkpoint_frequency", "must be LOW, MEDIUM or HIGH"))
    for i, trigger in enumerate(policy.triggers):
        if trigger not in {int(t) for t in Trigger}:
            found.append((f"{prefix}.triggers[{i}]", "must be a checkpoint trigger"))
    if policy.time_budget.seconds < 0 or policy.time_budget.nanos < 0:
        found.append((f"{prefix}.time_budget", "must not be negative"))
    if not 0 <= policy.peer_review.reviewers <= MAX_REVIEWERS:
        found.append((f"{prefix}.peer_review.reviewers", f"must be between 0 and {MAX_REVIEWERS}"))
    for i, kind in enumerate(policy.peer_review.subtask_types):
        if kind not in _SUBTASK_TYPES:
            found.append((f"{prefix}.peer_review.subtask_types[{i}]", "must be a subtask type other than REVIEW"))
    voting = policy.voting  # the same bounds the scheduler applies when it adds competitors (scheduler/voting.py)
    if not 0 <= voting.solutions <= MAX_SOLUTIONS:
        found.append((f"{prefix}.voting.solutions", f"must be between 0 and {MAX_SOLUTIONS} (0 or 1: no voting)"))
    if not 0 <= voting.reviewers <= MAX_REVIEWERS:
        found.append((f"{prefix}.voting.reviewers", f"must be between 0 and {MAX_REVIEWERS}"))
    if voting.method not in epb.VoteMethod.values():
        found.append((f"{prefix}.voting.method", "must be MAJORITY or WEIGHTED"))
    for i, kind in enumerate(voting.subtask_types):
        if kind not in _SUBTASK_TYPES:
            found.append((f"{prefix}.voting.subtask_types[{i}]", "must be a subtask type other than REVIEW"))
    known = {*registered(), "peer-review"}
    for i, name in enumerate(policy.scorers):
        if name not in known:
            found.append((f"{prefix}.scorers[{i}]", f"unknown scorer (known: {', '.join(sorted(known))})"))
    return found


def rules_of(policy: epb.Policy) -> Rules:
    """The verdict rules of an effective policy."""
    return Rules(
        acceptance_threshold=policy.acceptance_threshold,
        review_threshold=policy.review_threshold,
        max_correction_cycles=policy.max_correction_cycles,
        triggers=frozenset(Trigger(t) for t in policy.triggers if t in {int(x) for x in Trigger}),
        frequency=Frequency(policy.checkpoint_frequency) if policy.checkpoint_frequency in _FREQUENCIES else None,
    )


def weights_of(policy: epb.Policy) -> dict[Dimension, float]:
    """Dimension weights of an effective policy."""
    return {Dimension(w.dimension): w.weight for w in policy.weights if w.dimension in {int(d) for d in Dimension}}
