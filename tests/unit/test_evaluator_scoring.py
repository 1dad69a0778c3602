"""The evaluator's pure parts: diff reading, honest scoring, verdict bands, and the scorer registry."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.evaluator.diffs import parse_diff
from services.evaluator.judgement import Rules, Trigger, Verdict, decide
from services.evaluator.scorers import Dimension, Finding, Measure, Severity, Work, register, registered, unregister
from services.evaluator.scoring import DEFAULT_WEIGHTS, Grade, combine, evaluate, grade_of

CREATED = """diff --git a/pkg/app.py b/pkg/app.py
new file mode 100644
--- /dev/null
+++ b/pkg/app.py
@@ -0,0 +1,2 @@
+import os
+x = 1
"""

MODIFIED = """--- a/lib.py
+++ b/lib.py
@@ -10,3 +10,4 @@ def f():
     a = 1
-    b = 2
+    b = 3
+    c = 4
     return a
--- a/other.py
+++ b/other.py
@@ -1 +1 @@
-old
+new
"""


def test_a_created_file_is_whole_and_a_modified_one_only_has_its_added_lines_numbered() -> None:
    (created,) = parse_diff(CREATED)
    assert (created.path, created.created, created.content) == ("pkg/app.py", True, "import os\nx = 1\n")
    lib, other = parse_diff(MODIFIED)
    assert lib.path == "lib.py" and lib.content is None, "a fragment is never passed off as the whole file"
    assert lib.added == [(11, "    b = 3"), (12, "    c = 4")] and lib.removed == 1
    assert other.added == [(1, "new")], "a second file without a git header is still found"


@given(st.text())
def test_any_text_parses_without_raising(text: str) -> None:
    parse_diff(text)


def test_unmeasured_dimensions_are_left_out_and_the_measured_weights_are_normalised() -> None:
    card = combine(
        [("a", Measure(Dimension.SECURITY, 4.0, "s")), ("b", Measure(Dimension.TESTABILITY, 10.0, "t"))],
        DEFAULT_WEIGHTS,
    )
    by = {d.dimension: d for d in card.dimensions}
    assert not by[Dimension.COMPLETENESS].measured and by[Dimension.COMPLETENESS].weight == 0
    assert by[Dimension.SECURITY].weight == pytest.approx(0.2 / 0.3)
    assert card.overall == pytest.approx(round((4 * 0.2 + 10 * 0.1) / 0.3, 1))
    assert card.grade == Grade.ACCEPTABLE


def test_a_dimension_takes_its_worst_measure_and_keeps_every_finding() -> None:
    finding = Finding("a.py", 3, Severity.HIGH, "bad", "R1", "x")
    card = combine(
        [("x", Measure(Dimension.SECURITY, 2.0, "bad", (finding,))), ("y", Measure(Dimension.SECURITY, 9.0, "ok"))],
        DEFAULT_WEIGHTS,
    )
    security = next(d for d in card.dimensions if d.dimension == Dimension.SECURITY)
    assert (security.score, security.scorers, security.evidence) == (2.0, ["x", "y"], [finding])


def test_nothing_measured_gives_no_score_and_no_grade() -> None:
    card = combine([], DEFAULT_WEIGHTS)
    assert (card.overall, card.grade) == (None, Grade.UNSPECIFIED)


@pytest.mark.parametrize(
    ("score", "grade"),
    [(9.0, Grade.EXCELLENT), (8.9, Grade.GOOD), (7.0, Grade.GOOD), (5.0, Grade.ACCEPTABLE), (3.0, Grade.POOR),
     (2.9, Grade.FAIL), (0.0, Grade.FAIL)],
)  # fmt: skip
def test_grades_follow_the_bands(score: float, grade: Grade) -> None:
    assert grade_of(score) == grade


def test_verdicts_follow_the_policy_bands() -> None:
    rules = Rules()
    assert decide(4.9, 0, rules).verdict == Verdict.CORRECT
    assert decide(4.9, 2, rules).verdict == Verdict.CORRECT
    escalated = decide(4.9, 3, rules)
    assert (escalated.verdict, escalated.trigger) == (Verdict.ESCALATE, Trigger.ESCALATION)
    assert decide(4.9, 3, Rules(triggers=frozenset())).verdict == Verdict.REJECT
    low = decide(6.0, 0, rules)
    assert (low.verdict, low.trigger) == (Verdict.ESCALATE, Trigger.LOW_SCORE)
    assert decide(6.0, 0, Rules(triggers=frozenset({Trigger.ESCALATION}))).verdict == Verdict.ACCEPT
    assert decide(7.0, 0, rules).verdict == Verdict.ACCEPT
    assert decide(None, 0, rules).verdict == Verdict.ACCEPT, "nothing measurable: judged by outcome"


class _Docstrings:
    """An added scorer (docs/evaluation.md): Python files need a module docstring."""

    name = "docstrings"

    def score(self, work: Work) -> list[Measure]:
        sources = [f for f in work.python_sources() if f.content is not None]
        if not sources:
            return []
        missing = [f for f in sources if not f.content or not f.content.lstrip().startswith('"""')]
        findings = tuple(Finding(f.path, 1, Severity.LOW, "no module docstring", "D100", self.name) for f in missing)
        return [Measure(Dimension.ARCHITECTURE, 10.0 - 5.0 * len(missing), "docstrings", findings)]


@pytest.fixture
def docstrings() -> Iterator[None]:
    register(_Docstrings())
    yield
    unregister("docstrings")


def test_an_added_scorer_is_used_and_its_evidence_counts(docstrings: None) -> None:
    assert "docstrings" in registered()
    work = Work(files=tuple(parse_diff(CREATED)))
    card = evaluate(work, registered(), DEFAULT_WEIGHTS, ["docstrings"])
    architecture = next(d for d in card.dimensions if d.dimension == Dimension.ARCHITECTURE)
    assert architecture.measured and architecture.scorers == ["docstrings"]
    assert [(f.path, f.rule) for f in architecture.evidence] == [("pkg/app.py", "D100")]
    assert card.overall == 5.0, "the only measured dimension decides the overall score"


def test_a_broken_scorer_is_reported_and_the_others_still_count() -> None:
    class Broken:
        name = "broken"

        def score(self, work: Work) -> list[Measure]:
            raise RuntimeError("boom")

    scorers = {"broken": Broken(), "secrets": registered()["secrets"]}
    card = evaluate(Work(files=tuple(parse_diff(CREATED))), scorers, DEFAULT_WEIGHTS)
    assert card.broken == ["broken"] and card.overall == 10.0


def test_the_static_scorers_find_syntax_errors_secrets_unsafe_calls_and_missing_tests() -> None:
    diff = (
        '--- /dev/null\n+++ b/svc.py\n@@ -0,0 +1,4 @@\n+import subprocess\n+TOKEN = "ghp_'
        + "a" * 36
        + '"\n+def run(cmd):\n+    return subprocess.call(cmd, shell=True)\n'
    )
    card = evaluate(Work(files=tuple(parse_diff(diff))), registered(), DEFAULT_WEIGHTS)
    rules = {(f.scorer, f.rule) for d in card.dimensions for f in d.evidence}
    assert ("secrets", "github-token") in rules
    assert ("bandit", "B602") in rules, "shell=True is a bandit finding"
    assert ("tests-present", "no-tests") in rules
    assert card.overall is not None and card.overall < 5.0
    broken = evaluate(Work(files=tuple(parse_diff(CREATED.replace("x = 1", "def f(:")))), registered(), DEFAULT_WEIGHTS)
    quality = next(d for d in broken.dimensions if d.dimension == Dimension.CODE_QUALITY)
    assert quality.score == 0.0 and any(f.rule == "invalid-syntax" and f.line == 2 for f in quality.evidence)
