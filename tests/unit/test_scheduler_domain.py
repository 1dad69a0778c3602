"""Pure scheduler logic: DAG validation, state machines, templates, allocation."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st
from maw.common.v1 import machine_pb2, work_pb2
from maw.scheduler.v1 import resources_pb2 as spb

from services.scheduler import allocation, dag, states
from services.scheduler.templates import BUILTIN, prompt_for

# -- DAG -------------------------------------------------------------------------------------------------


def steps(*pairs: tuple[str, list[str]]) -> list[dag.StepSpec]:
    return [dag.StepSpec(key=k, dependencies=d) for k, d in pairs]


def test_a_valid_dag_has_no_problems_and_a_topological_order() -> None:
    plan = steps(("a", []), ("b", ["a"]), ("c", ["a"]), ("d", ["b", "c"]))
    assert dag.validate(plan) == []
    order = dag.topological_order(plan)
    assert order.index("a") < order.index("b") < order.index("d")
    assert order.index("c") < order.index("d")
    assert dag.dependents(plan) == {"a": ["b", "c"], "b": ["d"], "c": ["d"], "d": []}


def test_a_cycle_is_found_with_its_path() -> None:
    plan = steps(("a", []), ("b", ["a", "d"]), ("c", ["b"]), ("d", ["c"]))
    assert dag.find_cycle(plan) == ["b", "d", "c", "b"]
    [(field, message)] = dag.validate(plan)
    assert field == "graph.subtasks" and "b -> d -> c -> b" in message


def test_every_problem_is_reported_with_its_field() -> None:
    plan = [
        dag.StepSpec(key="a", dependencies=["a", "ghost"], complexity=9, tool_kind=42),
        dag.StepSpec(key="a"),
        dag.StepSpec(key="Not Valid"),
    ]
    fields = {f for f, _ in dag.validate(plan)}
    assert fields == {
        "graph.subtasks[0].dependencies[0]",
        "graph.subtasks[0].dependencies[1]",
        "graph.subtasks[0].complexity",
        "graph.subtasks[0].preferred_tool.kind",
        "graph.subtasks[1].key",
        "graph.subtasks[2].key",
    }


def test_size_limits() -> None:
    assert dag.validate([]) == [("graph.subtasks", "a plan needs at least one subtask")]
    too_many = [dag.StepSpec(key=f"s{i}") for i in range(dag.MAX_SUBTASKS + 1)]
    assert "at most" in dag.validate(too_many)[0][1]


@st.composite
def random_graphs(draw: st.DrawFn) -> list[dag.StepSpec]:
    n = draw(st.integers(1, 12))
    keys = [f"k{i}" for i in range(n)]
    return [
        dag.StepSpec(key=k, dependencies=draw(st.lists(st.sampled_from(keys), unique=True, max_size=4))) for k in keys
    ]


@given(random_graphs())
def test_validation_agrees_with_topological_sorting(plan: list[dag.StepSpec]) -> None:
    has_self = any(s.key in s.dependencies for s in plan)
    order = dag.topological_order(plan)
    acyclic = len(order) == len(plan) and not has_self
    problems = dag.validate(plan)
    assert (problems == []) == acyclic
    if acyclic:
        position = {k: i for i, k in enumerate(order)}
        assert all(position[d] < position[s.key] for s in plan for d in s.dependencies)
    elif not has_self:
        cycle = dag.find_cycle(plan)
        deps = {s.key: set(s.dependencies) for s in plan}
        assert cycle[0] == cycle[-1]
        assert all(b in deps[a] for a, b in itertools.pairwise(cycle))


@given(st.lists(st.text(max_size=8), max_size=6), st.integers(-5, 30))
def test_validation_never_raises_on_junk(keys: list[str], attempts: int) -> None:
    plan = [dag.StepSpec(key=k, dependencies=keys[:2], max_attempts=attempts) for k in keys]
    assert isinstance(dag.validate(plan), list)


# -- states ------------------------------------------------------------------------------------------------


def test_state_numbers_match_the_contract() -> None:
    assert {s.name: int(s) for s in states.TaskState} == {
        n.removeprefix("TASK_STATE_"): v for n, v in spb.TaskState.items() if v
    }
    assert {s.name: int(s) for s in states.SubtaskState} == {
        n.removeprefix("SUBTASK_STATE_"): v for n, v in spb.SubtaskState.items() if v
    }


def test_terminal_tasks_only_reopen_to_running_and_cancelled_ones_never_move() -> None:
    for terminal in states.TERMINAL_TASK:
        for target in states.TaskState:
            if terminal != states.TaskState.CANCELLED and target == states.TaskState.RUNNING:
                states.check_task(terminal, target)  # a rollback to a checkpoint reopens it
                continue
            with pytest.raises(states.TransitionError):
                states.check_task(terminal, target)


def test_every_subtask_state_has_a_row_and_leased_work_can_always_be_requeued() -> None:
    assert set(states.SUBTASK_TRANSITIONS) == set(states.SubtaskState)
    for leased in states.LEASED:
        states.check_subtask(leased, states.SubtaskState.READY)
    with pytest.raises(states.TransitionError):
        states.check_subtask(states.SubtaskState.PENDING, states.SubtaskState.RUNNING)


@pytest.mark.parametrize(
    ("counts", "outcome"),
    [
        ((3, 3, 0, 0), states.TaskState.SUCCEEDED),
        ((3, 2, 1, 0), states.TaskState.FAILED),
        ((3, 1, 0, 0), None),
        ((3, 1, 0, 2), states.TaskState.CANCELLED),
    ],
)
def test_task_outcome_from_counts(counts: tuple[int, int, int, int], outcome: states.TaskState | None) -> None:
    assert states.task_outcome(*counts) == outcome


# -- templates ------------------------------------------------------------------------------------------------


def test_builtin_templates_are_valid_dags_with_the_predecessors_shapes() -> None:
    for template in BUILTIN.values():
        assert dag.validate(list(template.steps)) == [], template.name
    develop = [(s.key, s.dependencies) for s in BUILTIN["templates/develop-feature"].steps]
    assert develop == [
        ("generate-code", []),
        ("review-code", ["generate-code"]),
        ("generate-tests", ["generate-code"]),
        ("document", ["review-code", "generate-tests"]),
    ]
    assert set(BUILTIN) == {
        "templates/develop-feature", "templates/bug-fix", "templates/refactor", "templates/code-review",
        "templates/documentation", "templates/testing",
    }  # fmt: skip


def test_review_steps_prefer_another_tool_than_the_code_they_review() -> None:
    steps_ = {s.key: s for s in BUILTIN["templates/develop-feature"].steps}
    assert steps_["review-code"].tool_kind != steps_["generate-code"].tool_kind


def test_prompt_carries_the_parent_task() -> None:
    step = BUILTIN["templates/bug-fix"].steps[0]
    prompt = prompt_for(step, "Fix login", "Users cannot log in after reset." * 10, ["keep the API"])
    assert "Fix login" in prompt and "Users cannot log in after reset." in prompt and "- keep the API" in prompt
    long = prompt_for(step, "t", "x" * 10_000, [])
    assert "full description is in the task context" in long


# -- allocation ---------------------------------------------------------------------------------------------------

NOW = datetime(2026, 1, 1, tzinfo=UTC)
CLAUDE, GEMINI, OLLAMA, SHELL = (
    machine_pb2.TOOL_KIND_CLAUDE_CODE,
    machine_pb2.TOOL_KIND_GEMINI_CLI,
    machine_pb2.TOOL_KIND_OLLAMA,
    machine_pb2.TOOL_KIND_SHELL,
)


def cand(task: str = "t", key: str = "k", tool: int = CLAUDE, **kw: object) -> allocation.Candidate:
    base: dict[str, object] = {
        "task_id": task, "key": key, "tool_kind": tool, "required_labels": {}, "privacy_level": 1, "priority": 0,
        "task_priority": 2, "task_running": 0, "task_max_concurrency": 0, "ready_time": NOW,
    }  # fmt: skip
    base.update(kw)
    return allocation.Candidate(**base)  # type: ignore[arg-type]


def agent(worker: str, tools: dict[int, bool], slots: int = 1, **kw: object) -> allocation.AgentView:
    return allocation.AgentView(worker=worker, tools=tools, free_slots=slots, **kw)  # type: ignore[arg-type]


def test_score_follows_the_documented_weights() -> None:
    exact = agent("a", {CLAUDE: False}, cpu_percent=0.0, memory_percent=0.0, disk_percent=0.0)
    other = agent("b", {GEMINI: False}, cpu_percent=0.0, memory_percent=0.0, disk_percent=0.0)
    assert allocation.score(exact, cand()) == pytest.approx(1.0)
    assert allocation.score(other, cand()) == pytest.approx(0.5 * 0.5 + 0.3 + 0.2)
    busy = agent("c", {CLAUDE: False}, cpu_percent=100.0, memory_percent=50.0, disk_percent=None)
    assert allocation.score(busy, cand()) == pytest.approx(0.5 + 0.3 * (0.4 * 0 + 0.4 * 0.5 + 0.2 * 0.5) + 0.2)


def test_sensitive_work_prefers_local_tools_and_needs_an_agent_that_accepts_it() -> None:
    sensitive = cand(tool=CLAUDE, privacy_level=work_pb2.PRIVACY_LEVEL_SENSITIVE)
    local = agent("local", {OLLAMA: True}, privacy_level=2)
    cloud = agent("cloud", {CLAUDE: False}, privacy_level=2)
    refuses = agent("refuses", {OLLAMA: True}, privacy_level=1)
    assert allocation.ineligible(refuses, sensitive) == allocation.NO_PRIVACY_FIT
    assert allocation.tool_for(local, sensitive) == OLLAMA
    assert allocation.allocate([sensitive], [cloud, local, refuses])[0][1] in ("local", "cloud")
    assert allocation.score(local, sensitive) > 0 and allocation.score(cloud, sensitive) > 0


def test_labels_and_scripted_tools_are_hard_constraints() -> None:
    needs_gpu = cand(required_labels={"gpu": "a100"})
    assert allocation.ineligible(agent("a", {CLAUDE: False}, labels={"gpu": "t4"}), needs_gpu) == 2
    assert allocation.ineligible(agent("a", {CLAUDE: False}), cand(tool=SHELL)) == allocation.NO_MATCHING_TOOL
    assert allocation.unschedulable(needs_gpu, [agent("a", {CLAUDE: False})]) == allocation.NO_MATCHING_LABELS
    assert allocation.unschedulable(needs_gpu, []) == allocation.NO_AGENTS


def test_capacity_slots_and_task_concurrency_are_respected() -> None:
    many = [cand(key=f"k{i}") for i in range(10)]
    plan = allocation.allocate(many, [agent("a", {CLAUDE: False}, slots=3), agent("b", {CLAUDE: False}, slots=2)])
    assert len(plan) == 5
    assert sum(1 for _, w, _ in plan if w == "a") == 3
    limited = [cand(key=f"k{i}", task_max_concurrency=2, task_running=1) for i in range(5)]
    assert len(allocation.allocate(limited, [agent("a", {CLAUDE: False}, slots=10)])) == 1


def test_tasks_share_slots_fairly_and_priority_goes_first() -> None:
    big = [cand(task="big", key=f"k{i}", ready_time=NOW - timedelta(seconds=100)) for i in range(10)]
    small = [cand(task="small", key=f"k{i}") for i in range(2)]
    plan = allocation.allocate(big + small, [agent("a", {CLAUDE: False}, slots=4)])
    assert sorted(c.task_id for c, _, _ in plan) == ["big", "big", "small", "small"]
    urgent = [cand(task="urgent", key="u", task_priority=4)]
    plan = allocation.allocate(big + urgent, [agent("a", {CLAUDE: False}, slots=1)])
    assert plan[0][0].task_id == "urgent"


def test_an_agent_that_declined_is_avoided() -> None:
    c = cand()
    plan = allocation.allocate(
        [c], [agent("a", {CLAUDE: False}, avoid=frozenset({("t", "k")})), agent("b", {CLAUDE: False})]
    )
    assert plan[0][1] == "b"
