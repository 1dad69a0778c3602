"""PostgreSQL access for the scheduler schema: every query the scheduler runs, batched.

Hot-path statements (claims, result commits, lease renewals, expiry) take arrays and touch many rows per
round trip, so throughput is bounded by PostgreSQL's commit rate divided by the batch size rather than by
per-item round trips. Row locks are always taken subtasks first, then tasks, each in key order, so
concurrent replicas cannot deadlock on each other's batches. One module per area: rows (row types),
tasks, subtasks, results, events, saved (templates and stats), relays (the relays' cursors and lock).
"""

from .events import allocate_sequences, insert_events, read_events
from .relays import advance_cursor, events_after, relay_cursor, still_connected, tool_stats, try_session_lock
from .results import existing_results, insert_results, latest_results, record_tool_stats
from .rows import SubtaskRow, TaskRow
from .saved import (
    delete_template,
    get_template,
    insert_template,
    list_templates,
    state_counts,
    update_template,
)
from .subtasks import (
    cancel_live_subtasks,
    claim_candidates,
    expired_leases,
    get_subtasks,
    leases_of,
    lock_subtasks,
    mark_assigned,
    overdue,
    page_subtasks,
    ready_sample,
    release_dependents,
    renew_leases,
    requeue,
    set_subtask_states,
    set_unschedulable,
)
from .tasks import (
    bump_task_counters,
    count_tasks,
    find_task_by_request,
    get_task,
    insert_task,
    list_tasks,
    lock_tasks,
    put_task_policy,
    set_labels,
    set_priorities,
    update_task,
)

__all__ = [
    "SubtaskRow",
    "TaskRow",
    "advance_cursor",
    "allocate_sequences",
    "bump_task_counters",
    "cancel_live_subtasks",
    "claim_candidates",
    "count_tasks",
    "delete_template",
    "events_after",
    "existing_results",
    "expired_leases",
    "find_task_by_request",
    "get_subtasks",
    "get_task",
    "get_template",
    "insert_events",
    "insert_results",
    "insert_task",
    "insert_template",
    "latest_results",
    "leases_of",
    "list_tasks",
    "list_templates",
    "lock_subtasks",
    "lock_tasks",
    "mark_assigned",
    "overdue",
    "page_subtasks",
    "put_task_policy",
    "read_events",
    "ready_sample",
    "record_tool_stats",
    "relay_cursor",
    "release_dependents",
    "renew_leases",
    "requeue",
    "set_labels",
    "set_priorities",
    "set_subtask_states",
    "set_unschedulable",
    "state_counts",
    "still_connected",
    "tool_stats",
    "try_session_lock",
    "update_task",
    "update_template",
]
