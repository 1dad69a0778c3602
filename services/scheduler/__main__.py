"""`python -m services.scheduler` runs the scheduler service until SIGTERM."""

from services.runtime import run_service

from .server import DEFINITION

run_service(DEFINITION)
