"""Which task events the scheduler relays to the registry's activity log."""

from __future__ import annotations

import pytest
from maw.scheduler.v1 import resources_pb2 as spb
from maw.scheduler.v1 import task_service_pb2 as tpb

from services.scheduler.registry_link import activity_of

S = spb.SubtaskState


def _move(old: int, new: int, reason: str = "") -> bytes:
    subtask = spb.Subtask(name="tasks/t/subtasks/a", key="a", state=new, attempt=2, worker="workers/w")  # type: ignore[arg-type]
    change = tpb.SubtaskStateChanged(subtask=subtask, previous_state=old, reason=reason)  # type: ignore[arg-type]
    return tpb.TaskEvent(task="tasks/t", subtask_state_changed=change).SerializeToString()


@pytest.mark.parametrize(
    ("old", "new"),
    [
        (S.SUBTASK_STATE_PENDING, S.SUBTASK_STATE_READY),
        (S.SUBTASK_STATE_READY, S.SUBTASK_STATE_ASSIGNED),
        (S.SUBTASK_STATE_ASSIGNED, S.SUBTASK_STATE_RUNNING),
        (S.SUBTASK_STATE_RUNNING, S.SUBTASK_STATE_EVALUATING),
    ],
)
def test_the_automatic_hops_stay_in_the_task_event_log(old: int, new: int) -> None:
    assert activity_of(1, _move(old, new)) is None


@pytest.mark.parametrize(
    ("old", "new", "verb"),
    [
        (S.SUBTASK_STATE_RUNNING, S.SUBTASK_STATE_SUCCEEDED, "subtask.succeeded"),
        (S.SUBTASK_STATE_EVALUATING, S.SUBTASK_STATE_SUCCEEDED, "subtask.succeeded"),
        (S.SUBTASK_STATE_RUNNING, S.SUBTASK_STATE_FAILED, "subtask.failed"),
        (S.SUBTASK_STATE_READY, S.SUBTASK_STATE_CANCELLED, "subtask.cancelled"),
        (S.SUBTASK_STATE_EVALUATING, S.SUBTASK_STATE_CORRECTING, "subtask.correcting"),
        (S.SUBTASK_STATE_EVALUATING, S.SUBTASK_STATE_WAITING_CHECKPOINT, "subtask.waiting_checkpoint"),
        (S.SUBTASK_STATE_RUNNING, S.SUBTASK_STATE_READY, "subtask.ready"),  # the attempt ended without a result
        (S.SUBTASK_STATE_ASSIGNED, S.SUBTASK_STATE_PENDING, "subtask.pending"),
    ],
)
def test_where_a_subtask_ends_up_and_what_went_wrong_reach_the_activity_log(old: int, new: int, verb: str) -> None:
    record = activity_of(7, _move(old, new, "lease expired"))
    assert record is not None
    assert record.entry_id == "scheduler-event-7"
    assert (record.entry.verb, record.entry.worker, record.entry.subtask) == (verb, "workers/w", "tasks/t/subtasks/a")
    assert record.entry.summary.endswith(": lease expired")


def test_task_transitions_and_plans_always_reach_it() -> None:
    task = spb.Task(name="tasks/t", state=spb.TASK_STATE_RUNNING)
    changed = tpb.TaskEvent(task="tasks/t", task_state_changed=tpb.TaskStateChanged(task=task))
    planned = tpb.TaskEvent(task="tasks/t", subtasks_added=tpb.SubtasksAdded(subtasks=[spb.Subtask(key="a")]))
    verbs = [activity_of(i, e.SerializeToString()) for i, e in enumerate((changed, planned))]
    assert [r.entry.verb if r else None for r in verbs] == ["task.running", "task.planned"]
