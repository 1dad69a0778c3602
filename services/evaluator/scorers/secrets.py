"""Secret patterns in added lines: keys, tokens and passwords written into code (security)."""

from __future__ import annotations

import re

from ._base import Dimension, Finding, Measure, Severity, Work, penalised, register

_PATTERNS: list[tuple[str, re.Pattern[str], Severity]] = [
    ("aws-access-key", re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"), Severity.CRITICAL),
    ("private-key", re.compile(r"-----BEGIN (RSA |EC |OPENSSH |DSA |PGP )?PRIVATE KEY"), Severity.CRITICAL),
    ("github-token", re.compile(r"\bgh[pousr]_[A-Za-z0-9]{36,}\b"), Severity.CRITICAL),
    ("slack-token", re.compile(r"\bxox[abposr]-[A-Za-z0-9-]{10,}\b"), Severity.CRITICAL),
    ("openai-key", re.compile(r"\bsk-[A-Za-z0-9_-]{20,}\b"), Severity.CRITICAL),
    (
        "hardcoded-password",
        re.compile(r"""(?i)\b(password|passwd|secret|api_?key|token)\b\s*[:=]\s*["'][^"'\s]{6,}["']"""),
        Severity.HIGH,
    ),
]


class SecretsScorer:
    """Looks for credentials in every added line of every file (not only Python)."""

    name = "secrets"

    def score(self, work: Work) -> list[Measure]:
        lines = [(f.path, n, text) for f in work.files if not f.deleted for n, text in f.added]
        if not lines:
            return []
        findings = []
        for path, n, text in lines:
            for rule, pattern, severity in _PATTERNS:
                if pattern.search(text):
                    findings.append(Finding(path, n, severity, f"possible secret in code ({rule})", rule, self.name))
                    break
        score = penalised(findings, {Severity.CRITICAL: 10.0, Severity.HIGH: 6.0})
        summary = f"{len(findings)} possible secrets in {len(lines)} added lines" if findings else "no secrets found"
        return [Measure(Dimension.SECURITY, score, summary, tuple(findings))]


register(SecretsScorer())
