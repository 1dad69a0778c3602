"""Each half of the judgement loop answers only the service on the other side."""

from __future__ import annotations

import pytest

from services.runtime import authz
from services.runtime.principal import Principal, PrincipalKind

SCHEDULER = Principal(PrincipalKind.SERVICE, "services/scheduler")
EVALUATOR = Principal(PrincipalKind.SERVICE, "services/evaluator")
REGISTRY = Principal(PrincipalKind.SERVICE, "services/registry")
ADMIN = Principal(PrincipalKind.USER, "users/admin", role="admin")


@pytest.mark.parametrize(
    ("method", "allowed"),
    [
        ("maw.scheduler.v1.VerdictService/DeliverVerdicts", EVALUATOR),
        ("maw.evaluator.v1.EvaluationIntakeService/RegisterTask", SCHEDULER),
        ("maw.evaluator.v1.EvaluationIntakeService/SubmitResults", SCHEDULER),
        ("maw.evaluator.v1.EvaluationIntakeService/ReportTaskUpdates", SCHEDULER),
    ],
)
def test_internal_loop_rpcs_admit_only_their_peer_service(method: str, allowed: Principal) -> None:
    rule = authz.rule_for(method)
    assert rule is not None
    assert [p.name for p in (SCHEDULER, EVALUATOR, REGISTRY, ADMIN) if rule.allows(p)] == [allowed.name]


def test_only_operators_and_admins_decide_checkpoints() -> None:
    rule = authz.rule_for("maw.evaluator.v1.CheckpointService/DecideCheckpoint")
    assert rule is not None
    roles = [
        r for r in ("viewer", "operator", "admin") if rule.allows(Principal(PrincipalKind.USER, "users/x", role=r))
    ]
    assert roles == ["operator", "admin"]
