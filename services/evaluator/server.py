"""Wiring of the evaluator service: which contracts it serves, where, and with which migrations."""

from pathlib import Path

from services.runtime import ServiceDefinition

DEFINITION = ServiceDefinition(
    name="evaluator",
    default_port=50053,
    proto_packages=("maw.evaluator.v1",),
    migrations=Path(__file__).parent / "migrations",
)
