"""`python -m services.evaluator` runs the evaluator service until SIGTERM."""

from services.runtime import run_service

from .server import DEFINITION

run_service(DEFINITION)
