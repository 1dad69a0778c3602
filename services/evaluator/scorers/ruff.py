"""Syntax and lint findings of ruff on the Python files a change created (code quality)."""

from __future__ import annotations

import json

from ._base import Dimension, Finding, Measure, Severity, Work, penalised, register
from ._tools import run_on_files

# pyflakes, pycodestyle errors, bugbear and complexity: findings that matter whatever the project style.
_SELECT = "E,F,W,B,C90"
_SYNTAX = ("invalid-syntax", "syntax-error", "E999")


class RuffScorer:
    """Lints whole files only: a fragment of a modified file would give false syntax errors."""

    name = "ruff"

    def score(self, work: Work) -> list[Measure]:
        whole = [f for f in work.python_sources() if f.content is not None]
        if not whole:
            return []
        out, root, _ = run_on_files(
            whole,
            [
                "ruff",
                "check",
                "--isolated",
                "--no-cache",
                "--output-format",
                "json",
                "--select",
                _SELECT,
                "--line-length",
                "120",
                ".",
            ],
        )
        findings = []
        for item in json.loads(out or "[]"):
            code = item.get("code") or "invalid-syntax"
            if code in _SYNTAX:
                code = "invalid-syntax"
            severity = Severity.HIGH if code == "invalid-syntax" or code.startswith("F8") else Severity.LOW
            path = str(item.get("filename", "")).removeprefix(str(root)).lstrip("/")
            line = int((item.get("location") or {}).get("row", 0))
            findings.append(Finding(path, line, severity, str(item.get("message", "")), code, self.name))
        broken = any(f.rule == "invalid-syntax" for f in findings)
        score = 0.0 if broken else penalised(findings, {Severity.HIGH: 3.0, Severity.LOW: 1.0})
        summary = (
            ("syntax error" if broken else f"{len(findings)} lint findings in {len(whole)} files")
            if findings
            else f"ruff clean on {len(whole)} files"
        )
        return [Measure(Dimension.CODE_QUALITY, score, summary, tuple(findings))]


register(RuffScorer())
