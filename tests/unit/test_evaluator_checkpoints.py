"""Checkpoint triggers as pure logic: frequency milestones, the policy overlay, and task updates."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from maw.common.v1 import work_pb2
from maw.evaluator.v1 import evaluation_intake_service_pb2 as ipb
from maw.evaluator.v1 import resources_pb2 as epb
from maw.scheduler.v1 import resources_pb2 as spb
from maw.scheduler.v1 import task_service_pb2 as tpb

from services.evaluator import policies
from services.evaluator.judgement import Decision, Frequency, Rules, Trigger, Verdict, milestone, with_frequency
from services.scheduler.evaluation_link import update_of


def stops(frequency: Frequency, total: int) -> list[int | None]:
    """The milestone each of ``total`` subtasks reaches when they finish one by one."""
    return [milestone(frequency, done, total) for done in range(total)]


def test_frequencies_stop_at_their_milestones() -> None:
    assert stops(Frequency.HIGH, 4) == [25, 50, 75, 100]
    assert stops(Frequency.MEDIUM, 8) == [None, 25, None, 50, None, 75, None, 100]
    assert stops(Frequency.LOW, 8) == [None, None, None, 50, None, None, None, 100]
    assert stops(Frequency.MEDIUM, 3) == [25, 50, 100], "a step that crosses two milestones stops once"
    assert milestone(None, 0, 4) is None and milestone(Frequency.HIGH, 0, 0) is None


@given(st.sampled_from(list(Frequency)), st.integers(1, 60))
def test_every_frequency_stops_when_the_task_is_done_and_never_twice_at_a_mark(
    frequency: Frequency, total: int
) -> None:
    reached = [m for m in stops(frequency, total) if m is not None]
    assert reached[-1] == 100
    assert reached == sorted(set(reached)), "milestones only grow"


def test_only_an_accept_reaching_a_milestone_becomes_a_frequency_checkpoint() -> None:
    rules = Rules(frequency=Frequency.LOW, triggers=frozenset({Trigger.FREQUENCY}))
    accept = Decision(Verdict.ACCEPT, "8.0 at or above acceptance 5.0")
    stopped = with_frequency(accept, rules, 0, 2)
    assert (stopped.verdict, stopped.trigger) == (Verdict.ESCALATE, Trigger.FREQUENCY)
    assert "50 %" in stopped.reason
    assert with_frequency(accept, rules, 0, 4) == accept, "no milestone, no stop"
    correct = Decision(Verdict.CORRECT, "2.0 below acceptance")
    assert with_frequency(correct, rules, 1, 2) == correct, "a correction is not progress"
    off = Rules(frequency=Frequency.HIGH, triggers=frozenset({Trigger.LOW_SCORE}))
    assert with_frequency(accept, off, 0, 1) == accept, "the trigger off, no stop"


def test_the_default_policy_does_not_stop_by_frequency_but_a_task_that_asks_for_one_does() -> None:
    default = policies.default_policy()
    assert Trigger.FREQUENCY not in policies.rules_of(default).triggers
    asked = policies.overlay(default, epb.Policy(checkpoint_frequency=work_pb2.CHECKPOINT_FREQUENCY_LOW))
    rules = policies.rules_of(asked)
    assert Trigger.FREQUENCY in rules.triggers and rules.frequency == Frequency.LOW
    assert Trigger.ESCALATION in rules.triggers, "the other default triggers stay"
    chosen = policies.overlay(
        default,
        epb.Policy(checkpoint_frequency=work_pb2.CHECKPOINT_FREQUENCY_LOW, triggers=[epb.CHECKPOINT_TRIGGER_ERROR]),
    )
    assert policies.rules_of(chosen).triggers == {Trigger.ERROR}, "explicit triggers win"


def test_bad_frequency_triggers_and_budgets_are_field_violations() -> None:
    bad = epb.Policy(checkpoint_frequency=9, triggers=[epb.CHECKPOINT_TRIGGER_MANUAL, 42])  # type: ignore[arg-type,list-item]
    bad.time_budget.seconds = -1
    assert [f for f, _ in policies.problems(bad)] == ["policy.checkpoint_frequency", "policy.triggers[1]",
                                                     "policy.time_budget"]  # fmt: skip


def changed(old: int, new: int) -> bytes:
    event = tpb.TaskEvent(
        task="tasks/t1",
        task_state_changed=tpb.TaskStateChanged(previous_state=old, task=spb.Task(state=new, subtask_count=3)),  # type: ignore[arg-type]
    )
    return event.SerializeToString()


def test_task_events_become_the_updates_the_evaluator_needs() -> None:
    cancelled = update_of(7, changed(spb.TASK_STATE_WAITING_CHECKPOINT, spb.TASK_STATE_CANCELLED))
    assert cancelled is not None
    assert (cancelled.update_id, cancelled.task, cancelled.kind) == (
        "scheduler-event-7", "tasks/t1", ipb.TASK_UPDATE_KIND_CANCELLED,
    )  # fmt: skip
    assert cancelled.task_subtasks_total == 3
    done = update_of(8, changed(spb.TASK_STATE_RUNNING, spb.TASK_STATE_SUCCEEDED))
    failed = update_of(9, changed(spb.TASK_STATE_RUNNING, spb.TASK_STATE_FAILED))
    reopened = update_of(10, changed(spb.TASK_STATE_FAILED, spb.TASK_STATE_RUNNING))
    assert done is not None and failed is not None and reopened is not None
    assert [done.kind, failed.kind, reopened.kind] == [
        ipb.TASK_UPDATE_KIND_SUCCEEDED, ipb.TASK_UPDATE_KIND_FAILED, ipb.TASK_UPDATE_KIND_REOPENED,
    ]  # fmt: skip
    assert update_of(11, changed(spb.TASK_STATE_RUNNING, spb.TASK_STATE_WAITING_CHECKPOINT)) is None
    added = tpb.TaskEvent(
        task="tasks/t1",
        subtasks_added=tpb.SubtasksAdded(subtasks=[spb.Subtask(name="tasks/t1/subtasks/a-fix-1", key="a-fix-1")]),
    )
    update = update_of(12, added.SerializeToString())
    assert update is not None and update.kind == ipb.TASK_UPDATE_KIND_SUBTASKS_ADDED
    assert [s.key for s in update.subtasks] == ["a-fix-1"]
