"""The ERROR trigger's decision on a result that failed for good (pure)."""

from __future__ import annotations

from maw.common.v1 import work_pb2
from maw.evaluator.v1 import evaluation_intake_service_pb2 as ipb
from maw.evaluator.v1 import resources_pb2 as epb

from services.evaluator import policies
from services.evaluator.judgement import Trigger, Verdict
from services.evaluator.verdict_context import failed, failure_decision

FAILURE = ipb.SubmittedResult(
    subtask_key="s0", attempt=3, outcome=work_pb2.OUTCOME_TIMED_OUT, error_message="killed after 600 s"
)


def test_a_failure_is_held_at_an_error_checkpoint_when_the_policy_asks() -> None:
    asked = epb.Policy(triggers=[epb.CHECKPOINT_TRIGGER_ERROR])
    rules = policies.rules_of(policies.overlay(policies.default_policy(), asked))
    decision = failure_decision(FAILURE, rules)
    assert (decision.verdict, decision.trigger) == (Verdict.ESCALATE, Trigger.ERROR)
    assert decision.reason == "s0 failed (TIMED_OUT) after 3 attempts: killed after 600 s"


def test_the_default_policy_has_no_error_trigger_so_a_failure_is_rejected() -> None:
    rules = policies.rules_of(policies.default_policy())
    assert Trigger.ERROR not in rules.triggers
    assert failure_decision(FAILURE, rules).verdict == Verdict.REJECT


def test_only_non_successful_outcomes_count_as_failures() -> None:
    assert failed(FAILURE) and failed(ipb.SubmittedResult(outcome=work_pb2.OUTCOME_FAILED))
    assert not failed(ipb.SubmittedResult(outcome=work_pb2.OUTCOME_SUCCEEDED))
