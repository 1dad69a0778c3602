"""Wiring of the registry service: which contracts it serves, where, and with which migrations."""

from pathlib import Path

from services.runtime import Resources, ServiceDefinition

from . import api
from .feeds import Feeds
from .registry import Registry
from .verifier import LocalVerifier


async def build(resources: Resources) -> dict[str, object]:
    """The registry's servicers, its background jobs, and the first admin on a fresh database."""
    registry = Registry(resources.settings, resources.sessions, resources.redis, resources.auth, Feeds(resources.redis))
    # The registry checks opaque credentials against its own tables, without a network hop.
    resources.auth.verifier = LocalVerifier(registry)
    await registry.ensure_admin()
    registry.feeds.start()
    registry.every(5.0, registry.flush, "registry-flush")
    registry.every(2.0, registry.sweep_presence, "registry-presence-sweep")
    registry.every(600.0, registry.forget_old_requests, "registry-idempotency-cleanup")
    resources.on_stop.append(registry.stop)
    return {
        "maw.registry.v1.AuthService": api.AuthServicer(registry),
        "maw.registry.v1.UserService": api.UserServicer(registry),
        "maw.registry.v1.EnrollmentService": api.EnrollmentServicer(registry),
        "maw.registry.v1.WorkerService": api.WorkerServicer(registry),
        "maw.registry.v1.ActivityService": api.ActivityServicer(registry),
        "maw.registry.v1.WorkerIntakeService": api.WorkerIntakeServicer(registry),
        "maw.registry.v1.CredentialIntakeService": api.CredentialIntakeServicer(registry),
        "maw.registry.v1.ActivityIntakeService": api.ActivityIntakeServicer(registry),
    }


DEFINITION = ServiceDefinition(
    name="registry",
    default_port=50051,
    proto_packages=("maw.registry.v1",),
    migrations=Path(__file__).parent / "migrations",
    build=build,
)
