"""Security findings of bandit (unsafe calls, injection patterns) on the Python files a change created."""

from __future__ import annotations

import json

from ._base import Dimension, Finding, Measure, Severity, Work, penalised, register
from ._tools import run_on_files

_SEVERITY = {"LOW": Severity.LOW, "MEDIUM": Severity.MEDIUM, "HIGH": Severity.HIGH}


class BanditScorer:
    """Whole files only, like ruff; a file bandit cannot parse is reported by ruff, not here."""

    name = "bandit"

    def score(self, work: Work) -> list[Measure]:
        whole = [f for f in work.python_sources() if f.content is not None]
        if not whole:
            return []
        out, root, _ = run_on_files(whole, ["bandit", "-q", "-r", "-f", "json", "."])
        report = json.loads(out or "{}")
        findings = []
        for item in report.get("results", []):
            path = str(item.get("filename", "")).removeprefix(str(root)).lstrip("./")
            findings.append(
                Finding(
                    path,
                    int(item.get("line_number", 0)),
                    _SEVERITY.get(str(item.get("issue_severity")), Severity.LOW),
                    str(item.get("issue_text", "")),
                    str(item.get("test_id", "")),
                    self.name,
                )
            )
        parsed = len(whole) - len(report.get("errors", []))
        if parsed <= 0:
            return []
        score = penalised(findings, {Severity.HIGH: 4.0, Severity.MEDIUM: 2.0, Severity.LOW: 1.0})
        summary = f"{len(findings)} bandit findings" if findings else f"bandit clean on {parsed} files"
        return [Measure(Dimension.SECURITY, score, summary, tuple(findings))]


register(BanditScorer())
