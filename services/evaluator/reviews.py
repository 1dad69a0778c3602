"""Peer reviews, pure: parse a reviewer's output, turn valid reviews into measures, and count their votes."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .judgement import Decision, Rules, Trigger, Verdict, decide
from .scorers import Dimension, Finding, Measure, Severity

SCORER = "peer-review"
MAX_FINDINGS = 100
WINDOW = 100_000  # characters of output read, from the end
MAX_ATTEMPTS = 1000  # JSON decodes tried
DIMENSIONS = {d.name.lower(): d for d in Dimension}
_SEVERITIES = {"LOW": Severity.LOW, "MEDIUM": Severity.MEDIUM, "HIGH": Severity.HIGH, "CRITICAL": Severity.CRITICAL}
_REVIEW_KEYS = ("scores", "recommendation", "ranking")

FORMAT = """Answer with exactly one JSON object (alone, or in a ```json fenced block) as the LAST thing you print:
{"scores": {"code_quality": 0-10, "completeness": 0-10, "security": 0-10, "architecture": 0-10, "testability": 0-10},
 "recommendation": "ACCEPT" or "CORRECT",
 "summary": "one paragraph",
 "suggestions": ["one improvement per entry"],
 "findings": [{"path": "file.py", "line": 3, "severity": "LOW|MEDIUM|HIGH|CRITICAL", "message": "what is wrong"}]}
Scores are numbers from 0 (unusable) to 10 (excellent); leave out a dimension you cannot judge, but give at
least one. Recommend CORRECT when the change must be fixed before it is used."""

RANKING_FORMAT = """Also give "ranking": the labels of the solutions, best first, each exactly once, e.g.
"ranking": ["B", "A", "C"]. With a ranking, "scores" and "recommendation" may be left out."""


class ReviewError(ValueError):
    """A reviewer's output that cannot be used; the message says precisely why."""


@dataclass(frozen=True)
class ParsedReview:
    """A reviewer's validated verdict."""

    scores: dict[Dimension, float]
    overall: float | None
    recommendation: Verdict | None
    summary: str = ""
    suggestions: tuple[str, ...] = ()
    findings: tuple[Finding, ...] = ()
    ranking: tuple[str, ...] = ()


def _objects(text: str) -> tuple[list[dict[str, Any]], str]:
    """Every top-level JSON object in ``text`` (in order), and the first decode error seen, if any.

    Bounded whatever the output: only its last ``WINDOW`` characters are read (the review comes last) and at
    most ``MAX_ATTEMPTS`` decodes are tried, so hostile or broken output costs little and never raises.
    """
    decoder = json.JSONDecoder()
    found: list[dict[str, Any]] = []
    error = ""
    text = text[-WINDOW:]
    attempts = 0
    i = text.find("{")
    while i != -1 and attempts < MAX_ATTEMPTS:
        attempts += 1
        try:
            value, end = decoder.raw_decode(text, i)
        except (json.JSONDecodeError, RecursionError) as exc:
            if isinstance(exc, RecursionError):
                error = error or "objects nested too deeply"
            else:
                error = error or f"{exc.msg} (line {exc.lineno}, column {exc.colno})"
            i = text.find("{", i + 1)
            continue
        if isinstance(value, dict):
            found.append(value)
        i = text.find("{", end)
    return found, error


def _number(value: Any, where: str, problems: list[str]) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        problems.append(f"{where}: must be a number 0–10, got {json.dumps(value)[:40]}")
        return None
    number = float(value)
    if not math.isfinite(number) or not 0.0 <= number <= 10.0:
        problems.append(f"{where}: {value:g} is outside 0–10")
        return None
    return number


def _strings(value: Any, where: str, problems: list[str], limit: int = 2000) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        problems.append(f"{where}: must be a list of strings")
        return ()
    return tuple(v[:limit] for v in value[:50])


def _findings(value: Any, reviewer: str, problems: list[str]) -> tuple[Finding, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        problems.append("findings: must be a list of objects")
        return ()
    out = []
    for i, item in enumerate(value[:MAX_FINDINGS]):
        where = f"findings[{i}]"
        if not isinstance(item, dict):
            problems.append(f"{where}: must be an object")
            continue
        path, line, message = item.get("path", ""), item.get("line", 0), item.get("message")
        severity = item.get("severity", "MEDIUM")
        if not isinstance(path, str):
            problems.append(f"{where}.path: must be a string")
        if isinstance(line, bool) or not isinstance(line, int) or line < 0:
            problems.append(f"{where}.line: must be a whole number 0 or more")
        if not isinstance(message, str) or not message.strip():
            problems.append(f"{where}.message: is required")
        if not isinstance(severity, str) or severity.upper() not in _SEVERITIES:
            problems.append(f"{where}.severity: must be LOW, MEDIUM, HIGH or CRITICAL")
        if not problems:
            out.append(
                Finding(
                    path=str(path)[:500],
                    line=int(line),
                    severity=_SEVERITIES[str(severity).upper()],
                    message=str(message)[:2000],
                    rule="review",
                    scorer=reviewer,
                )
            )
    return tuple(out)


def parse_review(
    output: str, truncated: bool = False, labels: Sequence[str] = (), reviewer: str = SCORER
) -> ParsedReview:
    """The reviewer's verdict in ``output``, validated; :class:`ReviewError` says precisely what is wrong.

    ``labels`` are the solutions a voting reviewer ranks (A, B, C…); ``reviewer`` names the findings'
    scorer (the review's resource name). A cut output is refused: its last object may be incomplete.
    """
    if truncated:
        raise ReviewError("the output was cut at the size limit, so the review object may be incomplete")
    objects, decode_error = _objects(output)
    candidates = [o for o in objects if any(k in o for k in _REVIEW_KEYS)]
    if not candidates:
        if decode_error:
            raise ReviewError(f"no valid JSON review object in the output: {decode_error}")
        if objects:
            raise ReviewError("no JSON object with scores, recommendation or ranking in the output")
        raise ReviewError("no JSON object in the output")
    raw = candidates[-1]
    problems: list[str] = []

    scores: dict[Dimension, float] = {}
    given = raw.get("scores")
    if given is not None and not isinstance(given, dict):
        problems.append("scores: must be an object of dimension → score")
    for key, value in (given or {}).items() if isinstance(given, dict) else ():
        dimension = DIMENSIONS.get(str(key).lower())
        if dimension is None:
            problems.append(f"scores.{key}: unknown dimension (known: {', '.join(DIMENSIONS)})")
            continue
        number = _number(value, f"scores.{key}", problems)
        if number is not None:
            scores[dimension] = number

    ranking: tuple[str, ...] = ()
    if labels or "ranking" in raw:
        ranking = _strings(raw.get("ranking"), "ranking", problems, 16)
        if labels and sorted(ranking) != sorted(labels):
            problems.append(f"ranking: must list every solution exactly once ({', '.join(labels)}), best first")
    if not ranking and not scores and not any(p.startswith("scores") for p in problems):
        problems.append("scores: give at least one dimension")

    recommendation: Verdict | None = None
    word = raw.get("recommendation")
    if word is None and not ranking:
        problems.append("recommendation: must be ACCEPT or CORRECT")
    elif word is not None:
        if isinstance(word, str) and word.strip().upper() in ("ACCEPT", "CORRECT"):
            recommendation = Verdict[word.strip().upper()]
        else:
            problems.append(f"recommendation: must be ACCEPT or CORRECT, got {json.dumps(word)[:40]}")

    overall: float | None = None
    if raw.get("overall") is not None:
        overall = _number(raw["overall"], "overall", problems)
    elif scores:
        overall = round(sum(scores.values()) / len(scores), 1)

    summary = raw.get("summary", "")
    if not isinstance(summary, str):
        problems.append("summary: must be a string")
        summary = ""
    suggestions = _strings(raw.get("suggestions"), "suggestions", problems)
    findings = _findings(raw.get("findings"), reviewer, problems)
    if problems:
        raise ReviewError("; ".join(problems))
    return ParsedReview(scores, overall, recommendation, summary[:4000], suggestions, findings, ranking)


def measures_of(reviews: Sequence[tuple[str, ParsedReview]]) -> list[tuple[str, Measure]]:
    """The "peer-review" measures of valid ``(review name, review)`` pairs: per dimension, the mean score of
    the reviews that scored it. A review's findings name no dimension: they become evidence of the
    dimension that review scored lowest, so each finding appears once, with the weakest part."""
    out: list[tuple[str, Measure]] = []
    evidence: dict[Dimension, list[Finding]] = {}
    for _, review in reviews:
        if review.scores and review.findings:
            weakest = min(review.scores, key=lambda d: (review.scores[d], d))
            evidence.setdefault(weakest, []).extend(review.findings)
    for dimension in Dimension:
        given = [r.scores[dimension] for _, r in reviews if dimension in r.scores]
        if not given:
            continue
        mean = sum(given) / len(given)
        summary = f"peer review: {mean:.1f} (mean of {len(given)} reviewer{'s' if len(given) > 1 else ''})"
        out.append((SCORER, Measure(dimension, mean, summary, tuple(evidence.get(dimension, ())))))
    return out


def vote(recommendations: Sequence[Verdict]) -> tuple[Verdict | None, str]:
    """The majority recommendation of the valid reviews (None on a tie or with none), and the count in words."""
    accept = sum(1 for r in recommendations if r == Verdict.ACCEPT)
    correct = sum(1 for r in recommendations if r == Verdict.CORRECT)
    if not accept and not correct:
        return None, "no valid peer review"
    words = f"reviewers voted ACCEPT {accept}, CORRECT {correct}"
    if accept == correct:
        return None, f"{words}: a tie"
    return (Verdict.ACCEPT if accept > correct else Verdict.CORRECT), words


def decide_reviewed(overall: float | None, cycle: int, rules: Rules, recommendations: Sequence[Verdict]) -> Decision:
    """The verdict on a peer-reviewed result: the combined ``overall`` score and the reviewers' vote.

    - Nothing measured at all (no valid review, no scorer) → ESCALATE: a person decides, never a silent accept.
    - The score bands decide as for any result; the vote is said in the reason. A tie (or no valid
      review) is decided by the score alone, and the reason says so.
    - A majority CORRECT on a score that passes acceptance → CORRECT while correction cycles remain; with
      none left, ESCALATE (when the ESCALATION trigger is on) so a person decides.
    """
    majority, words = vote(recommendations)
    if overall is None:
        return Decision(
            Verdict.ESCALATE, f"{words} and no scorer measured the result; a person decides", Trigger.ESCALATION
        )
    base = decide(overall, cycle, rules)
    if majority is None:
        return Decision(base.verdict, f"{words}, decided by the combined score: {base.reason}", base.trigger)
    passes = base.verdict == Verdict.ACCEPT or (base.verdict == Verdict.ESCALATE and base.trigger == Trigger.LOW_SCORE)
    if majority == Verdict.CORRECT and passes:
        acc, most = rules.acceptance_threshold, rules.max_correction_cycles
        if cycle < most:
            return Decision(
                Verdict.CORRECT,
                f"{words}: the majority asks for a correction although {overall:.1f} passes acceptance {acc:.1f};"
                f" correction cycle {cycle + 1} of {most}",
            )
        if Trigger.ESCALATION in rules.triggers:
            return Decision(
                Verdict.ESCALATE,
                f"{words}: the majority asks for a correction after {cycle} correction cycles; a person decides",
                Trigger.ESCALATION,
            )
    return Decision(base.verdict, f"{words}; {base.reason}", base.trigger)


__all__ = [
    "FORMAT",
    "RANKING_FORMAT",
    "SCORER",
    "ParsedReview",
    "ReviewError",
    "decide_reviewed",
    "measures_of",
    "parse_review",
    "vote",
]
