"""ReviewService's voting reads (GetVotingRound, ListVotingRounds, ListSolutions), as a mixin. Thin."""

from __future__ import annotations

import re
from datetime import datetime

from maw.evaluator.v1 import resources_pb2 as epb
from maw.evaluator.v1 import review_service_pb2 as rvpb
from sqlalchemy.ext.asyncio import AsyncEngine

from services.runtime import invalid_argument
from services.runtime.errors import not_found

from . import voting, voting_store
from .api_common import (
    DEFAULT_PAGE,
    MAX_PAGE,
    Ctx,
    check_order,
    enum_filter,
    enum_words,
    name_id,
    next_token,
    page_of,
    parse_filter,
)
from .verdict_context import task_id_of

_STATES = enum_words(epb.VotingState, "VOTING_STATE_")
_METHODS = enum_words(epb.VoteMethod, "VOTE_METHOD_")
_PARENT = re.compile(r"^votingRounds/(-|[A-Za-z0-9_-]{1,128})$")


class VotingReads:
    """GetVotingRound, ListVotingRounds and ListSolutions (ReviewService mixes them in)."""

    db: AsyncEngine

    async def GetVotingRound(self, request: rvpb.GetVotingRoundRequest, context: Ctx) -> rvpb.GetVotingRoundResponse:
        name_id(request.name, "votingRounds/")
        async with self.db.connect() as conn:
            found = await voting.round_message(conn, request.name)
        if found is None:
            raise not_found("maw.evaluator.v1.VotingRound", request.name)
        return rvpb.GetVotingRoundResponse(voting_round=found)

    async def ListVotingRounds(
        self, request: rvpb.ListVotingRoundsRequest, context: Ctx
    ) -> rvpb.ListVotingRoundsResponse:
        where = parse_filter(
            request.filter, {"task": "task_id", "subtask": "subtask", "state": "state", "method": "method"}
        )
        if "task_id" in where:
            where["task_id"] = task_id_of(where["task_id"])
        enum_filter(where, "state", _STATES, "VOTING_STATE_")
        enum_filter(where, "method", _METHODS, "VOTE_METHOD_")
        check_order(request.order_by, "create_time")
        size, after = page_of(request.page_size, request.page_token)
        async with self.db.connect() as conn:
            rounds = await voting_store.list_rounds(conn, where, after, size)
            served = await voting.messages(conn, rounds)
        return rvpb.ListVotingRoundsResponse(voting_rounds=served, next_page_token=next_token(rounds, size))

    async def ListSolutions(self, request: rvpb.ListSolutionsRequest, context: Ctx) -> rvpb.ListSolutionsResponse:
        parent = _PARENT.match(request.parent)
        if not parent:
            raise invalid_argument([("parent", "must be votingRounds/{voting_round} or votingRounds/-")])
        where = parse_filter(
            request.filter, {"subtask": "subtask", "worker": "worker", "selected": "selected", "rank": "rank"}
        )
        if parent.group(1) != "-":
            where["round_id"] = parent.group(1)
        if "selected" in where:
            if str(where["selected"]).lower() not in ("true", "false"):
                raise invalid_argument([("filter", "selected is true or false")])
            where["selected"] = str(where["selected"]).lower() == "true"
        if "rank" in where:
            if not str(where["rank"]).isdigit():
                raise invalid_argument([("filter", "rank is a whole number")])
            where["rank"] = int(where["rank"])
        check_order(request.order_by, "rank")
        if request.page_size < 0:
            raise invalid_argument([("page_size", "must be 0 or more")])
        size = min(request.page_size or DEFAULT_PAGE, MAX_PAGE)
        after = None
        if request.page_token:
            try:
                when, round_id, position = voting_store.parse_token(request.page_token, 3)
                after = (datetime.fromisoformat(when), round_id, int(position))
            except Exception as exc:
                raise invalid_argument([("page_token", "not a token this list returned")]) from exc
        async with self.db.connect() as conn:
            if parent.group(1) != "-" and await voting_store.get_round(conn, parent.group(1)) is None:
                raise not_found("maw.evaluator.v1.VotingRound", request.parent)
            rows = await voting_store.list_solutions(conn, where, after, size)
        token = ""
        if len(rows) == size:
            last, round_time, place = rows[-1]
            token = voting_store.token_of([round_time.isoformat(), last.round_id, place])
        return rvpb.ListSolutionsResponse(
            solutions=[epb.Solution.FromString(s.body) for s, _, _ in rows], next_page_token=token
        )


__all__ = ["VotingReads"]
