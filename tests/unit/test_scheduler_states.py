"""The scheduler's state machines stay in step with the contracts, and the after-attempt decision is right."""

from __future__ import annotations

import pytest
from maw.common.v1 import machine_pb2, work_pb2
from maw.scheduler.v1 import resources_pb2 as spb
from maw.scheduler.v1 import task_service_pb2 as tpb

from services.scheduler.after_attempt import Attempt, Next, after_attempt
from services.scheduler.events import LOG_KIND, event_kind
from services.scheduler.states import (
    SUBTASK_TRANSITIONS,
    TASK_TRANSITIONS,
    TERMINAL_TASK,
    SubtaskState,
    TaskState,
    TransitionError,
    check_subtask,
    check_task,
)

CLAUDE, SHELL = machine_pb2.TOOL_KIND_CLAUDE_CODE, machine_pb2.TOOL_KIND_SHELL


def _proto_values(enum_type: object, prefix: str) -> dict[str, int]:
    descriptor = enum_type.DESCRIPTOR  # type: ignore[attr-defined]
    return {v.name.removeprefix(prefix): v.number for v in descriptor.values if v.number}


def test_task_states_equal_the_proto_enum() -> None:
    assert {s.name: int(s) for s in TaskState} == _proto_values(spb.TaskState, "TASK_STATE_")


def test_subtask_states_equal_the_proto_enum() -> None:
    assert {s.name: int(s) for s in SubtaskState} == _proto_values(spb.SubtaskState, "SUBTASK_STATE_")


def test_every_state_has_a_row_in_its_transition_table() -> None:
    assert set(TASK_TRANSITIONS) == set(TaskState)
    assert set(SUBTASK_TRANSITIONS) == set(SubtaskState)


def test_a_cancelled_task_never_moves_again() -> None:
    for new in TaskState:
        with pytest.raises(TransitionError):
            check_task(TaskState.CANCELLED, new)


def test_only_a_rollback_reopens_a_finished_task() -> None:
    for done in TERMINAL_TASK - {TaskState.CANCELLED}:
        assert TASK_TRANSITIONS[done] == {TaskState.RUNNING}


def test_a_subtask_never_skips_from_pending_to_running() -> None:
    with pytest.raises(TransitionError, match="PENDING to RUNNING"):
        check_subtask(SubtaskState.PENDING, SubtaskState.RUNNING)
    check_subtask(SubtaskState.READY, SubtaskState.ASSIGNED)


def test_event_kinds_are_the_oneof_field_numbers() -> None:
    assert event_kind(tpb.TaskEvent(subtask_log_chunk=tpb.SubtaskLogChunk())) == LOG_KIND == 8
    assert event_kind(tpb.TaskEvent(task_state_changed=tpb.TaskStateChanged())) == 4
    assert event_kind(tpb.TaskEvent()) == 0


def _attempt(tool: int = CLAUDE, failures: int = 0, max_attempts: int = 3, solution_of: str = "") -> Attempt:
    return Attempt(tool=tool, failures=failures, max_attempts=max_attempts, solution_of=solution_of)


def test_a_success_of_an_ai_tool_is_judged_and_of_a_shell_step_succeeds() -> None:
    assert after_attempt(_attempt(), work_pb2.OUTCOME_SUCCEEDED) is Next.JUDGE
    assert after_attempt(_attempt(SHELL), work_pb2.OUTCOME_SUCCEEDED) is Next.SUCCEED
    assert after_attempt(_attempt(SHELL, solution_of="x"), work_pb2.OUTCOME_SUCCEEDED) is Next.JUDGE


def test_an_agent_stopping_on_its_own_requeues_without_counting_a_failure() -> None:
    assert after_attempt(_attempt(failures=2), work_pb2.OUTCOME_CANCELLED) is Next.REQUEUE


def test_failures_retry_until_the_last_attempt_then_fail() -> None:
    assert after_attempt(_attempt(SHELL, failures=1), work_pb2.OUTCOME_FAILED) is Next.RETRY
    assert after_attempt(_attempt(SHELL, failures=2), work_pb2.OUTCOME_FAILED) is Next.FAIL
    assert after_attempt(_attempt(SHELL, failures=0), work_pb2.OUTCOME_LEASE_EXPIRED) is Next.RETRY


def test_a_broken_time_limit_never_retries() -> None:
    assert after_attempt(_attempt(SHELL), work_pb2.OUTCOME_TIMED_OUT, retryable=False) is Next.FAIL


def test_the_error_trigger_holds_judged_work_but_not_scripted_steps() -> None:
    assert after_attempt(_attempt(failures=2), work_pb2.OUTCOME_FAILED, error_hold=True) is Next.HOLD
    assert after_attempt(_attempt(failures=2), work_pb2.OUTCOME_FAILED, error_hold=False) is Next.FAIL
    assert after_attempt(_attempt(SHELL, failures=2), work_pb2.OUTCOME_FAILED, error_hold=True) is Next.FAIL


def test_reviews_and_solutions_are_always_held_for_the_evaluator() -> None:
    for held in (Attempt(SHELL, 2, 3, review_of="a"), Attempt(SHELL, 2, 3, solution_of="b")):
        assert after_attempt(held, work_pb2.OUTCOME_FAILED) is Next.HOLD
        assert after_attempt(held, work_pb2.OUTCOME_TIMED_OUT, retryable=False) is Next.HOLD
