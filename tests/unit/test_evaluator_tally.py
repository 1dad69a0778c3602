"""Counting a voting round: majority, weighted (Borda + score), tie-breaks, unbreakable ties, failed solutions."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from services.evaluator import policies
from services.evaluator.tally import Entry, Method, tally, valid_ballot


def ranks(outcome: object) -> list[str]:
    return [p.label for p in outcome.placed]  # type: ignore[attr-defined]


def test_without_votes_the_best_score_wins_and_the_others_follow_by_score() -> None:
    out = tally([Entry("A", 6.0), Entry("B", 9.1), Entry("C", 7.5)], [])
    assert out.winner == "B"
    assert ranks(out) == ["B", "C", "A"]
    assert [p.rank for p in out.placed] == [1, 2, 3]
    assert "score alone" in out.reason


def test_majority_counts_first_choices_and_most_votes_wins_over_a_better_score() -> None:
    entries = [Entry("A", 9.0), Entry("B", 6.0), Entry("C", 5.0)]
    out = tally(entries, [["B", "A", "C"], ["B", "C", "A"], ["A", "B", "C"]], Method.MAJORITY)
    assert out.winner == "B"
    b = next(p for p in out.placed if p.label == "B")
    assert b.first_choices == 2 and b.points == 2.0
    assert b.votes == {0: 1, 1: 1, 2: 2}


def test_majority_equal_votes_are_broken_by_the_evaluation_score() -> None:
    entries = [Entry("A", 7.0), Entry("B", 8.0)]
    out = tally(entries, [["A", "B"], ["B", "A"]], Method.MAJORITY)
    assert out.winner == "B"
    assert "broken by the evaluation score" in out.reason


def test_weighted_adds_borda_points_to_the_normalised_score() -> None:
    entries = [Entry("A", 9.0), Entry("B", 5.0), Entry("C", 7.0)]
    # Borda over 3 solutions: 2 for first, 1 for second, 0 for third.
    out = tally(entries, [["B", "C", "A"], ["B", "A", "C"]], Method.WEIGHTED)
    points = {p.label: p.points for p in out.placed}
    assert points == {"A": 1 + 0.9, "B": 4 + 0.5, "C": 1 + 0.7}
    assert out.winner == "B" and ranks(out) == ["B", "A", "C"]


def test_weighted_one_borda_point_outweighs_a_score_gap_below_ten() -> None:
    entries = [Entry("A", 10.0), Entry("B", 0.5)]
    out = tally(entries, [["B", "A"]], Method.WEIGHTED)
    assert out.winner == "B", "one reviewer's preference (1 point) outweighs a score gap below 10"


def test_invalid_rankings_count_for_nothing() -> None:
    entries = [Entry("A", 6.0), Entry("B", 8.0)]
    out = tally(entries, [["A"], ["A", "A"], ["A", "B", "Z"]], Method.MAJORITY)
    assert out.winner == "B" and "score alone" in out.reason
    assert all(p.first_choices == 0 for p in out.placed)


def test_an_unbreakable_tie_has_no_winner() -> None:
    entries = [Entry("A", 7.0), Entry("B", 7.0), Entry("C", 3.0)]
    out = tally(entries, [])
    assert out.winner is None and "tie between A and B" in out.reason
    out = tally(entries, [["A", "B", "C"], ["B", "A", "C"]], Method.MAJORITY)
    assert out.winner is None
    out = tally(entries, [["A", "B", "C"], ["B", "A", "C"]], Method.WEIGHTED)
    assert out.winner is None


def test_a_measured_score_beats_an_unmeasured_one_and_two_unmeasured_tie() -> None:
    assert tally([Entry("A", None), Entry("B", 2.0)], []).winner == "B"
    assert tally([Entry("A", None), Entry("B", None)], []).winner is None


def test_failed_solutions_rank_last_and_cannot_win() -> None:
    entries = [Entry("A", 9.9, usable=False), Entry("B", 4.0), Entry("C", 3.0)]
    out = tally(entries, [["B", "C"], ["C", "B"], ["C", "B"]], Method.MAJORITY)
    assert out.winner == "C"
    assert ranks(out) == ["C", "B", "A"]
    assert out.placed[-1].points == 0.0


def test_the_only_usable_solution_wins_and_none_usable_is_a_tie() -> None:
    out = tally([Entry("A", 1.0, usable=False), Entry("B", 2.0)], [])
    assert out.winner == "B" and "only usable" in out.reason
    out = tally([Entry("A", 8.0, usable=False), Entry("B", 9.0, usable=False)], [])
    assert out.winner is None and "no solution is usable" in out.reason
    assert ranks(out) == ["A", "B"]


def test_a_ballot_is_valid_only_with_every_compared_label_once() -> None:
    assert valid_ballot(["B", "A"], ["A", "B"])
    assert not valid_ballot(["B"], ["A", "B"])
    assert not valid_ballot(["B", "B"], ["A", "B"])
    assert not valid_ballot(["B", "C"], ["A", "B"])


@given(
    scores=st.lists(st.one_of(st.none(), st.floats(0, 10)), min_size=2, max_size=6),
    usable=st.lists(st.booleans(), min_size=6, max_size=6),
    ballots=st.lists(st.permutations(list("ABCDEF")), max_size=5),
    method=st.sampled_from(list(Method)),
)
def test_the_winner_is_always_usable_and_ranked_first(
    scores: list[float | None], usable: list[bool], ballots: list[list[str]], method: Method
) -> None:
    entries = [Entry("ABCDEF"[i], s, usable[i]) for i, s in enumerate(scores)]
    compared = [e.label for e in entries if e.usable]
    out = tally(entries, [[x for x in b if x in compared] for b in ballots], method)
    assert sorted(p.rank for p in out.placed) == list(range(1, len(entries) + 1))
    if out.winner is not None:
        assert out.placed[0].label == out.winner
        assert next(e for e in entries if e.label == out.winner).usable
    usable_count = len(compared)
    assert all(not e.usable for e in entries if e.label in ranks(out)[usable_count:])


def test_a_policy_with_out_of_range_voting_settings_is_refused_field_by_field() -> None:
    from maw.common.v1 import work_pb2
    from maw.evaluator.v1 import resources_pb2 as epb

    bad = epb.Policy(
        voting=epb.VotingPolicy(
            solutions=11,
            reviewers=-1,
            method=7,  # type: ignore[arg-type]
            subtask_types=[work_pb2.SUBTASK_TYPE_REVIEW],
        )
    )
    assert [field for field, _ in policies.problems(bad)] == [
        "policy.voting.solutions",
        "policy.voting.reviewers",
        "policy.voting.method",
        "policy.voting.subtask_types[0]",
    ]
    fine = epb.Policy(voting=epb.VotingPolicy(solutions=3, reviewers=2, method=epb.VOTE_METHOD_MAJORITY))
    assert policies.problems(fine) == []
