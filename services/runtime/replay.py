"""Request-id replay: a mutating call retried with the same request id gets its first answer back.

Every service keeps these answers in its own ``requests`` table (method, principal, request_id, response),
written in the same transaction as the call's effect, so a retry after a lost reply never acts twice.
"""

from __future__ import annotations

from typing import TypeVar

from google.protobuf.message import Message
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

M = TypeVar("M", bound=Message)

Conn = AsyncConnection | AsyncSession

_RECALL = text("SELECT response FROM requests WHERE method = :m AND principal = :p AND request_id = :r")
# First writer wins: two racing retries both commit their effect only if each holds its own lock above this.
_KEEP = text(
    "INSERT INTO requests (method, principal, request_id, response) VALUES (:m, :p, :r, :b) ON CONFLICT DO NOTHING"
)


async def recall(conn: Conn, method: str, principal: str, request_id: str, kind: type[M]) -> M | None:
    """The answer an earlier ``method`` call by ``principal`` with ``request_id`` got; None when there was none."""
    if not request_id:
        return None
    row = (await conn.execute(_RECALL, {"m": method, "p": principal, "r": request_id})).first()
    return kind.FromString(bytes(row._mapping["response"])) if row is not None else None


async def keep(conn: Conn, method: str, principal: str, request_id: str, response: Message) -> None:
    """Remember ``response`` for retries of this call (nothing without a request id)."""
    if request_id:
        await conn.execute(_KEEP, {"m": method, "p": principal, "r": request_id, "b": response.SerializeToString()})
