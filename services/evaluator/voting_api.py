"""ReviewService's voting reads (GetVotingRound, ListVotingRounds, ListSolutions), as a mixin. Thin."""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from maw.evaluator.v1 import resources_pb2 as epb
from maw.evaluator.v1 import review_service_pb2 as rvpb
from sqlalchemy.ext.asyncio import AsyncEngine

from services.runtime import invalid_argument
from services.runtime.errors import not_found

from . import voting, voting_store
from .api import Ctx, _filter, _name_id, _page, _token
from .verdict_context import task_id_of

_STATES = {
    "COLLECTING": epb.VOTING_STATE_COLLECTING,
    "VOTING": epb.VOTING_STATE_VOTING,
    "DECIDED": epb.VOTING_STATE_DECIDED,
    "TIED": epb.VOTING_STATE_TIED,
    "OVERRIDDEN": epb.VOTING_STATE_OVERRIDDEN,
}
_METHODS = {"MAJORITY": epb.VOTE_METHOD_MAJORITY, "WEIGHTED": epb.VOTE_METHOD_WEIGHTED}
_PARENT = re.compile(r"^votingRounds/(-|[A-Za-z0-9_-]{1,128})$")
MAX_PAGE, DEFAULT_PAGE = 1000, 100


def _enum(where: dict[str, Any], column: str, words: Mapping[str, int], prefix: str) -> None:
    if column in where:
        word = str(where[column]).upper().removeprefix(prefix)
        if word not in words:
            raise invalid_argument([("filter", f"{column} is one of {', '.join(words)}")])
        where[column] = int(words[word])


def _order(order_by: str, default: str) -> None:
    if order_by.strip() not in ("", default):
        raise invalid_argument([("order_by", f"supported: {default}")])


class VotingReads:
    """GetVotingRound, ListVotingRounds and ListSolutions (ReviewService mixes them in)."""

    db: AsyncEngine

    async def GetVotingRound(self, request: rvpb.GetVotingRoundRequest, context: Ctx) -> rvpb.GetVotingRoundResponse:
        _name_id(request.name, "votingRounds/")
        async with self.db.connect() as conn:
            found = await voting.round_message(conn, request.name)
        if found is None:
            raise not_found("maw.evaluator.v1.VotingRound", request.name)
        return rvpb.GetVotingRoundResponse(voting_round=found)

    async def ListVotingRounds(
        self, request: rvpb.ListVotingRoundsRequest, context: Ctx
    ) -> rvpb.ListVotingRoundsResponse:
        where = _filter(request.filter, {"task": "task_id", "subtask": "subtask", "state": "state", "method": "method"})
        if "task_id" in where:
            where["task_id"] = task_id_of(where["task_id"])
        _enum(where, "state", _STATES, "VOTING_STATE_")
        _enum(where, "method", _METHODS, "VOTE_METHOD_")
        _order(request.order_by, "create_time")
        size, after = _page(request.page_size, request.page_token)
        async with self.db.connect() as conn:
            rounds = await voting_store.list_rounds(conn, where, after, size)
            served = await voting.messages(conn, rounds)
        rows = [(b"", r.create_time, r.id) for r in rounds]
        return rvpb.ListVotingRoundsResponse(voting_rounds=served, next_page_token=_token(rows, size))

    async def ListSolutions(self, request: rvpb.ListSolutionsRequest, context: Ctx) -> rvpb.ListSolutionsResponse:
        parent = _PARENT.match(request.parent)
        if not parent:
            raise invalid_argument([("parent", "must be votingRounds/{voting_round} or votingRounds/-")])
        where = _filter(
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
        _order(request.order_by, "rank")
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
