"""Built-in workflow templates: a task type's default subtask DAG.

The six plans of the system we replace, with one fix: the review steps prefer a different tool
than the step they review (Claude writes, Gemini reviews), so peer review is cross-tool by default.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .dag import StepSpec

# maw.common.v1 enum values, named for readability.
CLAUDE, GEMINI, CODEX = 1, 2, 3
GENERATE, REVIEW, FIX, TEST, DOCS, ANALYSIS = 1, 2, 3, 4, 5, 6
REFACTOR = 9
# maw.scheduler.v1.TaskType values.
DEVELOP_FEATURE, BUG_FIX, REFACTOR_TASK, CODE_REVIEW, DOCUMENTATION, TESTING = 1, 2, 3, 4, 5, 6


@dataclass(frozen=True)
class BuiltinTemplate:
    """A read-only template shipped with maw."""

    template_id: str
    display_name: str
    description: str
    task_type: int
    steps: tuple[StepSpec, ...] = field(default_factory=tuple)

    @property
    def name(self) -> str:
        """Resource name, ``templates/{id}``."""
        return f"templates/{self.template_id}"


def _step(key: str, name: str, kind: int, tool: int, complexity: int, priority: int, *deps: str) -> StepSpec:
    return StepSpec(
        key=key,
        display_name=name,
        description=name,
        type=kind,
        tool_kind=tool,
        complexity=complexity,
        priority=priority,
        dependencies=list(deps),
    )


BUILTIN: dict[str, BuiltinTemplate] = {
    t.name: t
    for t in (
        BuiltinTemplate(
            "develop-feature",
            "Develop a feature",
            "Generate the code, then review it and generate tests in parallel, then document it.",
            DEVELOP_FEATURE,
            (
                _step("generate-code", "Code generation", GENERATE, CLAUDE, 3, 100),
                _step("review-code", "Code review", REVIEW, GEMINI, 2, 80, "generate-code"),
                _step("generate-tests", "Test generation", TEST, CLAUDE, 2, 70, "generate-code"),
                _step("document", "Documentation", DOCS, CLAUDE, 1, 50, "review-code", "generate-tests"),
            ),
        ),
        BuiltinTemplate(
            "bug-fix",
            "Fix a bug",
            "Analyse the bug, fix it, then add regression tests.",
            BUG_FIX,
            (
                _step("analyse-bug", "Bug analysis", ANALYSIS, CLAUDE, 2, 100),
                _step("fix-bug", "Fix implementation", FIX, CLAUDE, 3, 90, "analyse-bug"),
                _step("regression-tests", "Regression testing", TEST, GEMINI, 2, 80, "fix-bug"),
            ),
        ),
        BuiltinTemplate(
            "refactor",
            "Refactor",
            "Analyse the code, refactor it, then verify with tests.",
            REFACTOR_TASK,
            (
                _step("analyse-code", "Code analysis", ANALYSIS, CLAUDE, 2, 100),
                _step("refactor", "Refactoring", REFACTOR, CLAUDE, 4, 90, "analyse-code"),
                _step("verify-tests", "Test verification", TEST, GEMINI, 2, 80, "refactor"),
            ),
        ),
        BuiltinTemplate(
            "code-review",
            "Review code",
            "Static analysis and a security review in parallel, then a report.",
            CODE_REVIEW,
            (
                _step("static-analysis", "Static analysis", ANALYSIS, CLAUDE, 1, 100),
                _step("security-review", "Security review", REVIEW, GEMINI, 2, 90),
                _step("review-report", "Review report", DOCS, CLAUDE, 1, 80, "static-analysis", "security-review"),
            ),
        ),
        BuiltinTemplate(
            "documentation",
            "Write documentation",
            "API documentation and a user guide in parallel, then the README.",
            DOCUMENTATION,
            (
                _step("api-docs", "API documentation", DOCS, CLAUDE, 2, 100),
                _step("user-guide", "User guide", DOCS, GEMINI, 2, 90),
                _step("readme", "README update", DOCS, CLAUDE, 1, 80, "api-docs", "user-guide"),
            ),
        ),
        BuiltinTemplate(
            "testing",
            "Write tests",
            "Plan the tests, write unit and integration tests in parallel, then report.",
            TESTING,
            (
                _step("plan-tests", "Test planning", ANALYSIS, CLAUDE, 2, 100),
                _step("unit-tests", "Unit test implementation", TEST, CLAUDE, 2, 90, "plan-tests"),
                _step("integration-tests", "Integration test implementation", TEST, GEMINI, 3, 80, "plan-tests"),
                _step("test-report", "Test execution report", DOCS, CLAUDE, 1, 70, "unit-tests", "integration-tests"),
            ),
        ),
    )
}

BY_TASK_TYPE: dict[int, BuiltinTemplate] = {t.task_type: t for t in BUILTIN.values()}

CONTEXT_CHARS = 4000


def prompt_for(step: StepSpec, task_title: str, task_description: str, requirements: list[str]) -> str:
    """The instructions for a step's tool: the step's own text, then the parent task as context."""
    parts = [f"# {step.display_name or step.key}", step.description or step.display_name]
    context = task_description[:CONTEXT_CHARS]
    if len(task_description) > CONTEXT_CHARS:
        context += "\n…(the full description is in the task context)"
    parts.append(f"## Task context: {task_title}\n{context}")
    if requirements:
        parts.append("## Requirements\n" + "\n".join(f"- {r}" for r in requirements))
    return "\n\n".join(p for p in parts if p)
