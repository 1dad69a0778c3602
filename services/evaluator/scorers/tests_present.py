"""Presence of tests for changed code (testability)."""

from __future__ import annotations

from pathlib import PurePosixPath

from ._base import Dimension, Finding, Measure, Severity, Work, register

_CODE = (".py", ".ts", ".tsx", ".js", ".go", ".rs", ".java", ".kt", ".rb", ".c", ".cc", ".cpp")


def is_test(path: str) -> bool:
    """Whether ``path`` looks like a test file in the usual layouts of the languages we see."""
    p = PurePosixPath(path)
    name = p.name
    return (
        any(part in ("tests", "test", "__tests__", "spec") for part in p.parts[:-1])
        or name.startswith("test_")
        or p.stem.endswith(("_test", ".test", ".spec", "Test"))
    )


class TestsPresentScorer:
    """Changed source files without any changed test file score low; no source files, no measure."""

    name = "tests-present"

    def score(self, work: Work) -> list[Measure]:
        live = [f for f in work.files if not f.deleted and f.path.endswith(_CODE)]
        sources = [f for f in live if not is_test(f.path)]
        tests = [f for f in live if is_test(f.path)]
        if not sources:
            return []
        if tests:
            return [Measure(Dimension.TESTABILITY, 10.0, f"{len(tests)} test files for {len(sources)} source files")]
        findings = tuple(
            Finding(
                f.path,
                f.added[0][0] if f.added else 0,
                Severity.MEDIUM,
                "changed code without tests",
                "no-tests",
                self.name,
            )
            for f in sources
        )
        return [Measure(Dimension.TESTABILITY, 2.0, f"{len(sources)} source files changed, no tests", findings)]


register(TestsPresentScorer())
