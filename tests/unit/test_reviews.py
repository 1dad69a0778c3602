"""Peer reviews, pure: parsing reviewers' output precisely, and combining reviews into a decision."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.evaluator import policies
from services.evaluator.judgement import Rules, Trigger, Verdict
from services.evaluator.reviews import (
    ParsedReview,
    ReviewError,
    decide_reviewed,
    measures_of,
    parse_review,
    vote,
)
from services.evaluator.scorers import Dimension, Severity

GOOD = {
    "scores": {"code_quality": 8, "security": 9.5},
    "recommendation": "ACCEPT",
    "summary": "clean",
    "suggestions": ["add a docstring"],
    "findings": [{"path": "a.py", "line": 3, "severity": "LOW", "message": "long line"}],
}


def error_of(output: str, **kwargs: object) -> str:
    with pytest.raises(ReviewError) as caught:
        parse_review(output, **kwargs)  # type: ignore[arg-type]
    return str(caught.value)


def test_a_valid_review_parses_with_scores_recommendation_and_findings() -> None:
    review = parse_review(json.dumps(GOOD), reviewer="reviews/r1")
    assert review.scores == {Dimension.CODE_QUALITY: 8.0, Dimension.SECURITY: 9.5}
    assert review.overall == 8.8, "overall is the mean of the given scores when not given"
    assert review.recommendation == Verdict.ACCEPT
    assert review.suggestions == ("add a docstring",)
    (finding,) = review.findings
    assert (finding.path, finding.line, finding.severity, finding.scorer) == ("a.py", 3, Severity.LOW, "reviews/r1")


def test_a_fenced_block_inside_prose_is_found() -> None:
    output = f"I read the change.\n\n```json\n{json.dumps(GOOD, indent=2)}\n```\nThat is all."
    assert parse_review(output).recommendation == Verdict.ACCEPT


def test_the_last_review_object_wins_and_other_objects_are_ignored() -> None:
    first = {**GOOD, "recommendation": "CORRECT"}
    output = f'draft: {json.dumps(first)}\nconfig {{"x": 1}}\nfinal: {json.dumps(GOOD)}\nnoise {{"y": 2}}'
    assert parse_review(output).recommendation == Verdict.ACCEPT


def test_an_explicit_overall_is_kept() -> None:
    assert parse_review(json.dumps({**GOOD, "overall": 6})).overall == 6.0


def test_malformed_json_is_refused_with_the_decoder_position() -> None:
    message = error_of('{"scores": {"security": 5}, "recommendation": ACCEPT}')
    assert message.startswith("no valid JSON review object in the output: Expecting value (line 1")


def test_output_without_any_object_is_refused() -> None:
    assert error_of("Looks good to me!") == "no JSON object in the output"
    assert error_of('{"x": 1}') == "no JSON object with scores, recommendation or ranking in the output"


def test_an_out_of_range_score_names_the_dimension_and_the_value() -> None:
    assert error_of(json.dumps({**GOOD, "scores": {"security": 12}})) == "scores.security: 12 is outside 0–10"
    assert "scores.code_quality: -1 is outside 0–10" in error_of(json.dumps({**GOOD, "scores": {"code_quality": -1}}))


def test_a_bool_is_not_a_score() -> None:
    assert error_of(json.dumps({**GOOD, "scores": {"security": True}})) == (
        "scores.security: must be a number 0–10, got true"
    )


def test_an_unknown_dimension_is_refused() -> None:
    message = error_of(json.dumps({**GOOD, "scores": {"speed": 5}}))
    assert message.startswith("scores.speed: unknown dimension (known: code_quality, completeness")


def test_scores_need_at_least_one_dimension() -> None:
    assert error_of(json.dumps({**GOOD, "scores": {}})) == "scores: give at least one dimension"


def test_a_bad_recommendation_is_refused() -> None:
    assert error_of(json.dumps({**GOOD, "recommendation": "MAYBE"})) == (
        'recommendation: must be ACCEPT or CORRECT, got "MAYBE"'
    )
    without = {k: v for k, v in GOOD.items() if k != "recommendation"}
    assert error_of(json.dumps(without)) == "recommendation: must be ACCEPT or CORRECT"


def test_a_truncated_output_is_refused_even_when_an_object_is_complete() -> None:
    assert error_of(json.dumps(GOOD), truncated=True).startswith("the output was cut at the size limit")


def test_bad_findings_name_the_entry_and_field() -> None:
    bad = {**GOOD, "findings": [{"path": "a.py", "line": "3", "severity": "URGENT", "message": ""}]}
    message = error_of(json.dumps(bad))
    assert "findings[0].line: must be a whole number 0 or more" in message
    assert "findings[0].severity: must be LOW, MEDIUM, HIGH or CRITICAL" in message
    assert "findings[0].message: is required" in message


def test_a_voting_reviewer_must_rank_every_solution_once() -> None:
    ranked = parse_review(json.dumps({"ranking": ["B", "A"]}), labels=["A", "B"])
    assert ranked.ranking == ("B", "A") and ranked.recommendation is None and not ranked.scores
    message = error_of(json.dumps({"ranking": ["B", "B"]}), labels=["A", "B"])
    assert message == "ranking: must list every solution exactly once (A, B), best first"


def test_deeply_nested_or_brace_heavy_output_is_refused_quickly_not_crashed() -> None:
    assert error_of('{"a": ' * 50_000).startswith("no valid JSON review object in the output")
    assert error_of("{" * 200_000).startswith("no valid JSON review object in the output")


@given(st.text(max_size=300))
def test_any_text_parses_or_is_refused_with_a_reason(text: str) -> None:
    try:
        parse_review(text)
    except ReviewError as exc:
        assert str(exc)


def review(scores: dict[Dimension, float], recommendation: Verdict | None) -> ParsedReview:
    return ParsedReview(scores, None, recommendation)


def test_measures_are_the_mean_per_dimension_over_valid_reviews() -> None:
    measures = measures_of(
        [
            ("reviews/a", review({Dimension.SECURITY: 4, Dimension.CODE_QUALITY: 9}, Verdict.CORRECT)),
            ("reviews/b", review({Dimension.SECURITY: 8}, Verdict.ACCEPT)),
        ]
    )
    by_dimension = {m.dimension: m for _, m in measures}
    assert {name for name, _ in measures} == {"peer-review"}
    assert by_dimension[Dimension.SECURITY].score == 6.0
    assert by_dimension[Dimension.CODE_QUALITY].score == 9.0
    assert Dimension.TESTABILITY not in by_dimension, "a dimension no reviewer scored stays unmeasured"


def test_the_vote_is_the_majority_and_a_tie_has_none() -> None:
    assert vote([Verdict.CORRECT, Verdict.CORRECT, Verdict.ACCEPT])[0] == Verdict.CORRECT
    assert vote([Verdict.ACCEPT, Verdict.CORRECT]) == (None, "reviewers voted ACCEPT 1, CORRECT 1: a tie")
    assert vote([])[0] is None


RULES = Rules(triggers=frozenset({Trigger.ESCALATION}))


def test_a_tie_is_decided_by_the_score_and_says_so() -> None:
    decision = decide_reviewed(8.0, 0, RULES, [Verdict.ACCEPT, Verdict.CORRECT])
    assert decision.verdict == Verdict.ACCEPT
    assert "a tie, decided by the combined score" in decision.reason
    low = decide_reviewed(3.0, 0, RULES, [Verdict.ACCEPT, Verdict.CORRECT])
    assert low.verdict == Verdict.CORRECT


def test_a_majority_correct_on_a_passing_score_corrects_while_cycles_remain() -> None:
    decision = decide_reviewed(8.0, 1, RULES, [Verdict.CORRECT, Verdict.CORRECT])
    assert decision.verdict == Verdict.CORRECT
    assert "although 8.0 passes acceptance 5.0" in decision.reason and "cycle 2 of 3" in decision.reason
    spent = decide_reviewed(8.0, 3, RULES, [Verdict.CORRECT, Verdict.CORRECT])
    assert (spent.verdict, spent.trigger) == (Verdict.ESCALATE, Trigger.ESCALATION)


def test_a_majority_accept_does_not_lift_a_failing_score() -> None:
    decision = decide_reviewed(2.0, 0, RULES, [Verdict.ACCEPT, Verdict.ACCEPT])
    assert decision.verdict == Verdict.CORRECT and "ACCEPT 2" in decision.reason


def test_no_valid_review_and_nothing_measured_asks_a_person() -> None:
    decision = decide_reviewed(None, 0, RULES, [])
    assert (decision.verdict, decision.trigger) == (Verdict.ESCALATE, Trigger.ESCALATION)
    assert "no valid peer review" in decision.reason


def test_peer_review_is_off_by_default_and_its_settings_are_validated() -> None:
    from maw.common.v1 import work_pb2
    from maw.evaluator.v1 import resources_pb2 as epb

    assert policies.default_policy().peer_review.reviewers == 0
    bad = epb.Policy(
        peer_review=epb.PeerReviewPolicy(reviewers=6, subtask_types=[work_pb2.SUBTASK_TYPE_REVIEW, 99]),  # type: ignore[list-item]
        scorers=["peer-review"],
    )
    assert [field for field, _ in policies.problems(bad)] == [
        "policy.peer_review.reviewers",
        "policy.peer_review.subtask_types[0]",
        "policy.peer_review.subtask_types[1]",
    ], "peer-review is a known scorer name"
