"""Wiring of the scheduler service: its engine, servicers, migrations, and a drain on SIGTERM."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from services.runtime import Resources, ServiceDefinition

from .api import TaskService
from .engine import Engine
from .evaluation_link import EvaluationLink
from .registry_link import RegistryLink
from .settings import SchedulerSettings
from .stats_api import StatsService
from .stream import AgentService
from .template_api import TemplateService
from .verdicts import VerdictService


async def build(resources: Resources) -> Mapping[str, object]:
    """Start this replica's engine and hand out the servicers that use it."""
    settings = SchedulerSettings()
    engine = Engine(settings, resources.engine, resources.redis)
    await engine.start()
    link = RegistryLink(settings, engine, resources.engine)
    await link.start()
    evaluation = EvaluationLink(settings, resources.engine)
    engine.on_judged = evaluation.poke
    await evaluation.start()
    resources.on_stop.append(engine.drain)
    resources.on_stop.append(link.stop)
    resources.on_stop.append(evaluation.stop)
    return {
        "maw.scheduler.v1.TaskService": TaskService(settings, resources.engine, engine),
        "maw.scheduler.v1.TemplateService": TemplateService(resources.engine),
        "maw.scheduler.v1.StatsService": StatsService(resources.engine, engine),
        "maw.agent.v1.AgentService": AgentService(engine, settings.hello_timeout_s),
        "maw.scheduler.v1.VerdictService": VerdictService(resources.engine, engine),
    }


DEFINITION = ServiceDefinition(
    name="scheduler",
    default_port=50052,
    proto_packages=("maw.scheduler.v1", "maw.agent.v1"),
    migrations=Path(__file__).parent / "migrations",
    build=build,
)
