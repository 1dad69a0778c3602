"""Size and complexity of a change: very large changes and very long or deeply nested functions (code quality)."""

from __future__ import annotations

import ast

from ._base import Dimension, Finding, Measure, Severity, Work, penalised, register

_MAX_CHANGED_LINES = 800
_MAX_FUNCTION_LINES = 80
_MAX_DEPTH = 5


def _depth(node: ast.AST, level: int = 0) -> int:
    nested = (ast.If, ast.For, ast.AsyncFor, ast.While, ast.With, ast.AsyncWith, ast.Try, ast.Match)
    deepest = level
    for child in ast.iter_child_nodes(node):
        deepest = max(deepest, _depth(child, level + 1 if isinstance(child, nested) else level))
    return deepest


class SizeScorer:
    """Measures the diff's size always, and function length and nesting in created Python files."""

    name = "size"

    def score(self, work: Work) -> list[Measure]:
        files = [f for f in work.files if not f.deleted]
        changed = sum(len(f.added) + f.removed for f in work.files)
        if not changed:
            return []
        findings = []
        if changed > _MAX_CHANGED_LINES:
            findings.append(
                Finding(
                    files[0].path if files else "",
                    0,
                    Severity.MEDIUM,
                    f"{changed} changed lines: hard to review (over {_MAX_CHANGED_LINES})",
                    "large-change",
                    self.name,
                )
            )
        for f in work.python_sources():
            if f.content is None:
                continue
            try:
                tree = ast.parse(f.content)
            except SyntaxError:
                continue  # ruff reports it
            for node in ast.walk(tree):
                if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    continue
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > _MAX_FUNCTION_LINES:
                    findings.append(
                        Finding(
                            f.path,
                            node.lineno,
                            Severity.LOW,
                            f"{node.name} is {length} lines long",
                            "long-function",
                            self.name,
                        )
                    )
                if _depth(node) > _MAX_DEPTH:
                    findings.append(
                        Finding(
                            f.path,
                            node.lineno,
                            Severity.MEDIUM,
                            f"{node.name} nests deeper than {_MAX_DEPTH}",
                            "deep-nesting",
                            self.name,
                        )
                    )
        score = penalised(findings, {Severity.MEDIUM: 2.0, Severity.LOW: 1.0})
        summary = f"{changed} changed lines" + (f", {len(findings)} size findings" if findings else "")
        return [Measure(Dimension.CODE_QUALITY, score, summary, tuple(findings))]


register(SizeScorer())
