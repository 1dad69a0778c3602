"""Subtask graphs: the domain form of a plan, its validation, and its order.

A plan is a list of :class:`StepSpec` whose dependencies name other steps by key. Validation
collects every problem as a ``(field path, what is wrong)`` pair, so the API can answer
INVALID_ARGUMENT naming each bad field at once; nothing is created from an invalid plan.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

KEY_PATTERN = re.compile(r"^[a-z][a-z0-9-]{0,62}$")
MAX_SUBTASKS = 10_000
MAX_DEPENDENCIES = 100
MAX_DESCRIPTION = 64 * 1024
MAX_DISPLAY_NAME = 200
MAX_ATTEMPTS_LIMIT = 20
KNOWN_TOOLS = frozenset(range(1, 7))  # maw.common.v1.ToolKind values CLAUDE_CODE..TEST
KNOWN_TYPES = frozenset(range(1, 10))  # maw.common.v1.SubtaskType values


@dataclass
class StepSpec:
    """One subtask of a plan, before it exists."""

    key: str
    display_name: str = ""
    description: str = ""
    type: int = 0
    dependencies: list[str] = field(default_factory=list)
    complexity: int = 0
    priority: int = 0
    tool_kind: int = 0
    model: str = ""
    required_labels: dict[str, str] = field(default_factory=dict)
    max_attempts: int = 0
    tool_options: dict[str, Any] = field(default_factory=dict)


Violation = tuple[str, str]


def validate(steps: Sequence[StepSpec], prefix: str = "graph.subtasks") -> list[Violation]:
    """Every problem of the plan; empty when it is a valid DAG within limits."""
    problems: list[Violation] = []
    if not steps:
        return [(prefix, "a plan needs at least one subtask")]
    if len(steps) > MAX_SUBTASKS:
        return [(prefix, f"at most {MAX_SUBTASKS} subtasks per task, got {len(steps)}")]
    seen: dict[str, int] = {}
    for i, step in enumerate(steps):
        here = f"{prefix}[{i}]"
        if not KEY_PATTERN.match(step.key):
            problems.append((f"{here}.key", "must match [a-z][a-z0-9-]{0,62}"))
        elif step.key in seen:
            problems.append((f"{here}.key", f"duplicate key {step.key!r} (also at index {seen[step.key]})"))
        else:
            seen[step.key] = i
        problems += _check_fields(step, here)
    for i, step in enumerate(steps):
        here = f"{prefix}[{i}].dependencies"
        if len(step.dependencies) > MAX_DEPENDENCIES:
            problems.append((here, f"at most {MAX_DEPENDENCIES} dependencies"))
        for j, dep in enumerate(step.dependencies):
            if dep == step.key:
                problems.append((f"{here}[{j}]", "a subtask cannot depend on itself"))
            elif dep not in seen:
                problems.append((f"{here}[{j}]", f"unknown subtask key {dep!r}"))
        if len(set(step.dependencies)) != len(step.dependencies):
            problems.append((here, "lists a dependency twice"))
    if not problems:
        cycle = find_cycle(steps)
        if cycle:
            problems.append((prefix, "dependencies form a cycle: " + " -> ".join(cycle)))
    return problems


def _check_fields(step: StepSpec, here: str) -> Iterable[Violation]:
    if len(step.display_name) > MAX_DISPLAY_NAME:
        yield f"{here}.display_name", f"at most {MAX_DISPLAY_NAME} characters"
    if len(step.description.encode()) > MAX_DESCRIPTION:
        yield f"{here}.description", f"at most {MAX_DESCRIPTION} bytes"
    if step.type and step.type not in KNOWN_TYPES:
        yield f"{here}.type", f"unknown subtask type {step.type}"
    if not 0 <= step.complexity <= 5:
        yield f"{here}.complexity", "must be 1-5 (0 for the default, 3)"
    if not 0 <= step.priority <= 1000:
        yield f"{here}.priority", "must be 0-1000"
    if step.tool_kind and step.tool_kind not in KNOWN_TOOLS:
        yield f"{here}.preferred_tool.kind", f"unknown tool kind {step.tool_kind}"
    if not 0 <= step.max_attempts <= MAX_ATTEMPTS_LIMIT:
        yield f"{here}.max_attempts", f"must be 0-{MAX_ATTEMPTS_LIMIT} (0 for the task's default)"
    for k, v in step.required_labels.items():
        if not k or len(k) > 63 or len(v) > 63:
            yield f"{here}.required_labels", "label keys are 1-63 characters, values at most 63"


def find_cycle(steps: Sequence[StepSpec]) -> list[str]:
    """One dependency cycle as a key path (first key repeated at the end), or [] if acyclic."""
    deps = {s.key: s.dependencies for s in steps}
    white, grey, black = 0, 1, 2
    colour = dict.fromkeys(deps, white)
    for start, first in deps.items():
        if colour[start] != white:
            continue
        # Iterative DFS: a path stack of (key, iterator over its dependencies).
        path = [start]
        iters = [iter(first)]
        colour[start] = grey
        while iters:
            nxt = next(iters[-1], None)
            if nxt is None:
                colour[path.pop()] = black
                iters.pop()
            elif colour.get(nxt) == grey:
                return [*path[path.index(nxt) :], nxt]
            elif colour.get(nxt) == white:
                colour[nxt] = grey
                path.append(nxt)
                iters.append(iter(deps[nxt]))
    return []


def dependents(steps: Sequence[StepSpec]) -> dict[str, list[str]]:
    """For each key, the keys that depend on it."""
    out: dict[str, list[str]] = {s.key: [] for s in steps}
    for step in steps:
        for dep in step.dependencies:
            out[dep].append(step.key)
    return out


def topological_order(steps: Sequence[StepSpec]) -> list[str]:
    """Keys in an order where every step comes after its dependencies (stable by plan order)."""
    remaining = {s.key: len(s.dependencies) for s in steps}
    after = dependents(steps)
    order = [s.key for s in steps if not s.dependencies]
    i = 0
    while i < len(order):
        for nxt in after[order[i]]:
            remaining[nxt] -= 1
            if remaining[nxt] == 0:
                order.append(nxt)
        i += 1
    return order
