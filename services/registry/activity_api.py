"""ActivityService: the activity log, listed and watched."""

from __future__ import annotations

from collections.abc import AsyncIterator

from maw.registry.v1 import activity_service_pb2 as activity_pb
from maw.registry.v1 import activity_service_pb2_grpc as activity_grpc

from services.runtime.errors import (
    invalid_argument,
)

from . import convert, filtering, filters, store, validation
from ._servicing import Context
from .feeds import ACTIVITY_FEED
from .registry import Registry


class ActivityServicer(activity_grpc.ActivityServiceServicer):
    """The activity log: list and watch."""

    def __init__(self, registry: Registry) -> None:
        self.r = registry

    async def ListActivity(
        self, request: activity_pb.ListActivityRequest, context: Context
    ) -> activity_pb.ListActivityResponse:
        size = validation.page_size(request.page_size)
        tree = filtering.parse(request.filter, filters.ACTIVITY)
        _, ascending_flag = validation.order_by(
            request.order_by or "sequence desc", {"sequence": "sequence"}, "sequence desc"
        )
        descending = ascending_flag
        query_key = f"{request.filter}|{request.order_by}"
        after = validation.page_token(request.page_token, query_key)
        condition = store.activity_condition(tree)
        async with self.r.sessions() as session:
            head = await store.last_sequence(session, store.Activity)
            rows = await store.activity_page(session, condition, head, after, descending, size + 1)
        entries = [convert.activity_pb(r) for r in rows[:size]]
        token = validation.next_page_token(rows[size - 1].sequence, query_key) if len(rows) > size else ""
        return activity_pb.ListActivityResponse(activity_entries=entries, next_page_token=token, sequence=head)

    async def WatchActivity(
        self, request: activity_pb.WatchActivityRequest, context: Context
    ) -> AsyncIterator[activity_pb.WatchActivityResponse]:
        if request.after_sequence < 0:
            raise invalid_argument([("after_sequence", "must not be negative")])
        tree = filtering.parse(request.filter, filters.ACTIVITY)
        condition = store.activity_condition(tree)
        async with self.r.sessions() as session:
            head = await store.last_sequence(session, store.Activity)
        last = request.after_sequence or head
        while True:
            async with self.r.sessions() as session:
                top = await store.last_sequence(session, store.Activity)
                rows = await store.activity_after(session, condition, last, top, 500)
            if rows:
                yield activity_pb.WatchActivityResponse(activity_entries=[convert.activity_pb(r) for r in rows])
            if len(rows) == 500:
                last = rows[-1].sequence
                continue
            last = max(last, top)
            await self.r.feeds.wait(ACTIVITY_FEED, 1.0)
