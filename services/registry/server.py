"""Wiring of the registry service: which contracts it serves, where, and with which migrations."""

from pathlib import Path

from services.runtime import ServiceDefinition

DEFINITION = ServiceDefinition(
    name="registry",
    default_port=50051,
    proto_packages=("maw.registry.v1",),
    migrations=Path(__file__).parent / "migrations",
)
