"""What happens to a subtask when an attempt ends: one pure decision for results, expiry, time limits, hand-backs.

The committer (a result arrived, or the agent handed the lease back) and the lease keeper (a lease expired, or a
time limit broke) both ask :func:`after_attempt` and then carry the answer out in their own transaction.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from maw.common.v1 import machine_pb2, work_pb2

from .states import SubtaskState

JUDGED_TOOLS = frozenset(
    {
        machine_pb2.TOOL_KIND_CLAUDE_CODE,
        machine_pb2.TOOL_KIND_GEMINI_CLI,
        machine_pb2.TOOL_KIND_CODEX_CLI,
        machine_pb2.TOOL_KIND_OLLAMA,
    }
)


def is_judged(tool: int) -> bool:
    """Whether a result of ``tool`` goes through evaluation (AI tools) or is judged by its outcome."""
    return tool in JUDGED_TOOLS


class Next(enum.Enum):
    """Where the subtask goes next."""

    JUDGE = enum.auto()  # EVALUATING: the evaluator judges the result (an AI tool's, or a voting solution's)
    SUCCEED = enum.auto()  # SUCCEEDED: the outcome alone decides (shell, test tools)
    REQUEUE = enum.auto()  # READY again, not counted as a failure (handed back, declined, stopped by the agent)
    RETRY = enum.auto()  # READY after backoff, counted as a failed attempt
    HOLD = enum.auto()  # EVALUATING without a good result: held for a person (ERROR trigger) or the evaluator
    FAIL = enum.auto()  # FAILED for good


STATE_OF = {
    Next.JUDGE: SubtaskState.EVALUATING,
    Next.SUCCEED: SubtaskState.SUCCEEDED,
    Next.REQUEUE: SubtaskState.READY,
    Next.RETRY: SubtaskState.READY,
    Next.HOLD: SubtaskState.EVALUATING,
    Next.FAIL: SubtaskState.FAILED,
}


@dataclass(frozen=True)
class Attempt:
    """What the decision needs to know about the subtask whose attempt ended."""

    tool: int  # the tool that ran it (or, when it never ran, the kind it asked for)
    failures: int
    max_attempts: int
    review_of: str = ""
    solution_of: str = ""


def after_attempt(attempt: Attempt, outcome: int, *, retryable: bool = True, error_hold: bool = False) -> Next:
    """Decide the next state after an attempt ended with ``outcome`` (``work_pb2.Outcome``).

    ``retryable`` is False for a broken time limit (queue-wait or total: more attempts cannot help);
    ``error_hold`` says the task's policy has the ERROR trigger, so a judged subtask failing for good waits for a
    person instead. A REVIEW subtask and a voting solution always go to the evaluator, which excuses them: they
    never fail their task.
    """
    if outcome == work_pb2.OUTCOME_SUCCEEDED:
        return Next.JUDGE if is_judged(attempt.tool) or attempt.solution_of else Next.SUCCEED
    if outcome == work_pb2.OUTCOME_CANCELLED:
        return Next.REQUEUE
    if retryable and attempt.failures + 1 < attempt.max_attempts:
        return Next.RETRY
    if attempt.review_of or attempt.solution_of or (error_hold and is_judged(attempt.tool)):
        return Next.HOLD
    return Next.FAIL


def held_for(attempt: Attempt) -> str:
    """Who a held subtask waits for, for the reason people read."""
    return "the evaluator" if attempt.review_of or attempt.solution_of else "a person"
