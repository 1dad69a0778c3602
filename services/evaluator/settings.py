"""The evaluator's settings: the shared ones plus its own knobs."""

from __future__ import annotations

from pydantic import Field

from services.runtime import ServiceSettings


class EvaluatorSettings(ServiceSettings):
    """Environment ``MAW_*`` as for every service, plus these."""

    judge_batch: int = Field(16, ge=1, le=500, description="Most results judged per round.")
    relay_batch: int = Field(500, ge=1, le=1000, description="Most outbox items sent per call.")
    # TEST ONLY (tests/integration/test_evaluator_durability.py): hold verdicts in the outbox, either before
    # delivering them or after delivering but before removing them, so a test can kill -9 the evaluator at
    # exactly that point. Never set in production: verdicts would wait forever.
    test_hold_verdicts: str = Field(
        "", pattern="^(|before_delivery|after_delivery)$", description="TEST ONLY: where the verdict relay stops."
    )
