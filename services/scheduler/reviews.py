"""Applying a RequestReviews verdict: K REVIEW subtasks join the DAG for one judged result.

The reviewed subtask stays EVALUATING until the evaluator has every review and sends its own verdict. Each
REVIEW subtask (key ``<key>-review-<attempt>-<i>``, ``review_of`` = the reviewed key) is READY at once with
no dependents; its instructions carry the evaluator's instructions (with the required output format), the
reviewed subtask's instructions and its diff (cut at 32 kB). With ``compare_subtasks`` (a voting round) the
reviewer sees each listed subtask's diff instead, labelled A, B, C… in that order.

Allocation avoids the author: another worker wins whenever one is free, another tool is preferred, and with
``require_different_tool`` the author's tool is never used (columns ``avoid_worker``, ``avoid_tool``,
``avoid_tool_hard``; allocation.py). A REVIEW subtask never fails its task: its failure is held for the
evaluator (engine.py) and a Reject of it counts as excused (verdicts.py).
"""

from __future__ import annotations

import string
import uuid

from maw.common.v1 import work_pb2
from maw.scheduler.v1 import resources_pb2 as spb
from maw.scheduler.v1 import task_service_pb2 as tpb
from sqlalchemy import text

from . import _convert as conv
from . import store
from .names import subtask_name, try_parse_subtask
from .states import SubtaskState
from .verdict_context import REJECTED, Outcome, VerdictContext

MAX_REVIEWERS = 5
DIFF_LIMIT = 32_000
LABELS = string.ascii_uppercase


def _diff_block(diff: str) -> list[str]:
    cut = diff[:DIFF_LIMIT]
    note = [f"(the diff was cut at {DIFF_LIMIT // 1000} kB)"] if len(diff) > DIFF_LIMIT else []
    return ["```diff", cut, "```", *note] if cut else ["(no change was made)"]


async def request_reviews(applier: VerdictContext, task: store.TaskRow) -> None:
    """Create the REVIEW subtasks a RequestReviews verdict asks for (see the module docstring)."""

    ask = applier.v.request_reviews
    if not 1 <= ask.reviewers <= MAX_REVIEWERS:
        raise Outcome(REJECTED, f"request_reviews.reviewers must be 1 to {MAX_REVIEWERS}, got {ask.reviewers}")
    row = await applier.subtask()
    conn = applier.conn
    compared: list[str] = []
    for i, name in enumerate(ask.compare_subtasks):
        pair = try_parse_subtask(name)
        if pair is None or pair[0] != row.task_id:
            raise Outcome(REJECTED, f"request_reviews.compare_subtasks[{i}] is not a subtask of {applier.v.task}")
        compared.append(pair[1])
    if len(compared) > len(LABELS):
        raise Outcome(REJECTED, f"request_reviews.compare_subtasks: at most {len(LABELS)} solutions")
    await applier.judged(row)
    spec = spb.SubtaskSpec.FromString(row.body)
    results = await store.latest_results(conn, row.task_id, sorted({row.key, *compared}))

    def diff_of(key: str) -> str:
        body = results.get(key)
        return spb.SubtaskResult.FromString(body).diff.unified_diff if body else ""

    parts = [ask.instructions, "", f"The subtask under review: {spec.display_name or row.key} ({row.key})."]
    if spec.description:
        parts += ["Its instructions:", spec.description[:8000]]
    if compared:
        parts += ["", f"The solutions to compare, labelled {', '.join(LABELS[: len(compared)])} in this order:"]
        for label, key in zip(LABELS, compared, strict=False):
            parts += ["", f"Solution {label} ({key}):", *_diff_block(diff_of(key))]
    else:
        parts += ["", "The change to review:", *_diff_block(diff_of(row.key))]
    description = "\n".join(parts)

    existing = {r.key for r in await store.get_subtasks(conn, row.task_id)}
    keys, bodies = [], []
    for i in range(1, ask.reviewers + 1):
        key = f"{row.key[:40]}-review-{row.attempt}-{i}"
        while key in existing:
            key = f"{row.key[:36]}-review-{row.attempt}-{i}-{uuid.uuid4().hex[:4]}"
        existing.add(key)
        review = spb.SubtaskSpec(
            key=key,
            display_name=f"Review {i} of {spec.display_name or row.key}",
            description=description,
            type=work_pb2.SUBTASK_TYPE_REVIEW,
        )
        keys.append(key)
        bodies.append(review.SerializeToString())
    await conn.execute(
        text(
            "INSERT INTO subtasks (task_id, key, ordinal, body, state, max_attempts, priority, task_priority,"
            " tool_kind, privacy_level, required_labels, dependencies, dependents, deps_remaining, ready_time,"
            " attempt_limit_s, queue_wait_limit_s, total_limit_s, review_of, review_of_attempt, avoid_worker,"
            " avoid_tool, avoid_tool_hard)"
            " SELECT :t, v.key, (SELECT max(ordinal) FROM subtasks WHERE task_id = :t) + v.n, v.body, :s,"
            " s.max_attempts, s.priority, s.task_priority, 0, s.privacy_level, s.required_labels, '{}', '{}', 0,"
            " now(), s.attempt_limit_s, s.queue_wait_limit_s, s.total_limit_s, s.key, :attempt, :worker, :tool,"
            " :hard FROM subtasks s,"
            " unnest(CAST(:keys AS text[]), CAST(:bodies AS bytea[]), CAST(:ns AS int[])) AS v(key, body, n)"
            " WHERE s.task_id = :t AND s.key = :of"
        ),
        {
            "t": row.task_id,
            "of": row.key,
            "s": int(SubtaskState.READY),
            "attempt": row.attempt,
            "worker": row.worker or "",
            "tool": row.tool,
            "hard": ask.require_different_tool,
            "keys": keys,
            "bodies": bodies,
            "ns": list(range(1, len(keys) + 1)),
        },
    )
    waiting = f"waiting for {ask.reviewers} peer review{'s' if ask.reviewers > 1 else ''}"
    await store.set_subtask_states(conn, [{"task_id": row.task_id, "key": row.key, "state_message": waiting}])
    await store.update_task(conn, row.task_id, subtask_count=task.subtask_count + len(keys))
    added = await store.get_subtasks(conn, row.task_id, keys)
    applier.events.add(
        row.task_id,
        tpb.TaskEvent(
            subtasks_added=tpb.SubtasksAdded(
                subtasks=[conv.subtask_message(r) for r in added], reason=f"peer review of {row.key}"
            )
        ),
    )
    applier.created.extend(subtask_name(row.task_id, k) for k in keys)
    applier.ready = True


__all__ = ["request_reviews"]
