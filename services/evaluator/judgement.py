"""What to do with a scored result: the score bands of a task's policy (pure)."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from maw.common.v1 import work_pb2
from maw.evaluator.v1 import resources_pb2 as epb


class Verdict(enum.IntEnum):
    """Values equal maw.evaluator.v1.Verdict."""

    ACCEPT = epb.VERDICT_ACCEPT
    CORRECT = epb.VERDICT_CORRECT
    ESCALATE = epb.VERDICT_ESCALATE
    REJECT = epb.VERDICT_REJECT


class Trigger(enum.IntEnum):
    """Checkpoint triggers (values equal maw.evaluator.v1.CheckpointTrigger)."""

    FREQUENCY = epb.CHECKPOINT_TRIGGER_FREQUENCY
    ERROR = epb.CHECKPOINT_TRIGGER_ERROR
    LOW_SCORE = epb.CHECKPOINT_TRIGGER_LOW_SCORE
    ESCALATION = epb.CHECKPOINT_TRIGGER_ESCALATION
    TIME_BUDGET = epb.CHECKPOINT_TRIGGER_TIME_BUDGET
    MANUAL = epb.CHECKPOINT_TRIGGER_MANUAL
    AFTER_DECOMPOSITION = epb.CHECKPOINT_TRIGGER_AFTER_DECOMPOSITION
    BEFORE_FINAL_ACCEPT = epb.CHECKPOINT_TRIGGER_BEFORE_FINAL_ACCEPT


class Frequency(enum.IntEnum):
    """Checkpoint frequencies (values equal maw.common.v1.CheckpointFrequency)."""

    LOW = work_pb2.CHECKPOINT_FREQUENCY_LOW
    MEDIUM = work_pb2.CHECKPOINT_FREQUENCY_MEDIUM
    HIGH = work_pb2.CHECKPOINT_FREQUENCY_HIGH


_MILESTONES = {Frequency.LOW: (50, 100), Frequency.MEDIUM: (25, 50, 75, 100)}


@dataclass(frozen=True)
class Rules:
    """The parts of a policy that decide a verdict."""

    acceptance_threshold: float = 5.0
    review_threshold: float = 7.0
    max_correction_cycles: int = 3
    triggers: frozenset[Trigger] = frozenset(Trigger)
    frequency: Frequency | None = Frequency.MEDIUM


@dataclass(frozen=True)
class Decision:
    """A verdict, the checkpoint trigger when it escalates, and why, in words."""

    verdict: Verdict
    reason: str
    trigger: Trigger | None = None


def decide(overall: float | None, cycle: int, rules: Rules) -> Decision:
    """The verdict on a result with ``overall`` score (None: nothing measured) in correction ``cycle``."""
    if overall is None:
        return Decision(Verdict.ACCEPT, "no scorer could measure this result (no code change); accepted on its outcome")
    acc, rev, most = rules.acceptance_threshold, rules.review_threshold, rules.max_correction_cycles
    if overall < acc:
        if cycle < most:
            return Decision(
                Verdict.CORRECT, f"{overall:.1f} below acceptance {acc:.1f}, correction cycle {cycle + 1} of {most}"
            )
        if Trigger.ESCALATION in rules.triggers:
            return Decision(
                Verdict.ESCALATE,
                f"{overall:.1f} below acceptance {acc:.1f} after {cycle} correction cycles",
                Trigger.ESCALATION,
            )
        return Decision(Verdict.REJECT, f"{overall:.1f} below acceptance {acc:.1f} after {cycle} correction cycles")
    if overall < rev and Trigger.LOW_SCORE in rules.triggers:
        return Decision(Verdict.ESCALATE, f"{overall:.1f} below review threshold {rev:.1f}", Trigger.LOW_SCORE)
    return Decision(Verdict.ACCEPT, f"{overall:.1f} at or above acceptance {acc:.1f}")


def milestone(frequency: Frequency | None, done_before: int, total: int) -> int | None:
    """The progress milestone (percent) one more finished subtask reaches, or None.

    ``done_before`` subtasks of ``total`` were finished before this one. HIGH stops after every subtask (the
    milestone is the progress reached); MEDIUM and LOW when the progress crosses a milestone (the furthest,
    if it crosses two).
    """
    if frequency is None or total <= 0:
        return None
    before = max(0, min(done_before, total))
    after = min(before + 1, total)
    if frequency == Frequency.HIGH:
        return 100 * after // total
    crossed = [mark for mark in _MILESTONES[frequency] if before * 100 < mark * total <= after * 100]
    return crossed[-1] if crossed else None  # one stop, at the furthest milestone reached


def with_frequency(decision: Decision, rules: Rules, done_before: int, total: int) -> Decision:
    """``decision``, or a FREQUENCY checkpoint when it accepts a result that reaches a progress milestone."""
    if decision.verdict != Verdict.ACCEPT or Trigger.FREQUENCY not in rules.triggers:
        return decision
    reached = milestone(rules.frequency, done_before, total)
    if reached is None:
        return decision
    return Decision(Verdict.ESCALATE, f"{decision.reason}; the task reached {reached} % progress", Trigger.FREQUENCY)


__all__ = ["Decision", "Frequency", "Rules", "Trigger", "Verdict", "decide", "milestone", "with_frequency"]
