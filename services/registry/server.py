"""Wiring of the registry service: which contracts it serves, where, and with which migrations."""

from pathlib import Path

from services.runtime import Resources, ServiceDefinition

from .activity_api import ActivityServicer
from .auth_api import AuthServicer
from .enrollment_api import EnrollmentServicer
from .feeds import Feeds
from .intake_api import ActivityIntakeServicer, CredentialIntakeServicer, WorkerIntakeServicer
from .registry import Registry
from .user_api import UserServicer
from .verifier import LocalVerifier
from .worker_api import WorkerServicer


async def build(resources: Resources) -> dict[str, object]:
    """The registry's servicers, its background jobs, and the first admin on a fresh database."""
    registry = Registry(resources.settings, resources.sessions, resources.redis, resources.auth, Feeds(resources.redis))
    # The registry checks opaque credentials against its own tables, without a network hop.
    resources.auth.verifier = LocalVerifier(registry)
    await registry.ensure_admin()
    registry.feeds.start()
    registry.every(5.0, registry.flush, "registry-flush")
    registry.every(2.0, registry.sweep_presence, "registry-presence-sweep")
    registry.every(600.0, registry.forget_old_requests, "registry-request-cleanup")
    resources.on_stop.append(registry.stop)
    return {
        "maw.registry.v1.AuthService": AuthServicer(registry),
        "maw.registry.v1.UserService": UserServicer(registry),
        "maw.registry.v1.EnrollmentService": EnrollmentServicer(registry),
        "maw.registry.v1.WorkerService": WorkerServicer(registry),
        "maw.registry.v1.ActivityService": ActivityServicer(registry),
        "maw.registry.v1.WorkerIntakeService": WorkerIntakeServicer(registry),
        "maw.registry.v1.CredentialIntakeService": CredentialIntakeServicer(registry),
        "maw.registry.v1.ActivityIntakeService": ActivityIntakeServicer(registry),
    }


DEFINITION = ServiceDefinition(
    name="registry",
    default_port=50051,
    proto_packages=("maw.registry.v1",),
    migrations=Path(__file__).parent / "migrations",
    build=build,
)
