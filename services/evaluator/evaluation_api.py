"""maw.evaluator.v1.EvaluationService: reading evaluations. Thin."""

from __future__ import annotations

from maw.evaluator.v1 import evaluation_service_pb2 as evpb
from maw.evaluator.v1 import evaluation_service_pb2_grpc as evpb_grpc
from maw.evaluator.v1 import resources_pb2 as epb
from sqlalchemy.ext.asyncio import AsyncEngine

from services.runtime.errors import not_found

from . import store
from .api_common import Ctx, name_id, next_token, page_of, parse_filter
from .verdict_context import (
    task_id_of,
)


class EvaluationService(evpb_grpc.EvaluationServiceServicer):
    """Reading evaluations."""

    def __init__(self, db: AsyncEngine) -> None:
        self.db = db

    async def GetEvaluation(self, request: evpb.GetEvaluationRequest, context: Ctx) -> evpb.GetEvaluationResponse:
        ident = name_id(request.name, "evaluations/")
        async with self.db.connect() as conn:
            body = await store.get_evaluation(conn, ident)
        if body is None:
            raise not_found("maw.evaluator.v1.Evaluation", request.name)
        return evpb.GetEvaluationResponse(evaluation=epb.Evaluation.FromString(body))

    async def ListEvaluations(self, request: evpb.ListEvaluationsRequest, context: Ctx) -> evpb.ListEvaluationsResponse:
        where = parse_filter(request.filter, {"task": "task_id", "subtask": "subtask"})
        if "task_id" in where:
            where["task_id"] = task_id_of(where["task_id"])
        size, after = page_of(request.page_size, request.page_token)
        async with self.db.connect() as conn:
            rows = await store.list_evaluations(conn, where, after, size)
        return evpb.ListEvaluationsResponse(
            evaluations=[epb.Evaluation.FromString(r.body) for r in rows], next_page_token=next_token(rows, size)
        )


__all__ = ["EvaluationService"]
