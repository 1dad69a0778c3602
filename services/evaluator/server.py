"""Wiring of the evaluator service: its judge, servicers and migrations."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from services.runtime import Resources, ServiceDefinition

from .checkpoint_api import CheckpointService
from .evaluation_api import EvaluationService
from .intake_api import EvaluationIntakeService
from .judge import Judge
from .policy_api import PolicyService
from .review_api import ReviewService
from .settings import EvaluatorSettings


async def build(resources: Resources) -> Mapping[str, object]:
    """Start judging and delivery, and hand out the servicers."""
    settings = EvaluatorSettings()
    judge = Judge(settings, resources.engine)
    await judge.start()
    resources.on_stop.append(judge.stop)
    return {
        "maw.evaluator.v1.EvaluationIntakeService": EvaluationIntakeService(resources.engine, judge),
        "maw.evaluator.v1.EvaluationService": EvaluationService(resources.engine),
        "maw.evaluator.v1.CheckpointService": CheckpointService(resources.engine, judge),
        "maw.evaluator.v1.PolicyService": PolicyService(resources.engine, judge),
        "maw.evaluator.v1.ReviewService": ReviewService(resources.engine),
    }


DEFINITION = ServiceDefinition(
    name="evaluator",
    default_port=50053,
    proto_packages=("maw.evaluator.v1",),
    migrations=Path(__file__).parent / "migrations",
    build=build,
)
