"""StatsService: counts of tasks and subtasks by state, and this replica's agents and slots."""

from __future__ import annotations

from typing import Any

import grpc
from maw.scheduler.v1 import resources_pb2 as spb
from maw.scheduler.v1 import stats_service_pb2 as stpb
from maw.scheduler.v1 import stats_service_pb2_grpc as stpb_grpc
from sqlalchemy.ext.asyncio import AsyncEngine

from services.runtime import invalid_argument

from . import _convert as conv
from . import store
from .engine import Engine
from .states import SubtaskState
from .wire import now_utc

Ctx = grpc.aio.ServicerContext[Any, Any]


class StatsService(stpb_grpc.StatsServiceServicer):
    """Counts for the dashboard and operators."""

    def __init__(self, db: AsyncEngine, engine: Engine) -> None:
        self.db = db
        self.engine = engine

    async def GetStats(self, request: stpb.GetStatsRequest, context: Ctx) -> stpb.GetStatsResponse:
        both = request.HasField("start_time") and request.HasField("end_time")
        if both and request.end_time.ToDatetime() <= request.start_time.ToDatetime():
            raise invalid_argument([("end_time", "must be after start_time")])
        async with self.db.connect() as conn:
            tasks, subtasks, unschedulable, used = await store.state_counts(conn)
        slots = sum(s.capacity for s in self.engine.sessions.values())
        response = stpb.GetStatsResponse(
            time=conv.ts(now_utc()),
            task_state_counts=[stpb.TaskStateCount(state=s, count=n) for s, n in sorted(tasks.items())],  # type: ignore[arg-type]
            subtask_state_counts=[spb.SubtaskStateCount(state=s, count=n) for s, n in sorted(subtasks.items())],  # type: ignore[arg-type]
            total_slots=slots,
            used_slots=used,
            queue_depth=subtasks.get(int(SubtaskState.READY), 0),
            unschedulable_subtasks=unschedulable,
        )
        return response
