"""Wiring of the scheduler service: which contracts it serves, where, and with which migrations."""

from pathlib import Path

from services.runtime import ServiceDefinition

DEFINITION = ServiceDefinition(
    name="scheduler",
    default_port=50052,
    proto_packages=("maw.scheduler.v1", "maw.agent.v1"),
    migrations=Path(__file__).parent / "migrations",
)
