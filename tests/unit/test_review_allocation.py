"""Allocation of REVIEW subtasks: away from the author's worker, and off the author's tool when required."""

from __future__ import annotations

from datetime import UTC, datetime

from services.scheduler.allocation import NO_MATCHING_TOOL, AgentView, Candidate, allocate, unschedulable

CLAUDE, GEMINI = 1, 2


def review(hard: bool = False) -> Candidate:
    return Candidate(
        task_id="t", key="implement-review-1-1", tool_kind=0, required_labels={}, privacy_level=1, priority=50,
        task_priority=50, task_running=0, task_max_concurrency=0, ready_time=datetime.now(UTC),
        avoid_worker="workers/author", avoid_tool=CLAUDE, avoid_tool_hard=hard,
    )  # fmt: skip


def agent(worker: str, *tools: int) -> AgentView:
    return AgentView(worker=worker, tools=dict.fromkeys(tools, False), free_slots=1, cpu_percent=0.0)


def test_another_free_worker_wins_over_the_author_even_with_more_resources() -> None:
    author = agent("workers/author", CLAUDE, GEMINI)
    other = AgentView(worker="workers/other", tools={CLAUDE: False}, free_slots=1, cpu_percent=90.0)
    ((_, worker, _),) = allocate([review()], [author, other])
    assert worker == "workers/other"


def test_the_author_reviews_with_another_tool_when_it_is_the_only_agent() -> None:
    ((_, worker, tool),) = allocate([review()], [agent("workers/author", CLAUDE, GEMINI)])
    assert (worker, tool) == ("workers/author", GEMINI), "the avoided tool comes last"


def test_a_required_different_tool_is_never_the_authors() -> None:
    only_claude = [agent("workers/author", CLAUDE), agent("workers/other", CLAUDE)]
    assert allocate([review(hard=True)], only_claude) == []
    assert unschedulable(review(hard=True), only_claude) == NO_MATCHING_TOOL, "and it says why it waits"
    ((_, worker, tool),) = allocate([review(hard=True)], [*only_claude, agent("workers/g", GEMINI)])
    assert (worker, tool) == ("workers/g", GEMINI)
