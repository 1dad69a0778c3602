"""What to do with a scored result: the score bands of a task's policy (pure).

[0, acceptance) → CORRECT while correction cycles remain, then ESCALATE to a person (ESCALATION trigger;
REJECT when that trigger is off); [acceptance, review) → ESCALATE at a LOW_SCORE checkpoint when that
trigger is on, else ACCEPT; [review, 10] → ACCEPT. A result no scorer could measure (no code change)
is judged by its outcome alone, like a SHELL or TEST result: ACCEPT, with grade UNSPECIFIED.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Verdict(enum.IntEnum):
    """Values equal maw.evaluator.v1.Verdict."""

    ACCEPT = 1
    CORRECT = 2
    ESCALATE = 3
    REJECT = 4


class Trigger(enum.IntEnum):
    """Checkpoint triggers (values equal maw.evaluator.v1.CheckpointTrigger)."""

    FREQUENCY = 1
    ERROR = 2
    LOW_SCORE = 3
    ESCALATION = 4
    TIME_BUDGET = 5
    MANUAL = 6
    AFTER_DECOMPOSITION = 7
    BEFORE_FINAL_ACCEPT = 8


@dataclass(frozen=True)
class Rules:
    """The parts of a policy that decide a verdict."""

    acceptance_threshold: float = 5.0
    review_threshold: float = 7.0
    max_correction_cycles: int = 3
    triggers: frozenset[Trigger] = frozenset(Trigger)


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


__all__ = ["Decision", "Rules", "Trigger", "Verdict", "decide"]
