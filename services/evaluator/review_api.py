"""maw.evaluator.v1.ReviewService: reading peer reviews, and voting rounds through voting_api.VotingReads. Thin."""

from __future__ import annotations

from typing import Any

from maw.evaluator.v1 import resources_pb2 as epb
from maw.evaluator.v1 import review_service_pb2 as rvpb
from maw.evaluator.v1 import review_service_pb2_grpc as rvpb_grpc
from sqlalchemy.ext.asyncio import AsyncEngine

from services.runtime import invalid_argument
from services.runtime.errors import not_found

from . import review_store
from .api_common import Ctx, check_order, enum_filter, enum_words, name_id, next_token, page_of, parse_filter
from .verdict_context import task_id_of
from .voting_api import VotingReads

_STATES = enum_words(epb.ReviewState, "REVIEW_STATE_")
_RECOMMENDATIONS = {w: n for w, n in enum_words(epb.Verdict, "VERDICT_").items() if w in ("ACCEPT", "CORRECT")}
_FIELDS = {
    "task": "task_id",
    "subtask": "subtask",
    "attempt": "attempt",
    "review_subtask": "review_subtask",
    "reviewer": "reviewer",
    "state": "state",
    "recommendation": "recommendation",
}


def review_filter(text: str) -> dict[str, Any]:
    """ListReviews' AIP-160 subset (`a = "x" AND b = Y`) as {column: value}; anything else is INVALID_ARGUMENT."""
    where = parse_filter(text, _FIELDS)
    if "task_id" in where:
        where["task_id"] = task_id_of(where["task_id"])
    for column, words in (("state", _STATES), ("recommendation", _RECOMMENDATIONS)):
        enum_filter(where, column, words, "REVIEW_STATE_", "VERDICT_")
    if "attempt" in where:
        if not str(where["attempt"]).isdigit():
            raise invalid_argument([("filter", "attempt is a whole number")])
        where["attempt"] = int(where["attempt"])
    return where


class ReviewReads:
    """GetReview and ListReviews."""

    db: AsyncEngine

    async def GetReview(self, request: rvpb.GetReviewRequest, context: Ctx) -> rvpb.GetReviewResponse:
        ident = name_id(request.name, "reviews/")
        async with self.db.connect() as conn:
            body = await review_store.get_review(conn, ident)
        if body is None:
            raise not_found("maw.evaluator.v1.Review", request.name)
        return rvpb.GetReviewResponse(review=epb.Review.FromString(body))

    async def ListReviews(self, request: rvpb.ListReviewsRequest, context: Ctx) -> rvpb.ListReviewsResponse:
        where = review_filter(request.filter)
        check_order(request.order_by, "create_time", "create_time (oldest first)")
        size, after = page_of(request.page_size, request.page_token)
        async with self.db.connect() as conn:
            rows = await review_store.list_reviews(conn, where, after, size)
        return rvpb.ListReviewsResponse(
            reviews=[epb.Review.FromString(r.body) for r in rows], next_page_token=next_token(rows, size)
        )


class ReviewService(ReviewReads, VotingReads, rvpb_grpc.ReviewServiceServicer):
    """Peer reviews and voting rounds, read-only."""

    def __init__(self, db: AsyncEngine) -> None:
        self.db = db


__all__ = ["ReviewService", "review_filter"]
