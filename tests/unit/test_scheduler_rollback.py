"""Rollback to a checkpoint, the pure part: the plan (services/scheduler/rollback.py) and its transitions."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.runtime import authz
from services.runtime.principal import Principal, PrincipalKind
from services.scheduler import rollback, states
from services.scheduler.store import SubtaskRow

S, T = states.SubtaskState, states.TaskState
NOW = datetime(2026, 11, 25, tzinfo=UTC)


def row(
    key: str, state: states.SubtaskState, deps: tuple[str, ...] = (), ordinal: int = 0,
    corrects: str = "", review_of: str = "", solution_of: str = "",
) -> SubtaskRow:  # fmt: skip
    return SubtaskRow(
        task_id="t", key=key, ordinal=ordinal, body=b"", state=int(state),
        state_message="", attempt=1, failures=0, max_attempts=3, priority=0, task_priority=0, tool_kind=0,
        privacy_level=0, required_labels={}, dependencies=list(deps), dependents=[], deps_remaining=0, worker=None,
        tool=0, lease_expire_time=None, attempt_deadline=None, next_attempt_time=None, progress_percent=0,
        progress_message="", unschedulable_code=0, unschedulable_message="", unschedulable_since=None,
        create_time=NOW, ready_time=None, start_time=None, end_time=None, update_time=NOW, corrects=corrects,
        review_of=review_of, solution_of=solution_of,
    )  # fmt: skip


def chain(*chosen: states.SubtaskState) -> list[SubtaskRow]:
    return [row(f"s{i}", s, (f"s{i - 1}",) if i else (), ordinal=i) for i, s in enumerate(chosen)]


def test_work_done_since_the_mark_is_reset_and_what_waits_on_it_goes_back_to_pending() -> None:
    rows = chain(S.SUCCEEDED, S.SUCCEEDED, S.RUNNING, S.PENDING)
    plan = rollback.plan_of(T.RUNNING, 4, rows, {"s0"})
    assert plan.kept == ["s0"] and plan.reset == ["s1", "s2"] and plan.cancelled == ["s2"]
    assert plan.after == {"s0": S.SUCCEEDED, "s1": S.READY, "s2": S.PENDING, "s3": S.PENDING}
    assert plan.deps_remaining == {"s1": 0, "s2": 1, "s3": 1}
    assert plan.counts == {"succeeded": 1, "failed": 0, "cancelled": 0, "excused": 0, "running": 0}
    assert plan.progress == 25


def test_a_held_subtask_of_the_mark_is_kept_only_if_it_succeeded() -> None:
    approved = rollback.plan_of(T.SUCCEEDED, 2, chain(S.SUCCEEDED, S.SUCCEEDED), {"s0"})
    assert approved.reset == ["s1"] and approved.after["s1"] == S.READY
    still_waiting = rollback.plan_of(T.WAITING_CHECKPOINT, 2, chain(S.WAITING_CHECKPOINT, S.PENDING), {"s0"})
    assert still_waiting.reset == ["s0"] and still_waiting.after == {"s0": S.READY, "s1": S.PENDING}


def test_corrections_and_reviews_of_reset_subtasks_are_cancelled_as_excused() -> None:
    rows = [
        *chain(S.SUCCEEDED, S.SUCCEEDED),
        row("s1-fix-1", S.SUCCEEDED, ("s0",), corrects="s1", ordinal=2),
        row("s1-review-1", S.FAILED, review_of="s1", ordinal=3),  # already excused: stays as it is
        row("s1-fix-1-review-1", S.RUNNING, review_of="s1-fix-1", ordinal=4),
        row("s0-fix-1", S.SUCCEEDED, corrects="s0", ordinal=5),  # made for a kept subtask: untouched
    ]
    plan = rollback.plan_of(T.SUCCEEDED, len(rows), rows, {"s0"})
    assert plan.reset == ["s1"]
    assert plan.excused == ["s1-fix-1", "s1-fix-1-review-1"]
    assert plan.after["s1-review-1"] == S.FAILED
    assert plan.counts == {"succeeded": 2, "failed": 0, "cancelled": 0, "excused": 3, "running": 0}


def test_a_reset_voted_subtask_votes_again_and_a_kept_one_keeps_its_vote() -> None:
    voted = [
        row("s0", S.SUCCEEDED, solution_of="s0", ordinal=0),
        row("s0-alt-1", S.NOT_SELECTED, solution_of="s0", ordinal=1),
        row("s1", S.SUCCEEDED, ("s0",), solution_of="s1", ordinal=2),
        row("s1-alt-1", S.SUCCEEDED, ("s0",), solution_of="s1", ordinal=3),  # the winner, adopted by s1
        row("s1-alt-2", S.NOT_SELECTED, ("s0",), solution_of="s1", ordinal=4),
    ]
    plan = rollback.plan_of(T.SUCCEEDED, len(voted), voted, {"s0", "s0-alt-1"})
    assert plan.kept == ["s0", "s0-alt-1"] and plan.reset == ["s1", "s1-alt-1", "s1-alt-2"]
    assert [plan.after[k] for k in ("s1", "s1-alt-1", "s1-alt-2")] == [S.READY] * 3
    assert plan.counts == {"succeeded": 1, "failed": 0, "cancelled": 0, "excused": 1, "running": 0}


def test_a_failed_task_resets_its_failure_and_the_steps_cancelled_with_it() -> None:
    rows = [*chain(S.SUCCEEDED, S.FAILED, S.CANCELLED), row("s1-fix-1", S.CANCELLED, corrects="s1", ordinal=3)]
    plan = rollback.plan_of(T.FAILED, 4, rows, {"s0"})
    assert plan.reset == ["s1", "s2"] and plan.excused == []
    assert plan.counts["failed"] == 0 and plan.counts["excused"] == 1, "a correction cancelled by the failure"
    assert states.task_outcome(4, plan.counts["succeeded"], 0, 0, plan.counts["excused"]) is None


def test_the_verdict_also_resets_work_that_began_on_a_reset_subtask_after_the_plan() -> None:
    rows = chain(S.SUCCEEDED, S.READY, S.PENDING)
    planned = rollback.plan_of(T.RUNNING, 3, rows, {"s0"})
    assert planned.reset == []
    moved_on = chain(S.SUCCEEDED, S.SUCCEEDED, S.RUNNING)
    plan = rollback.plan_of(T.RUNNING, 3, moved_on, {"s0"}, listed=["s1"])
    assert plan.reset == ["s1", "s2"] and plan.cancelled == ["s2"]


def test_the_version_follows_states_and_attempts_only() -> None:
    base = rollback.plan_of(T.RUNNING, 2, chain(S.SUCCEEDED, S.RUNNING), {"s0"}).version
    assert rollback.plan_of(T.RUNNING, 2, chain(S.SUCCEEDED, S.RUNNING), {"s0"}).version == base
    progressed = chain(S.SUCCEEDED, S.RUNNING)
    progressed[1].progress_percent = 70
    assert rollback.plan_of(T.RUNNING, 2, progressed, {"s0"}).version == base
    retried = chain(S.SUCCEEDED, S.RUNNING)
    retried[1].attempt = 2
    assert rollback.plan_of(T.RUNNING, 2, retried, {"s0"}).version != base
    assert rollback.plan_of(T.RUNNING, 2, chain(S.SUCCEEDED, S.EVALUATING), {"s0"}).version != base


@given(st.lists(st.sampled_from(list(states.SubtaskState)), min_size=1, max_size=8), st.data())
def test_after_a_rollback_every_step_is_kept_or_waits_for_exactly_its_unfinished_dependencies(
    chosen: list[states.SubtaskState], data: st.DataObject
) -> None:
    rows = chain(*chosen)
    mark = set(data.draw(st.lists(st.sampled_from([r.key for r in rows]), unique=True)))
    plan = rollback.plan_of(T.RUNNING, len(rows), rows, mark)
    for r in rows:
        after = plan.after[r.key]
        if r.key in plan.kept:
            assert after == S.SUCCEEDED and r.key in mark and r.key not in plan.reset
            continue
        assert after in (S.PENDING, S.READY)
        waiting = sum(plan.after[d] != S.SUCCEEDED for d in r.dependencies)
        assert plan.deps_remaining[r.key] == waiting and (after == S.READY) == (waiting == 0)
        assert (r.key in plan.reset) == (r.state not in (S.PENDING, S.READY))
        if r.state != after:
            states.check_subtask(S(r.state), after)  # every move is in the one transition table


@pytest.mark.parametrize("old", sorted(set(states.SubtaskState) - {S.PENDING, S.READY}))
def test_a_rollback_may_reset_a_subtask_from_any_state(old: states.SubtaskState) -> None:
    states.check_subtask(old, S.PENDING)
    states.check_subtask(old, S.READY)


def test_a_rollback_reopens_finished_tasks_but_never_a_cancelled_one() -> None:
    for old in (T.WAITING_CHECKPOINT, T.SUCCEEDED, T.FAILED):
        states.check_task(old, T.RUNNING)
    for old in (T.CANCELLED, T.CANCELLING):
        with pytest.raises(states.TransitionError):
            states.check_task(old, T.RUNNING)
    with pytest.raises(states.TransitionError):
        states.check_subtask(S.NOT_SELECTED, S.SUCCEEDED)


def test_only_the_evaluator_may_plan_a_rollback_and_only_operators_roll_back() -> None:
    plan = authz.rule_for("maw.scheduler.v1.VerdictService/GetRollbackPlan")
    evaluator = Principal(PrincipalKind.SERVICE, "services/evaluator")
    others = [
        Principal(PrincipalKind.SERVICE, "services/registry"),
        Principal(PrincipalKind.USER, "users/admin", role="admin"),
        Principal(PrincipalKind.AGENT, "workers/w"),
    ]
    assert plan is not None and plan.allows(evaluator) and not any(plan.allows(p) for p in others)
    act = authz.rule_for("maw.evaluator.v1.CheckpointService/RollbackToCheckpoint")
    roles = [
        r for r in ("viewer", "operator", "admin") if act and act.allows(Principal(PrincipalKind.USER, "u", role=r))
    ]
    assert roles == ["operator", "admin"]
