"""The small runtime all maw services share: settings, logging, tracing, storage, errors, bootstrap.

It never imports a service; services import it.
"""

from .config import ServiceSettings
from .errors import (
    MawError,
    already_exists,
    failed_precondition,
    invalid_argument,
    not_found,
    permission_denied,
    resource_exhausted,
    unauthenticated,
    unavailable,
)
from .server import Resources, ServiceDefinition, run_service

__all__ = [
    "MawError",
    "Resources",
    "ServiceDefinition",
    "ServiceSettings",
    "already_exists",
    "failed_precondition",
    "invalid_argument",
    "not_found",
    "permission_denied",
    "resource_exhausted",
    "run_service",
    "unauthenticated",
    "unavailable",
]
