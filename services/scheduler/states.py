"""The task and subtask state machines, written down once.

Every state change in the scheduler goes through :func:`check_task` / :func:`check_subtask`, which
refuse a transition that is not in the table. Values equal the ``maw.scheduler.v1`` enum numbers
(tests/unit/test_scheduler_states.py keeps them in step), so no translation table is needed.
"""

from __future__ import annotations

import enum


class TaskState(enum.IntEnum):
    """State of a task (maw.scheduler.v1.TaskState)."""

    PENDING = 1
    RUNNING = 2
    WAITING_CHECKPOINT = 3
    CANCELLING = 4
    SUCCEEDED = 5
    FAILED = 6
    CANCELLED = 7


class SubtaskState(enum.IntEnum):
    """State of a subtask (maw.scheduler.v1.SubtaskState)."""

    PENDING = 1
    READY = 2
    ASSIGNED = 3
    RUNNING = 4
    EVALUATING = 5
    CORRECTING = 6
    WAITING_CHECKPOINT = 7
    SUCCEEDED = 8
    FAILED = 9
    CANCELLED = 10
    BLOCKED = 11
    NOT_SELECTED = 12


T, S = TaskState, SubtaskState

TASK_TRANSITIONS: dict[TaskState, frozenset[TaskState]] = {
    T.PENDING: frozenset({T.RUNNING, T.SUCCEEDED, T.FAILED, T.CANCELLED, T.CANCELLING}),
    T.RUNNING: frozenset({T.WAITING_CHECKPOINT, T.CANCELLING, T.SUCCEEDED, T.FAILED, T.CANCELLED}),
    T.WAITING_CHECKPOINT: frozenset({T.RUNNING, T.CANCELLING, T.CANCELLED, T.FAILED, T.SUCCEEDED}),
    T.CANCELLING: frozenset({T.CANCELLED}),
    # A rollback to a checkpoint (rollback.py) reopens a finished task; a cancelled one stays cancelled.
    T.SUCCEEDED: frozenset({T.RUNNING}),
    T.FAILED: frozenset({T.RUNNING}),
    T.CANCELLED: frozenset(),
}

# A rollback to a checkpoint (rollback.py) resets a subtask done or begun since: PENDING, or READY when its
# dependencies are all done.
_BACK = frozenset({S.PENDING, S.READY})

_LIVE = frozenset({S.PENDING, S.READY, S.ASSIGNED, S.RUNNING, S.EVALUATING, S.CORRECTING, S.WAITING_CHECKPOINT})

SUBTASK_TRANSITIONS: dict[SubtaskState, frozenset[SubtaskState]] = {
    # Dependencies done → READY; a failed dependency → BLOCKED; cancellation from anywhere live.
    S.PENDING: frozenset({S.READY, S.BLOCKED, S.CANCELLED}),
    # Claimed by a replica for a worker; the queue-wait limit can fail it; a retry can re-enter READY; a
    # rollback of one of its dependencies sends it back to PENDING. A REVIEW subtask past its queue-wait
    # limit goes to EVALUATING: the evaluator records the failed review (engine.py).
    S.READY: frozenset({S.ASSIGNED, S.FAILED, S.CANCELLED, S.READY, S.PENDING, S.EVALUATING}),
    # The agent accepted; or declined / lease lost → READY again; or a result arrived before Accepted.
    S.ASSIGNED: frozenset({S.RUNNING, S.READY, S.SUCCEEDED, S.EVALUATING, S.FAILED, S.CANCELLED} | _BACK),
    S.RUNNING: frozenset({S.READY, S.SUCCEEDED, S.EVALUATING, S.FAILED, S.CANCELLED} | _BACK),
    # A voting solution that lost goes NOT_SELECTED (voting.py); it does not decide the task's outcome.
    S.EVALUATING: frozenset(
        {S.SUCCEEDED, S.CORRECTING, S.WAITING_CHECKPOINT, S.FAILED, S.CANCELLED, S.NOT_SELECTED} | _BACK
    ),
    S.CORRECTING: frozenset({S.EVALUATING, S.SUCCEEDED, S.WAITING_CHECKPOINT, S.FAILED, S.CANCELLED} | _BACK),
    S.WAITING_CHECKPOINT: frozenset({S.SUCCEEDED, S.CORRECTING, S.READY, S.FAILED, S.CANCELLED} | _BACK),
    # RetrySubtask (an operator) may send finished work back to the queue; a rollback resets it, or cancels
    # it when it was a correction, review or competing solution made for a reset subtask.
    S.SUCCEEDED: frozenset({S.READY, S.CANCELLED} | _BACK),
    S.FAILED: frozenset({S.READY, S.CANCELLED} | _BACK),
    S.CANCELLED: frozenset({S.READY} | _BACK),
    S.BLOCKED: frozenset({S.READY, S.CANCELLED} | _BACK),
    S.NOT_SELECTED: _BACK,  # only a rollback of its voted subtask: the vote runs again
}

TERMINAL_TASK = frozenset({T.SUCCEEDED, T.FAILED, T.CANCELLED})
TERMINAL_SUBTASK = frozenset({S.SUCCEEDED, S.FAILED, S.CANCELLED, S.NOT_SELECTED})
LEASED = frozenset({S.ASSIGNED, S.RUNNING})
LIVE_SUBTASK = _LIVE | {S.BLOCKED}


class TransitionError(ValueError):
    """A state change the state machine does not allow."""


def check_task(old: TaskState, new: TaskState) -> None:
    """Raise :class:`TransitionError` unless a task may go from ``old`` to ``new``."""
    if new not in TASK_TRANSITIONS[old]:
        raise TransitionError(f"task cannot go from {old.name} to {new.name}")


def check_subtask(old: SubtaskState, new: SubtaskState) -> None:
    """Raise :class:`TransitionError` unless a subtask may go from ``old`` to ``new``."""
    if new not in SUBTASK_TRANSITIONS[old]:
        raise TransitionError(f"subtask cannot go from {old.name} to {new.name}")


def task_outcome(total: int, succeeded: int, failed: int, cancelled: int, excused: int = 0) -> TaskState | None:
    """The terminal state a task reaches from its subtasks' counts, or None while work remains.

    Any subtask failed for good → FAILED (once nothing else runs is not required: a failed step
    blocks its dependents and the task cannot succeed); all succeeded → SUCCEEDED. ``excused``
    subtasks ended without deciding the outcome (a REVIEW subtask that failed or whose verdict was
    malformed, a voting solution that was not selected): they are left out of ``total``.
    """
    total -= excused
    if failed:
        return T.FAILED
    if succeeded == total:
        return T.SUCCEEDED
    if succeeded + cancelled == total and cancelled:
        return T.CANCELLED
    return None
