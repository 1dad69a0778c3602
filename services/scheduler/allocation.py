"""Which agent runs which ready subtask: eligibility, scoring, fair share. Pure logic.

Score (weights configurable, defaults from DESIGN.md): tool match 50 %, free resources 30 %,
privacy fit 20 %. Labels, privacy acceptance and the need for a usable tool are hard constraints.
A candidate may ask to avoid a worker and a tool (a REVIEW subtask: its author's): each lowers the score
of an agent that has it, so any other free agent wins; a tool avoided "hard" is never used.
Tasks share the free slots fairly (round-robin within a priority level) and never exceed their
own concurrency limit; an agent never gets more than its free slots.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from maw.common.v1 import machine_pb2, work_pb2
from maw.scheduler.v1 import resources_pb2 as spb

AI_TOOLS = frozenset(
    {
        machine_pb2.TOOL_KIND_CLAUDE_CODE,
        machine_pb2.TOOL_KIND_GEMINI_CLI,
        machine_pb2.TOOL_KIND_CODEX_CLI,
        machine_pb2.TOOL_KIND_OLLAMA,
    }
)
SHELL, TEST = machine_pb2.TOOL_KIND_SHELL, machine_pb2.TOOL_KIND_TEST
SENSITIVE = work_pb2.PRIVACY_LEVEL_SENSITIVE


@dataclass(frozen=True)
class Weights:
    """Relative weights of the three score parts; normalised when used."""

    tool: float = 0.5
    resources: float = 0.3
    privacy: float = 0.2


@dataclass
class AgentView:
    """An agent as allocation sees it."""

    worker: str
    tools: dict[int, bool]  # tool kind -> local_only
    free_slots: int
    labels: dict[str, str] = field(default_factory=dict)
    privacy_level: int = 1
    cpu_percent: float | None = None
    memory_percent: float | None = None
    disk_percent: float | None = None
    avoid: frozenset[tuple[str, str]] = frozenset()


@dataclass(frozen=True)
class Candidate:
    """A READY subtask that could be assigned now."""

    task_id: str
    key: str
    tool_kind: int
    required_labels: dict[str, str]
    privacy_level: int
    priority: int
    task_priority: int
    task_running: int
    task_max_concurrency: int
    ready_time: datetime
    avoid_worker: str = ""  # prefer any other worker (a REVIEW subtask avoids the author's)
    avoid_tool: int = 0  # prefer any other tool; never use it when avoid_tool_hard
    avoid_tool_hard: bool = False


NO_MATCHING_TOOL = spb.UNSCHEDULABLE_CODE_NO_MATCHING_TOOL
NO_MATCHING_LABELS = spb.UNSCHEDULABLE_CODE_NO_MATCHING_LABELS
NO_PRIVACY_FIT = spb.UNSCHEDULABLE_CODE_NO_PRIVACY_FIT
NO_AGENTS = spb.UNSCHEDULABLE_CODE_NO_AGENTS
NO_FREE_SLOT = spb.UNSCHEDULABLE_CODE_NO_FREE_SLOT


def tool_for(agent: AgentView, cand: Candidate) -> int | None:
    """The tool the agent would run for the candidate, or None if it has none that fits."""
    if cand.tool_kind in agent.tools and not (cand.avoid_tool_hard and cand.tool_kind == cand.avoid_tool):
        return cand.tool_kind
    if cand.tool_kind in (SHELL, TEST):
        return None  # scripted steps need exactly their tool
    usable = [k for k in sorted(agent.tools) if k in AI_TOOLS]
    if cand.avoid_tool:  # another tool than the avoided one first; never it when avoided hard
        usable = [k for k in usable if k != cand.avoid_tool] + (
            [] if cand.avoid_tool_hard else [k for k in usable if k == cand.avoid_tool]
        )
    if cand.privacy_level == SENSITIVE:
        usable.sort(key=lambda k: not agent.tools[k])  # local-only first
    return usable[0] if usable else None


def ineligible(agent: AgentView, cand: Candidate) -> int | None:
    """Why the agent can never take the candidate (an UnschedulableCode), or None if it can."""
    if any(agent.labels.get(k) != v for k, v in cand.required_labels.items()):
        return NO_MATCHING_LABELS
    if cand.privacy_level == SENSITIVE and agent.privacy_level < SENSITIVE:
        return NO_PRIVACY_FIT
    if tool_for(agent, cand) is None:
        return NO_MATCHING_TOOL
    return None


def _free(value: float | None) -> float:
    return 0.5 if value is None else max(0.0, min(1.0, (100.0 - value) / 100.0))


def score(agent: AgentView, cand: Candidate, weights: Weights = Weights()) -> float:
    """How well the agent fits the candidate, 0–1 (assumes it is eligible)."""
    tool = tool_for(agent, cand)
    tool_score = 1.0 if tool == cand.tool_kind or (cand.tool_kind == 0 and tool is not None) else 0.5
    resources = 0.4 * _free(agent.cpu_percent) + 0.4 * _free(agent.memory_percent) + 0.2 * _free(agent.disk_percent)
    if cand.privacy_level == SENSITIVE:
        privacy = 1.0 if tool is not None and agent.tools.get(tool, False) else 0.5
    else:
        privacy = 1.0
    total = weights.tool + weights.resources + weights.privacy
    fit = (weights.tool * tool_score + weights.resources * resources + weights.privacy * privacy) / total
    if cand.avoid_worker or cand.avoid_tool:
        if agent.worker == cand.avoid_worker:
            fit *= 0.5  # another worker wins whenever one is free
        if tool == cand.avoid_tool:
            fit *= 0.75
    return fit


def fair_order(cands: Sequence[Candidate]) -> list[Candidate]:
    """Interleave tasks: highest task priority first, then round-robin between tasks, each task's
    own subtasks by priority and readiness; tasks running less go first within a level."""
    by_level: dict[int, dict[str, list[Candidate]]] = defaultdict(lambda: defaultdict(list))
    for c in cands:
        by_level[c.task_priority][c.task_id].append(c)
    out: list[Candidate] = []
    for level in sorted(by_level, reverse=True):
        queues = by_level[level]
        for q in queues.values():
            q.sort(key=lambda c: (-c.priority, c.ready_time))
        order = sorted(queues, key=lambda t: (queues[t][0].task_running, queues[t][0].ready_time))
        depth = 0
        while True:
            row = [queues[t][depth] for t in order if depth < len(queues[t])]
            if not row:
                break
            out.extend(row)
            depth += 1
    return out


def allocate(
    cands: Iterable[Candidate], agents: Sequence[AgentView], weights: Weights = Weights()
) -> list[tuple[Candidate, str, int]]:
    """Assign candidates to agents: (candidate, worker, tool kind) for each assignment made."""
    free = {a.worker: a.free_slots for a in agents}
    started: dict[str, int] = defaultdict(int)
    plan: list[tuple[Candidate, str, int]] = []
    for cand in fair_order(list(cands)):
        limit = cand.task_max_concurrency
        if limit and cand.task_running + started[cand.task_id] >= limit:
            continue
        best: tuple[float, AgentView] | None = None
        for agent in agents:
            if free[agent.worker] <= 0 or (cand.task_id, cand.key) in agent.avoid:
                continue
            if ineligible(agent, cand) is not None:
                continue
            s = score(agent, cand, weights)
            if best is None or s > best[0]:
                best = (s, agent)
        if best is None:
            continue
        agent = best[1]
        tool = tool_for(agent, cand)
        assert tool is not None
        free[agent.worker] -= 1
        started[cand.task_id] += 1
        plan.append((cand, agent.worker, tool))
    return plan


def unschedulable(cand: Candidate, agents: Sequence[AgentView]) -> int | None:
    """Why no connected agent can ever take the candidate (the most common reason), or None."""
    if not agents:
        return NO_AGENTS
    reasons = [ineligible(a, cand) for a in agents]
    if any(r is None for r in reasons):
        return None
    return max(set(reasons), key=reasons.count)


def candidate_of(r: dict[str, Any]) -> Candidate:
    """A candidate from a claimed or sampled subtask row (store.claim_candidates, store.ready_sample)."""
    return Candidate(
        task_id=r["task_id"],
        key=r["key"],
        tool_kind=r["tool_kind"],
        required_labels=r["required_labels"] or {},
        privacy_level=r["privacy_level"],
        priority=r["priority"],
        task_priority=r["task_priority"],
        task_running=r["running_count"],
        task_max_concurrency=r["max_concurrency"],
        ready_time=r["ready_time"] or datetime.now(UTC),
        avoid_worker=r.get("avoid_worker") or "",
        avoid_tool=r.get("avoid_tool") or 0,
        avoid_tool_hard=bool(r.get("avoid_tool_hard")),
    )
