"""The registry's tables (schema ``registry``) and the queries on them, SQLAlchemy 2 typed.

Two logs have a global sequence that readers resume from (``worker_events``, ``activity``). Their rows are
inserted under a transaction-scoped advisory lock, so sequences commit in the order they were drawn and a
reader that saw sequence N can never later find an uncommitted N-1 appear behind it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, ClassVar, cast

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Integer,
    LargeBinary,
    SmallInteger,
    String,
    Table,
    Text,
    and_,
    delete,
    func,
    not_,
    or_,
    select,
    text,
    true,
    update,
)
from sqlalchemy.dialects.postgresql import JSONB, insert
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.sql.elements import ColumnElement

from . import filtering

_LOG_LOCKS = {"activity": 0x6D61_7701, "worker_events": 0x6D61_7702}


class Base(DeclarativeBase):
    """Declarative base of the registry schema."""

    type_annotation_map: ClassVar[dict[Any, Any]] = {
        datetime: DateTime(timezone=True),
        dict[str, Any]: JSONB,
        list[Any]: JSONB,
    }


class User(Base):
    """A person."""

    __tablename__ = "users"
    id: Mapped[str] = mapped_column(String(63), primary_key=True)
    display_name: Mapped[str] = mapped_column(Text, default="")
    email: Mapped[str | None] = mapped_column(Text, unique=True)
    role: Mapped[int] = mapped_column(SmallInteger)
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)
    password_hash: Mapped[str] = mapped_column(Text)
    version: Mapped[int] = mapped_column(Integer, default=1)
    create_time: Mapped[datetime]
    update_time: Mapped[datetime]
    last_login_time: Mapped[datetime | None]


class Session(Base):
    """A refresh-token family: everything descended from one Login."""

    __tablename__ = "sessions"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    create_time: Mapped[datetime]
    revoke_time: Mapped[datetime | None]


class RefreshToken(Base):
    """One refresh token of a session (only its hash)."""

    __tablename__ = "refresh_tokens"
    secret_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    session_id: Mapped[str] = mapped_column(ForeignKey("sessions.id", ondelete="CASCADE"), index=True)
    create_time: Mapped[datetime]
    expire_time: Mapped[datetime]
    used_time: Mapped[datetime | None]
    used_request_id: Mapped[str | None] = mapped_column(Text)
    child_hash: Mapped[str | None] = mapped_column(String(64))


class ApiToken(Base):
    """A personal API token (only its hash)."""

    __tablename__ = "api_tokens"
    id: Mapped[str] = mapped_column(String(63), primary_key=True)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    display_name: Mapped[str] = mapped_column(Text, default="")
    role: Mapped[int] = mapped_column(SmallInteger)
    secret_hash: Mapped[str] = mapped_column(String(64), unique=True)
    secret_prefix: Mapped[str] = mapped_column(String(16))
    expire_time: Mapped[datetime | None]
    create_time: Mapped[datetime]
    last_used_time: Mapped[datetime | None]
    revoke_time: Mapped[datetime | None]


class EnrollmentToken(Base):
    """A token that enrolls machines as workers (only its hash)."""

    __tablename__ = "enrollment_tokens"
    id: Mapped[str] = mapped_column(String(63), primary_key=True)
    display_name: Mapped[str] = mapped_column(Text, default="")
    max_uses: Mapped[int] = mapped_column(Integer)
    use_count: Mapped[int] = mapped_column(Integer, default=0)
    expire_time: Mapped[datetime]
    labels: Mapped[dict[str, Any]] = mapped_column(JSONB, default=dict)
    privacy_level: Mapped[int] = mapped_column(SmallInteger, default=0)
    secret_hash: Mapped[str] = mapped_column(String(64), unique=True)
    secret_prefix: Mapped[str] = mapped_column(String(16))
    creator: Mapped[str] = mapped_column(Text)
    create_time: Mapped[datetime]
    revoke_time: Mapped[datetime | None]


class Worker(Base):
    """A worker catalog entry (presence itself lives in Redis)."""

    __tablename__ = "workers"
    id: Mapped[str] = mapped_column(String(63), primary_key=True)
    display_name: Mapped[str] = mapped_column(Text, default="")
    hostname: Mapped[str] = mapped_column(Text, default="")
    agent_version: Mapped[str] = mapped_column(Text, default="")
    platform: Mapped[str] = mapped_column(Text, default="")
    tools: Mapped[list[Any]] = mapped_column(JSONB, default=list)
    labels: Mapped[dict[str, Any]] = mapped_column(JSONB, default=dict)
    agent_labels: Mapped[dict[str, Any]] = mapped_column(JSONB, default=dict)
    privacy_level: Mapped[int] = mapped_column(SmallInteger, default=0)
    capacity_slots: Mapped[int] = mapped_column(Integer, default=0)
    declared_slots: Mapped[int] = mapped_column(Integer, default=0)
    draining: Mapped[bool] = mapped_column(Boolean, default=False)
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)
    deleted: Mapped[bool] = mapped_column(Boolean, default=False)
    credential_hash: Mapped[str | None] = mapped_column(String(64), unique=True)
    enrollment_token_id: Mapped[str | None] = mapped_column(Text, index=True)
    enroll_request_id: Mapped[str | None] = mapped_column(Text)
    tool_stats: Mapped[list[Any]] = mapped_column(JSONB, default=list)
    heartbeat_interval_ms: Mapped[int] = mapped_column(Integer, default=0)
    session_id: Mapped[str] = mapped_column(Text, default="")
    create_time: Mapped[datetime]
    update_time: Mapped[datetime]
    revoke_time: Mapped[datetime | None]
    connect_time: Mapped[datetime | None]
    last_heartbeat_time: Mapped[datetime | None]
    version: Mapped[int] = mapped_column(Integer, default=1)


class WorkerEvent(Base):
    """One change of the worker catalog, with the worker as it was after it (serialised proto)."""

    __tablename__ = "worker_events"
    sequence: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    worker_id: Mapped[str] = mapped_column(Text)
    type: Mapped[int] = mapped_column(SmallInteger)
    time: Mapped[datetime]
    snapshot: Mapped[bytes] = mapped_column(LargeBinary)


class Activity(Base):
    """One entry of the append-only activity log."""

    __tablename__ = "activity"
    sequence: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    entry_id: Mapped[str | None] = mapped_column(Text, unique=True)
    time: Mapped[datetime]
    actor_kind: Mapped[int] = mapped_column(SmallInteger)
    actor_name: Mapped[str] = mapped_column(Text, default="")
    actor_api_token: Mapped[str] = mapped_column(Text, default="")
    actor_peer: Mapped[str] = mapped_column(Text, default="")
    verb: Mapped[str] = mapped_column(Text)
    resource: Mapped[str] = mapped_column(Text, default="")
    task: Mapped[str] = mapped_column(Text, default="")
    subtask: Mapped[str] = mapped_column(Text, default="")
    worker: Mapped[str] = mapped_column(Text, default="")
    level: Mapped[int] = mapped_column(SmallInteger)
    summary: Mapped[str] = mapped_column(Text, default="")
    details: Mapped[dict[str, Any]] = mapped_column(JSONB, default=dict)
    service: Mapped[str] = mapped_column(Text)
    trace_id: Mapped[str] = mapped_column(Text, default="")


class Request(Base):
    """The first answer to a mutating call with a request id (secrets never stored); see services.runtime.replay."""

    __tablename__ = "requests"
    method: Mapped[str] = mapped_column(Text, primary_key=True)
    principal: Mapped[str] = mapped_column(Text, primary_key=True)
    request_id: Mapped[str] = mapped_column(Text, primary_key=True)
    response: Mapped[bytes] = mapped_column(LargeBinary)
    create_time: Mapped[datetime] = mapped_column(server_default=func.now())


# -- ordered logs ----------------------------------------------------------------------------------------------


async def lock_log(session: AsyncSession, log: str) -> None:
    """Serialise appends to ``log`` until this transaction ends (sequences commit in order)."""
    await session.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _LOG_LOCKS[log]})


async def last_sequence(session: AsyncSession, model: type[Activity] | type[WorkerEvent]) -> int:
    """The highest committed sequence of a log (0 when empty)."""
    value = await session.scalar(select(func.coalesce(func.max(model.sequence), 0)))
    return int(value or 0)


async def first_sequence(session: AsyncSession, model: type[Activity] | type[WorkerEvent]) -> int:
    """The lowest retained sequence of a log (0 when empty)."""
    value = await session.scalar(select(func.coalesce(func.min(model.sequence), 0)))
    return int(value or 0)


# -- lookups and batched writes ---------------------------------------------------------------------------------


async def any_user(session: AsyncSession) -> bool:
    """Whether any user exists (a fresh database has none)."""
    return await session.scalar(select(User.id).limit(1)) is not None


async def workers(session: AsyncSession, ids: Sequence[str], *, lock: bool = False) -> Sequence[Worker]:
    """The catalog rows of ``ids`` (those that exist), locked for update when ``lock``."""
    query = select(Worker).where(Worker.id.in_(ids))
    return (await session.scalars(query.with_for_update() if lock else query)).all()


async def api_token_by_hash(session: AsyncSession, hashed: str) -> tuple[ApiToken, User] | None:
    """The API token with this secret hash and its owner."""
    found = (
        await session.execute(
            select(ApiToken, User).join(User, User.id == ApiToken.user_id).where(ApiToken.secret_hash == hashed)
        )
    ).first()
    return found.tuple() if found is not None else None


async def worker_by_credential(session: AsyncSession, hashed: str) -> Worker | None:
    """The worker whose agent credential has this hash."""
    return await session.scalar(select(Worker).where(Worker.credential_hash == hashed))


async def touch_api_tokens(session: AsyncSession, uses: Mapping[str, datetime]) -> None:
    """Record the last use of each API token."""
    for token_id, moment in uses.items():
        await session.execute(update(ApiToken).where(ApiToken.id == token_id).values(last_used_time=moment))


async def touch_heartbeats(session: AsyncSession, beats: Mapping[str, datetime]) -> None:
    """Record the last heartbeat of each worker."""
    for worker_id, moment in beats.items():
        await session.execute(update(Worker).where(Worker.id == worker_id).values(last_heartbeat_time=moment))


async def forget_requests(session: AsyncSession, before: datetime) -> None:
    """Drop request-id answers older than ``before``."""
    await session.execute(delete(Request).where(Request.create_time < before))


# -- identity --------------------------------------------------------------------------------------------------


async def all_users(session: AsyncSession) -> Sequence[User]:
    """Every user."""
    return (await session.scalars(select(User))).all()


async def user_id_by_email(session: AsyncSession, email: str) -> str | None:
    """The id of the user with this e-mail address."""
    return await session.scalar(select(User.id).where(User.email == email))


async def active_admins(session: AsyncSession, admin_role: int) -> int:
    """How many enabled users hold ``admin_role``."""
    count = await session.scalar(
        select(func.count()).select_from(User).where(User.role == admin_role, User.disabled.is_(False))
    )
    return int(count or 0)


async def live_sessions(session: AsyncSession, user_id: str) -> Sequence[Session]:
    """The sessions of a user that are not revoked."""
    return (
        await session.scalars(select(Session).where(Session.user_id == user_id, Session.revoke_time.is_(None)))
    ).all()


async def api_tokens(session: AsyncSession, owner: str | None) -> Sequence[ApiToken]:
    """The API tokens of ``owner`` (everyone's when None)."""
    query = select(ApiToken)
    if owner is not None:
        query = query.where(ApiToken.user_id == owner)
    return (await session.scalars(query)).all()


# -- enrollment --------------------------------------------------------------------------------------------------


async def enrollment_tokens(session: AsyncSession) -> Sequence[EnrollmentToken]:
    """Every enrollment token."""
    return (await session.scalars(select(EnrollmentToken))).all()


async def enrollment_token_by_hash(session: AsyncSession, hashed: str) -> EnrollmentToken | None:
    """The enrollment token with this secret hash, locked for update."""
    return await session.scalar(select(EnrollmentToken).where(EnrollmentToken.secret_hash == hashed).with_for_update())


async def enrolled_by(session: AsyncSession, token_ids: Sequence[str]) -> dict[str, list[str]]:
    """The ids of the workers each enrollment token enrolled."""
    rows = (
        await session.execute(
            select(Worker.enrollment_token_id, Worker.id).where(Worker.enrollment_token_id.in_(token_ids))
        )
    ).all()
    out: dict[str, list[str]] = {}
    for row in rows:
        out.setdefault(str(row.enrollment_token_id), []).append(row.id)
    return out


async def enrollment_of(session: AsyncSession, token_id: str, request_id: str) -> Worker | None:
    """The worker an EnrollAgent call with ``request_id`` enrolled with this token."""
    return await session.scalar(
        select(Worker).where(Worker.enrollment_token_id == token_id, Worker.enroll_request_id == request_id)
    )


# -- the catalog and its change log ------------------------------------------------------------------------------


async def catalog(session: AsyncSession) -> Sequence[Worker]:
    """Every worker not deleted."""
    return (await session.scalars(select(Worker).where(Worker.deleted.is_(False)))).all()


async def worker_events_after(session: AsyncSession, sequence: int, limit: int) -> Sequence[WorkerEvent]:
    """Up to ``limit`` catalog changes after ``sequence``, oldest first."""
    query = select(WorkerEvent).where(WorkerEvent.sequence > sequence).order_by(WorkerEvent.sequence).limit(limit)
    return (await session.scalars(query)).all()


# -- the activity log --------------------------------------------------------------------------------------------


_ADD_ACTIVITY = insert(cast(Table, Activity.__table__)).on_conflict_do_nothing(index_elements=["entry_id"])


async def add_activity_once(session: AsyncSession, rows: Sequence[Mapping[str, Any]]) -> None:
    """Insert activity rows, each unless its ``entry_id`` is already there, in one statement batch (call under
    :func:`lock_log`; every row names every column)."""
    if rows:
        await session.execute(_ADD_ACTIVITY, list(rows))


async def activity_page(
    session: AsyncSession,
    condition: ColumnElement[bool],
    head: int,
    after: int,
    descending: bool,
    limit: int,
) -> Sequence[Activity]:
    """Up to ``limit`` entries matching ``condition`` up to ``head``, past ``after`` in the order asked."""
    query = select(Activity).where(condition, Activity.sequence <= head)
    if after:
        query = query.where(Activity.sequence < after if descending else Activity.sequence > after)
    order = Activity.sequence.desc() if descending else Activity.sequence.asc()
    return (await session.scalars(query.order_by(order).limit(limit))).all()


async def activity_after(
    session: AsyncSession, condition: ColumnElement[bool], after: int, top: int, limit: int
) -> Sequence[Activity]:
    """Up to ``limit`` entries matching ``condition`` in ``(after, top]``, oldest first."""
    query = select(Activity).where(Activity.sequence > after, Activity.sequence <= top, condition)
    return (await session.scalars(query.order_by(Activity.sequence).limit(limit))).all()


# -- activity filter in SQL --------------------------------------------------------------------------------------

_ACTIVITY_COLUMNS: dict[str, Any] = {
    "verb": Activity.verb,
    "resource": Activity.resource,
    "task": Activity.task,
    "subtask": Activity.subtask,
    "worker": Activity.worker,
    "actor.name": Activity.actor_name,
    "actor.kind": Activity.actor_kind,
    "level": Activity.level,
    "service": Activity.service,
    "time": Activity.time,
    "sequence": Activity.sequence,
}


def _escape_like(value: str) -> str:
    return value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def activity_condition(tree: filtering.Node | None) -> ColumnElement[bool]:
    """The WHERE clause of an activity filter; every value is a bound parameter."""
    if tree is None:
        return true()
    if isinstance(tree, filtering.Not):
        return not_(activity_condition(tree.item))
    if isinstance(tree, filtering.And):
        return and_(*(activity_condition(i) for i in tree.items))
    if isinstance(tree, filtering.Or):
        return or_(*(activity_condition(i) for i in tree.items))
    column = _ACTIVITY_COLUMNS[tree.field]
    value = tree.value
    if tree.wildcard:
        hit: ColumnElement[bool] = column.like(_escape_like(str(value)) + "%", escape="\\")
        return hit if tree.op == "=" else not_(hit)
    if tree.op == ":":
        result: ColumnElement[bool] = column.ilike("%" + _escape_like(str(value)) + "%", escape="\\")
        return result
    ops: dict[str, Any] = {
        "=": column.__eq__,
        "!=": column.__ne__,
        "<": column.__lt__,
        "<=": column.__le__,
        ">": column.__gt__,
        ">=": column.__ge__,
    }
    condition: ColumnElement[bool] = ops[tree.op](value)
    return condition
