"""`python -m services.registry` runs the registry service until SIGTERM."""

from services.runtime import run_service

from .server import DEFINITION

run_service(DEFINITION)
