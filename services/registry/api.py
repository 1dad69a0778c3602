"""The registry's servicers: translate requests into checks and store operations, answers into protos.

Authentication and the coarse role check happen in the shared auth interceptor before any of this runs
(services.runtime.authz); what depends on the request (your own token or, as an admin, anyone's) is checked
here. Every input is validated before the first write, and each mutation commits together with its
activity entry and its idempotency record, so a failed call leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import secrets
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, timedelta
from typing import Any, TypeVar

import grpc
from google.protobuf.message import Message
from maw.common.v1 import work_pb2
from maw.registry.v1 import activity_intake_service_pb2 as aintake_pb
from maw.registry.v1 import activity_intake_service_pb2_grpc as aintake_grpc
from maw.registry.v1 import activity_service_pb2 as activity_pb
from maw.registry.v1 import activity_service_pb2_grpc as activity_grpc
from maw.registry.v1 import auth_service_pb2 as auth_pb
from maw.registry.v1 import auth_service_pb2_grpc as auth_grpc
from maw.registry.v1 import credential_intake_service_pb2 as cintake_pb
from maw.registry.v1 import credential_intake_service_pb2_grpc as cintake_grpc
from maw.registry.v1 import enrollment_service_pb2 as enroll_pb
from maw.registry.v1 import enrollment_service_pb2_grpc as enroll_grpc
from maw.registry.v1 import resources_pb2 as res
from maw.registry.v1 import user_service_pb2 as user_pb
from maw.registry.v1 import user_service_pb2_grpc as user_grpc
from maw.registry.v1 import worker_intake_service_pb2 as wintake_pb
from maw.registry.v1 import worker_intake_service_pb2_grpc as wintake_grpc
from maw.registry.v1 import worker_service_pb2 as worker_pb
from maw.registry.v1 import worker_service_pb2_grpc as worker_grpc
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from services.runtime.auth import (
    AGENT_CREDENTIAL_PREFIX,
    API_TOKEN_PREFIX,
    ENROLLMENT_TOKEN_PREFIX,
    REFRESH_TOKEN_PREFIX,
    current_authentication,
    new_secret,
    secret_hash,
)
from services.runtime.errors import (
    MawError,
    already_exists,
    failed_precondition,
    invalid_argument,
    not_found,
    permission_denied,
    resource_exhausted,
    unauthenticated,
)
from services.runtime.logs import redact
from services.runtime.principal import Principal, PrincipalKind, current_principal

from . import activity_log, convert, credentials, filtering, presence, store, validation, verifier
from ._servicing import peer_host, peer_of
from .convert import now, ts
from .credentials import Role, TokenState
from .feeds import ACTIVITY_FEED, WORKER_FEED
from .registry import Registry

M = TypeVar("M", bound=Message)
Context = grpc.aio.ServicerContext[Any, Any]

_ROLE_ENUM = {"VIEWER": 1, "OPERATOR": 2, "ADMIN": 3, "ROLE_VIEWER": 1, "ROLE_OPERATOR": 2, "ROLE_ADMIN": 3}
_STATE_ENUM = {n: v for s in TokenState for n, v in ((s.name, s.value), (f"TOKEN_STATE_{s.name}", s.value))}
_STATUS_ENUM = {
    n: v for s in presence.WorkerStatus for n, v in ((s.name, s.value), (f"WORKER_STATUS_{s.name}", s.value))
}
_PRIVACY_ENUM = {"NORMAL": 1, "SENSITIVE": 2, "PRIVACY_LEVEL_NORMAL": 1, "PRIVACY_LEVEL_SENSITIVE": 2}
_TOOL_ENUM = {
    n: v
    for name, v in (("CLAUDE_CODE", 1), ("GEMINI_CLI", 2), ("CODEX_CLI", 3), ("OLLAMA", 4), ("SHELL", 5), ("TEST", 6))
    for n in (name, f"TOOL_KIND_{name}")
}
_LEVEL_ENUM = {
    n: v for name, v in (("INFO", 1), ("WARNING", 2), ("ERROR", 3)) for n in (name, f"ACTIVITY_LEVEL_{name}")
}
_ACTOR_ENUM = {
    n: v
    for name, v in (("USER", 1), ("AGENT", 2), ("SERVICE", 3), ("ANONYMOUS", 4))
    for n in (name, f"ACTOR_KIND_{name}")
}
F = filtering.FieldType
USER_FILTER: filtering.Schema = {
    "role": F("enum", _ROLE_ENUM),
    "disabled": F("bool"),
    "display_name": F("str"),
    "email": F("str"),
}
TOKEN_FILTER: filtering.Schema = {
    "state": F("enum", _STATE_ENUM),
    "role": F("enum", _ROLE_ENUM),
    "display_name": F("str"),
    "expire_time": F("time"),
}
ENROLLMENT_FILTER: filtering.Schema = {
    "state": F("enum", _STATE_ENUM),
    "creator": F("str"),
    "labels": F("str", prefix_map=True),
    "expire_time": F("time"),
}
WORKER_FILTER: filtering.Schema = {
    "status": F("enum", _STATUS_ENUM),
    "labels": F("str", prefix_map=True),
    "effective_labels": F("str", prefix_map=True),
    "tools.kind": F("enum", _TOOL_ENUM),
    "privacy_level": F("enum", _PRIVACY_ENUM),
    "draining": F("bool"),
    "disabled": F("bool"),
    "hostname": F("str"),
}
ACTIVITY_FILTER: filtering.Schema = {
    "verb": F("str"),
    "resource": F("str"),
    "task": F("str"),
    "subtask": F("str"),
    "worker": F("str"),
    "actor.name": F("str"),
    "actor.kind": F("enum", _ACTOR_ENUM),
    "level": F("enum", _LEVEL_ENUM),
    "service": F("str"),
    "time": F("time"),
    "sequence": F("int"),
}
MAX_ENROLLMENT_DAYS = 30
MAX_ENROLLMENT_USES = 10_000
MAX_BATCH = 1000
PEER_LOGIN_FACTOR = 5


# -- helpers -----------------------------------------------------------------------------------------------------


def _caller() -> Principal:
    return current_principal()


def _caller_user_id() -> str:
    principal = _caller()
    if principal.kind != PrincipalKind.USER:
        raise permission_denied("only users may do this", "USER_REQUIRED")
    return principal.name.removeprefix("users/")


def _is_admin(principal: Principal) -> bool:
    return principal.kind == PrincipalKind.USER and principal.role == "admin"


def _acting_role(principal: Principal) -> int:
    return {"viewer": 1, "operator": 2, "admin": 3}.get(principal.role, 0)


def _idem_key(method: str, request_id: str) -> str:
    return f"{method}|{_caller().name}|{request_id}"


async def _recall(session: AsyncSession, method: str, request_id: str, kind: type[M]) -> M | None:
    if not request_id:
        return None
    raw = await store.remembered(session, _idem_key(method, request_id))
    return kind.FromString(raw) if raw is not None else None


def _keep(session: AsyncSession, method: str, request_id: str, response: Message) -> None:
    if request_id:
        store.remember(session, _idem_key(method, request_id), response.SerializeToString(), now())


def _user_name(name: str, field: str = "name") -> str:
    if name == "users/me":
        return _caller_user_id()
    return validation.name_id(name, "users", validation.USER_ID, field)


def _role(value: int, field: str) -> int:
    if value not in (1, 2, 3):
        raise invalid_argument([(field, "must be ROLE_VIEWER, ROLE_OPERATOR or ROLE_ADMIN")])
    return value


def _page(items: list[M], size: int, token: str, query: str) -> tuple[list[M], str]:
    start = validation.page_token(token, query)
    chunk = items[start : start + size]
    more = start + size < len(items)
    return chunk, validation.next_page_token(start + size, query) if more else ""


def _mask(paths: list[str], allowed: set[str], output_only: set[str] = frozenset()) -> set[str]:  # type: ignore[assignment]
    if not paths:
        raise invalid_argument([("update_mask", "required: name the fields to change")])
    bad = [(f"update_mask.paths[{i}]", f"{p!r} cannot be updated") for i, p in enumerate(paths) if p not in allowed]
    if any(p in output_only for p in paths):
        bad = [(f"update_mask.paths[{i}]", f"{p!r} is output only") for i, p in enumerate(paths) if p in output_only]
    if bad:
        raise invalid_argument(bad)
    return set(paths)


def _etag(given: str, version: int, kind: str, name: str) -> None:
    if given and given != str(version):
        raise MawError(grpc.StatusCode.ABORTED, f"{kind} {name} changed meanwhile (etag mismatch); read it again")


# -- AuthService -----------------------------------------------------------------------------------------------------


class AuthServicer(auth_grpc.AuthServiceServicer):
    """Login, refresh, logout, API tokens, WhoAmI."""

    def __init__(self, registry: Registry) -> None:
        self.r = registry

    def _bucket(self, key: str) -> tuple[float, int]:
        s = self.r.settings
        # Many people can share one address (NAT, the gateway): a peer gets several users' allowance.
        factor = PEER_LOGIN_FACTOR if key.startswith("login:peer:") else 1
        return s.login_failures_per_min / 60 * factor, s.login_failure_burst * factor

    async def _limited(self, keys: list[str]) -> None:
        for key in keys:
            rate, burst = self._bucket(key)
            wait = await self.r.auth.limiter.take(key, rate, burst, cost=0)
            if wait > 0:
                raise resource_exhausted("too many failed logins; wait before trying again", wait)

    async def _failed(self, keys: list[str]) -> None:
        for key in keys:
            rate, burst = self._bucket(key)
            await self.r.auth.limiter.take(key, rate, burst, cost=1)

    def _pair(self, user: store.User, session_id: str, refresh: str, refresh_expiry: Any) -> auth_pb.TokenPair:
        access, expiry = self.r.auth.jwt.issue(
            f"users/{user.id}", Role(user.role).label, session_id, self.r.settings.access_token_ttl_s
        )
        return auth_pb.TokenPair(
            access_token=access,
            access_token_expire_time=ts(expiry),
            refresh_token=refresh,
            refresh_token_expire_time=ts(refresh_expiry),
        )

    async def Login(self, request: auth_pb.LoginRequest, context: Context) -> auth_pb.LoginResponse:
        bad = []
        if not request.username or len(request.username) > 63:
            bad.append(("username", "required, at most 63 characters"))
        if not request.password or len(request.password) > validation.MAX_PASSWORD:
            bad.append(("password", f"required, at most {validation.MAX_PASSWORD} characters"))
        if bad:
            raise invalid_argument(bad)
        peer = peer_host(context)
        keys = [f"login:user:{request.username}", f"login:peer:{peer}"]
        await self._limited(keys)
        async with self.r.sessions() as session:
            user = await session.get(store.User, request.username)
        ok = await asyncio.to_thread(
            credentials.verify_password, user.password_hash if user else None, request.password
        )
        anonymous = Principal(PrincipalKind.ANONYMOUS, "")
        if not ok or user is None or user.disabled:
            await self._failed(keys)
            known = validation.USER_ID.fullmatch(request.username) is not None
            async with self.r.sessions() as session, session.begin():
                await activity_log.append(
                    session, "auth.login_failed", resource=f"users/{request.username}" if known else "",
                    summary="failed login", level=res.ACTIVITY_LEVEL_WARNING, peer=peer_of(context),
                    actor=anonymous, api_token="",
                )  # fmt: skip
            await self.r.feeds.publish(ACTIVITY_FEED)
            raise unauthenticated("wrong user name or password", "LOGIN_FAILED")
        moment = now()
        session_id = uuid.uuid4().hex
        refresh = new_secret(REFRESH_TOKEN_PREFIX)
        refresh_expiry = moment + timedelta(seconds=self.r.settings.refresh_token_ttl_s)
        me = Principal(PrincipalKind.USER, f"users/{user.id}", Role(user.role).label)
        async with self.r.sessions() as session, session.begin():
            row = await session.get(store.User, user.id, with_for_update=True)
            if row is None:
                raise unauthenticated("wrong user name or password", "LOGIN_FAILED")
            row.last_login_time = moment
            session.add(store.Session(id=session_id, user_id=user.id, create_time=moment, revoke_time=None))
            await session.flush()
            session.add(
                store.RefreshToken(secret_hash=secret_hash(refresh), session_id=session_id, create_time=moment,
                                   expire_time=refresh_expiry, used_time=None, used_request_id=None, child_hash=None)
            )  # fmt: skip
            await activity_log.append(
                session, "auth.login", resource=f"users/{user.id}", summary="signed in",
                peer=peer_of(context), actor=me, api_token="",
            )  # fmt: skip
            answer = auth_pb.LoginResponse(
                tokens=self._pair(row, session_id, refresh, refresh_expiry), user=convert.user_pb(row)
            )
        await self.r.feeds.publish(ACTIVITY_FEED)
        return answer

    async def RefreshToken(
        self, request: auth_pb.RefreshTokenRequest, context: Context
    ) -> auth_pb.RefreshTokenResponse:
        if not request.refresh_token:
            raise invalid_argument([("refresh_token", "required")])
        validation.request_id(request.request_id)
        moment = now()
        presented_hash = secret_hash(request.refresh_token)
        revoked_session = ""
        async with self.r.sessions() as session, session.begin():
            token = await session.get(store.RefreshToken, presented_hash, with_for_update=True)
            if token is None:
                raise unauthenticated("invalid refresh token", "REFRESH_INVALID")
            family = await session.get(store.Session, token.session_id, with_for_update=True)
            user = await session.get(store.User, family.user_id) if family is not None else None
            if family is None or family.revoke_time is not None or user is None or user.disabled:
                raise unauthenticated("session ended; log in again", "SESSION_REVOKED")
            if token.expire_time <= moment:
                raise unauthenticated("refresh token expired; log in again", "REFRESH_EXPIRED")
            me = Principal(PrincipalKind.USER, f"users/{user.id}", Role(user.role).label, f"sessions/{family.id}")
            if token.used_time is not None:
                child = credentials.derived_secret(
                    REFRESH_TOKEN_PREFIX, request.refresh_token, "refresh", request.request_id
                )
                child_row = await session.get(store.RefreshToken, token.child_hash) if token.child_hash else None
                retry = (
                    request.request_id
                    and token.used_request_id == request.request_id
                    and (moment - token.used_time).total_seconds() < credentials.RETRY_WINDOW_S
                    and child_row is not None
                    and child_row.used_time is None
                    and secret_hash(child) == token.child_hash
                )
                if retry and child_row is not None:
                    pair = self._pair(user, family.id, child, child_row.expire_time)
                    return auth_pb.RefreshTokenResponse(tokens=pair)
                family.revoke_time = moment
                revoked_session = family.id
                await activity_log.append(
                    session, "auth.refresh_reused", resource=f"users/{user.id}", level=res.ACTIVITY_LEVEL_WARNING,
                    summary="a used refresh token was presented again; the session is revoked",
                    peer=peer_of(context), actor=me, api_token="",
                )  # fmt: skip
            else:
                child = credentials.derived_secret(
                    REFRESH_TOKEN_PREFIX, request.refresh_token, "refresh", request.request_id
                )
                expiry = moment + timedelta(seconds=self.r.settings.refresh_token_ttl_s)
                token.used_time = moment
                token.used_request_id = request.request_id or None
                token.child_hash = secret_hash(child)
                session.add(
                    store.RefreshToken(secret_hash=token.child_hash, session_id=family.id, create_time=moment,
                                       expire_time=expiry, used_time=None, used_request_id=None, child_hash=None)
                )  # fmt: skip
                pair = self._pair(user, family.id, child, expiry)
        if revoked_session:
            await self.r.auth.revocations.publish([f"sessions/{revoked_session}"])
            await self.r.feeds.publish(ACTIVITY_FEED)
            raise unauthenticated("refresh token already used; the session is revoked", "REFRESH_REUSED")
        return auth_pb.RefreshTokenResponse(tokens=pair)

    async def Logout(self, request: auth_pb.LogoutRequest, context: Context) -> auth_pb.LogoutResponse:
        user_id = _caller_user_id()
        if not request.refresh_token and not request.all_sessions:
            raise invalid_argument([("refresh_token", "required unless all_sessions is true")])
        moment = now()
        ended: list[str] = []
        async with self.r.sessions() as session, session.begin():
            if request.all_sessions:
                families = (
                    await session.scalars(
                        select(store.Session).where(
                            store.Session.user_id == user_id, store.Session.revoke_time.is_(None)
                        )
                    )
                ).all()
            else:
                token = await session.get(store.RefreshToken, secret_hash(request.refresh_token))
                family = await session.get(store.Session, token.session_id) if token else None
                if family is not None and family.user_id != user_id:
                    raise permission_denied("that session is not yours", "NOT_OWNER")
                families = [family] if family is not None and family.revoke_time is None else []
            for family in families:
                family.revoke_time = moment
                ended.append(f"sessions/{family.id}")
            if ended:
                await activity_log.append(
                    session, "auth.logout", resource=f"users/{user_id}", summary=f"{len(ended)} session(s) ended",
                    peer=peer_of(context),
                )  # fmt: skip
        if ended:
            await self.r.auth.revocations.publish(ended)
            await self.r.feeds.publish(ACTIVITY_FEED)
        return auth_pb.LogoutResponse()

    async def CreateApiToken(
        self, request: auth_pb.CreateApiTokenRequest, context: Context
    ) -> auth_pb.CreateApiTokenResponse:
        me = _caller()
        caller_id = _caller_user_id()
        owner_id = _user_name(request.parent, "parent") if request.parent else caller_id
        if owner_id != caller_id and not _is_admin(me):
            raise permission_denied("only admins may create tokens for someone else", "NOT_OWNER")
        spec = request.api_token
        role = _role(spec.role, "api_token.role")
        display = validation.display_name(spec.display_name, "api_token.display_name")
        expiry = convert.from_ts(spec.expire_time) if spec.HasField("expire_time") else None
        if expiry is not None and expiry <= now():
            raise invalid_argument([("api_token.expire_time", "must be in the future")])
        validation.request_id(request.request_id)
        if role > _acting_role(me):
            raise invalid_argument([("api_token.role", "may not exceed the role you act with")])
        method = "CreateApiToken"
        async with self.r.sessions() as session, session.begin():
            first = await _recall(session, method, request.request_id, auth_pb.CreateApiTokenResponse)
            if first is not None:
                return first
            owner = await session.get(store.User, owner_id)
            if owner is None:
                raise not_found("User", f"users/{owner_id}")
            if role > owner.role:
                raise invalid_argument([("api_token.role", "may not exceed the owner's role")])
            secret = new_secret(API_TOKEN_PREFIX)
            moment = now()
            row = store.ApiToken(
                id=secrets.token_hex(6), user_id=owner_id, display_name=display, role=role,
                secret_hash=secret_hash(secret), secret_prefix=credentials.secret_prefix(secret), expire_time=expiry,
                create_time=moment, last_used_time=None, revoke_time=None,
            )  # fmt: skip
            session.add(row)
            token_pb = convert.api_token_pb(row, moment)
            await activity_log.append(
                session, "api_token.created", resource=token_pb.name, summary=f"API token {display!r} created",
                details={"role": Role(role).label}, peer=peer_of(context),
            )  # fmt: skip
            _keep(session, method, request.request_id, auth_pb.CreateApiTokenResponse(api_token=token_pb))
        await self.r.feeds.publish(ACTIVITY_FEED)
        return auth_pb.CreateApiTokenResponse(api_token=token_pb, secret=secret)

    async def ListApiTokens(
        self, request: auth_pb.ListApiTokensRequest, context: Context
    ) -> auth_pb.ListApiTokensResponse:
        me = _caller()
        caller_id = _caller_user_id()
        parent = request.parent or f"users/{caller_id}"
        owner = None if parent == "users/-" else _user_name(parent, "parent")
        if owner != caller_id and not _is_admin(me):
            raise permission_denied("only admins may list someone else's tokens", "NOT_OWNER")
        size = validation.page_size(request.page_size)
        tree = filtering.parse(request.filter, TOKEN_FILTER)
        column, desc = validation.order_by(
            request.order_by, {"create_time": "create_time", "display_name": "display_name"}, "create_time desc"
        )
        async with self.r.sessions() as session:
            query = select(store.ApiToken)
            if owner is not None:
                query = query.where(store.ApiToken.user_id == owner)
            rows = (await session.scalars(query)).all()
        moment = now()
        tokens = [convert.api_token_pb(r, moment) for r in rows]
        tokens = [t for t in tokens if filtering.matches(tree, _token_lookup(t))]
        tokens.sort(key=lambda t: _token_sort_key(t, column), reverse=desc)
        page, token = _page(tokens, size, request.page_token, f"{parent}|{request.filter}|{request.order_by}")
        return auth_pb.ListApiTokensResponse(api_tokens=page, next_page_token=token)

    async def RevokeApiToken(
        self, request: auth_pb.RevokeApiTokenRequest, context: Context
    ) -> auth_pb.RevokeApiTokenResponse:
        me = _caller()
        caller_id = _caller_user_id()
        owner_id, token_id = _api_token_name(request.name)
        validation.request_id(request.request_id)
        if owner_id != caller_id and not _is_admin(me):
            raise permission_denied("only admins may revoke someone else's tokens", "NOT_OWNER")
        changed = False
        async with self.r.sessions() as session, session.begin():
            row = await session.get(store.ApiToken, token_id, with_for_update=True)
            if row is None or row.user_id != owner_id:
                raise not_found("ApiToken", request.name)
            if row.revoke_time is None:
                row.revoke_time = now()
                changed = True
                await activity_log.append(
                    session, "api_token.revoked", resource=request.name, summary="API token revoked",
                    peer=peer_of(context),
                )  # fmt: skip
            answer = auth_pb.RevokeApiTokenResponse(api_token=convert.api_token_pb(row, now()))
        if changed:
            await self.r.auth.revocations.publish([request.name])
            await self.r.feeds.publish(ACTIVITY_FEED)
        return answer

    async def WhoAmI(self, request: auth_pb.WhoAmIRequest, context: Context) -> auth_pb.WhoAmIResponse:
        auth = current_authentication()
        principal = auth.principal
        reply = auth_pb.WhoAmIResponse(
            principal=principal.name,
            role=_acting_role(principal),  # type: ignore[arg-type]
            auth_method=auth.method,  # type: ignore[arg-type]
            api_token=auth.api_token,
            expire_time=ts(auth.expire_time),
        )
        if principal.kind == PrincipalKind.USER:
            async with self.r.sessions() as session:
                row = await session.get(store.User, principal.name.removeprefix("users/"))
            if row is not None:
                reply.user.CopyFrom(convert.user_pb(row))
        return reply


def _api_token_name(name: str) -> tuple[str, str]:
    parts = name.split("/")
    if (
        len(parts) != 4
        or parts[0] != "users"
        or parts[2] != "apiTokens"
        or not validation.USER_ID.fullmatch(parts[1])
        or not validation.TOKEN_ID.fullmatch(parts[3])
    ):
        raise invalid_argument([("name", "not a valid name of the form `users/{user}/apiTokens/{api_token}`")])
    return parts[1], parts[3]


def _token_sort_key(token: res.ApiToken, column: str) -> tuple[str, str]:
    value = token.create_time.ToJsonString() if column == "create_time" else token.display_name
    return value, token.name


def _token_lookup(token: res.ApiToken) -> Callable[[str], Any]:
    def lookup(field: str) -> Any:
        if field == "expire_time":
            return token.expire_time.ToDatetime(tzinfo=UTC) if token.HasField("expire_time") else None
        return getattr(token, field)

    return lookup


# -- UserService ------------------------------------------------------------------------------------------------------


class UserServicer(user_grpc.UserServiceServicer):
    """People and their roles."""

    def __init__(self, registry: Registry) -> None:
        self.r = registry

    async def CreateUser(self, request: user_pb.CreateUserRequest, context: Context) -> user_pb.CreateUserResponse:
        user_id = validation.user_id(request.user_id, "user_id")
        role = _role(request.user.role, "user.role")
        display = validation.display_name(request.user.display_name, "user.display_name")
        email = validation.email(request.user.email, "user.email")
        password = validation.password(request.password, "password")
        validation.request_id(request.request_id)
        method = "CreateUser"
        async with self.r.sessions() as session:
            first = await _recall(session, method, request.request_id, user_pb.CreateUserResponse)
            if first is not None:
                return first
        hashed = await asyncio.to_thread(credentials.hash_password, password)
        moment = now()
        try:
            async with self.r.sessions() as session, session.begin():
                if await session.get(store.User, user_id) is not None:
                    raise already_exists("User", f"users/{user_id}")
                if email and await session.scalar(select(store.User.id).where(store.User.email == email)):
                    raise already_exists("User", f"email {email}")
                row = store.User(
                    id=user_id, display_name=display, email=email, role=role, disabled=False, password_hash=hashed,
                    version=1, create_time=moment, update_time=moment, last_login_time=None,
                )  # fmt: skip
                session.add(row)
                answer = user_pb.CreateUserResponse(user=convert.user_pb(row))
                await activity_log.append(
                    session, "user.created", resource=f"users/{user_id}", summary=f"user {user_id} created",
                    details={"role": Role(role).label}, peer=peer_of(context),
                )  # fmt: skip
                _keep(session, method, request.request_id, answer)
        except IntegrityError:
            raise already_exists("User", f"users/{user_id}") from None
        await self.r.feeds.publish(ACTIVITY_FEED)
        return answer

    async def GetUser(self, request: user_pb.GetUserRequest, context: Context) -> user_pb.GetUserResponse:
        user_id = _user_name(request.name)
        async with self.r.sessions() as session:
            row = await session.get(store.User, user_id)
        if row is None:
            raise not_found("User", request.name)
        return user_pb.GetUserResponse(user=convert.user_pb(row))

    async def ListUsers(self, request: user_pb.ListUsersRequest, context: Context) -> user_pb.ListUsersResponse:
        size = validation.page_size(request.page_size)
        tree = filtering.parse(request.filter, USER_FILTER)
        column, desc = validation.order_by(
            request.order_by, {"name": "name", "display_name": "display_name", "create_time": "create_time"}, "name"
        )
        async with self.r.sessions() as session:
            rows = (await session.scalars(select(store.User))).all()
        users = [convert.user_pb(r) for r in rows]
        users = [u for u in users if filtering.matches(tree, lambda f, u=u: getattr(u, f))]  # type: ignore[misc]
        users.sort(key=lambda u: (str(getattr(u, column)) if column != "create_time" else u.create_time.ToDatetime(),
                                  u.name), reverse=desc)  # fmt: skip
        page, token = _page(users, size, request.page_token, f"{request.filter}|{request.order_by}")
        return user_pb.ListUsersResponse(users=page, next_page_token=token)

    async def UpdateUser(self, request: user_pb.UpdateUserRequest, context: Context) -> user_pb.UpdateUserResponse:
        me = _caller()
        user_id = _user_name(request.user.name, "user.name")
        paths = _mask(
            list(request.update_mask.paths),
            {"display_name", "email", "role", "disabled"},
            {"name", "create_time", "update_time", "last_login_time", "etag"},
        )
        validation.request_id(request.request_id)
        if user_id != _caller_user_id() and not _is_admin(me):
            raise permission_denied("only admins may change other users", "NOT_OWNER")
        if paths & {"role", "disabled"} and not _is_admin(me):
            raise permission_denied("only admins may change roles or disable users", "ADMIN_REQUIRED")
        display = validation.display_name(request.user.display_name, "user.display_name")
        email = validation.email(request.user.email, "user.email") if "email" in paths else None
        role = _role(request.user.role, "user.role") if "role" in paths else 0
        method = "UpdateUser"
        revoke = False
        async with self.r.sessions() as session, session.begin():
            first = await _recall(session, method, request.request_id, user_pb.UpdateUserResponse)
            if first is not None:
                return first
            row = await session.get(store.User, user_id, with_for_update=True)
            if row is None:
                raise not_found("User", request.user.name)
            _etag(request.user.etag, row.version, "user", request.user.name)
            demotes = ("role" in paths and role < Role.ADMIN) or ("disabled" in paths and request.user.disabled)
            if demotes and row.role == Role.ADMIN and not row.disabled and await _active_admins(session) <= 1:
                raise failed_precondition("LAST_ADMIN", request.user.name, "cannot demote or disable the last admin")
            if (
                email
                and email != row.email
                and await session.scalar(select(store.User.id).where(store.User.email == email))
            ):
                raise already_exists("User", f"email {email}")
            before = {"role": row.role, "disabled": row.disabled}
            if "display_name" in paths:
                row.display_name = display
            if "email" in paths:
                row.email = email
            if "role" in paths:
                row.role = role
            if "disabled" in paths:
                row.disabled = request.user.disabled
            revoke = row.role < before["role"] or (row.disabled and not before["disabled"])
            row.version += 1
            row.update_time = now()
            answer = user_pb.UpdateUserResponse(user=convert.user_pb(row))
            await activity_log.append(
                session, "user.updated", resource=f"users/{user_id}", summary=f"user {user_id} updated",
                details={"fields": sorted(paths)}, peer=peer_of(context),
            )  # fmt: skip
            _keep(session, method, request.request_id, answer)
        if revoke:
            await self.r.auth.revocations.publish([f"users/{user_id}"])
        await self.r.feeds.publish(ACTIVITY_FEED)
        return answer

    async def DeleteUser(self, request: user_pb.DeleteUserRequest, context: Context) -> user_pb.DeleteUserResponse:
        user_id = validation.name_id(request.name, "users", validation.USER_ID, "name")
        validation.request_id(request.request_id)
        method = "DeleteUser"
        async with self.r.sessions() as session, session.begin():
            if await _recall(session, method, request.request_id, user_pb.DeleteUserResponse) is not None:
                return user_pb.DeleteUserResponse()
            row = await session.get(store.User, user_id, with_for_update=True)
            if row is None:
                raise not_found("User", request.name)
            _etag(request.etag, row.version, "user", request.name)
            if row.role == Role.ADMIN and not row.disabled and await _active_admins(session) <= 1:
                raise failed_precondition("LAST_ADMIN", request.name, "cannot delete the last admin")
            await session.delete(row)
            await activity_log.append(
                session, "user.deleted", resource=request.name, summary=f"user {user_id} deleted",
                peer=peer_of(context),
            )  # fmt: skip
            _keep(session, method, request.request_id, user_pb.DeleteUserResponse())
        await self.r.auth.revocations.publish([request.name])
        await self.r.feeds.publish(ACTIVITY_FEED)
        return user_pb.DeleteUserResponse()

    async def SetPassword(self, request: user_pb.SetPasswordRequest, context: Context) -> user_pb.SetPasswordResponse:
        me = _caller()
        caller_id = _caller_user_id()
        user_id = _user_name(request.name)
        password = validation.password(request.new_password, "new_password")
        validation.request_id(request.request_id)
        own = user_id == caller_id
        if not own and not _is_admin(me):
            raise permission_denied("only admins may set someone else's password", "NOT_OWNER")
        if own and not request.current_password:
            raise invalid_argument([("current_password", "required to change your own password")])
        method = "SetPassword"
        async with self.r.sessions() as session:
            if await _recall(session, method, request.request_id, user_pb.SetPasswordResponse) is not None:
                return user_pb.SetPasswordResponse()
            row = await session.get(store.User, user_id)
        if row is None:
            raise not_found("User", request.name)
        if own and not await asyncio.to_thread(
            credentials.verify_password, row.password_hash, request.current_password
        ):
            raise permission_denied("current password is wrong", "WRONG_PASSWORD")
        hashed = await asyncio.to_thread(credentials.hash_password, password)
        keep = current_authentication().principal.credential_id if own else ""
        ended: list[str] = []
        async with self.r.sessions() as session, session.begin():
            row = await session.get(store.User, user_id, with_for_update=True)
            if row is None:
                raise not_found("User", request.name)
            row.password_hash = hashed
            row.version += 1
            row.update_time = now()
            families = (
                await session.scalars(
                    select(store.Session).where(store.Session.user_id == user_id, store.Session.revoke_time.is_(None))
                )
            ).all()
            for family in families:
                if f"sessions/{family.id}" != keep:
                    family.revoke_time = now()
                    ended.append(f"sessions/{family.id}")
            await activity_log.append(
                session, "user.password_changed", resource=f"users/{user_id}", summary="password changed",
                details={"sessions_ended": len(ended)}, peer=peer_of(context),
            )  # fmt: skip
            _keep(session, method, request.request_id, user_pb.SetPasswordResponse())
        await self.r.auth.revocations.publish(ended)
        await self.r.feeds.publish(ACTIVITY_FEED)
        return user_pb.SetPasswordResponse()


async def _active_admins(session: AsyncSession) -> int:
    count = await session.scalar(
        select(func.count())
        .select_from(store.User)
        .where(store.User.role == Role.ADMIN, store.User.disabled.is_(False))
    )
    return int(count or 0)


# -- EnrollmentService ---------------------------------------------------------------------------------------------


class EnrollmentServicer(enroll_grpc.EnrollmentServiceServicer):
    """Enrollment tokens and EnrollAgent."""

    def __init__(self, registry: Registry) -> None:
        self.r = registry

    async def _workers_of(self, session: AsyncSession, token_ids: list[str]) -> dict[str, list[str]]:
        rows = (
            await session.execute(
                select(store.Worker.enrollment_token_id, store.Worker.id).where(
                    store.Worker.enrollment_token_id.in_(token_ids)
                )
            )
        ).all()
        out: dict[str, list[str]] = {}
        for token_id, worker_id in rows:
            out.setdefault(str(token_id), []).append(worker_id)
        return out

    async def CreateEnrollmentToken(
        self, request: enroll_pb.CreateEnrollmentTokenRequest, context: Context
    ) -> enroll_pb.CreateEnrollmentTokenResponse:
        spec = request.enrollment_token
        moment = now()
        bad = []
        if not 1 <= spec.max_uses <= MAX_ENROLLMENT_USES:
            bad.append(("enrollment_token.max_uses", f"between 1 and {MAX_ENROLLMENT_USES}"))
        if not spec.HasField("expire_time"):
            bad.append(("enrollment_token.expire_time", "required"))
        else:
            expiry = convert.from_ts(spec.expire_time)
            if not moment < expiry <= moment + timedelta(days=MAX_ENROLLMENT_DAYS):
                bad.append(("enrollment_token.expire_time", f"in the future, at most {MAX_ENROLLMENT_DAYS} days ahead"))
        if spec.privacy_level not in (0, 1, 2):
            bad.append(("enrollment_token.privacy_level", "not a PrivacyLevel"))
        if bad:
            raise invalid_argument(bad)
        display = validation.display_name(spec.display_name, "enrollment_token.display_name")
        labels = validation.labels(spec.labels, "enrollment_token.labels")
        validation.request_id(request.request_id)
        method = "CreateEnrollmentToken"
        async with self.r.sessions() as session, session.begin():
            first = await _recall(session, method, request.request_id, enroll_pb.CreateEnrollmentTokenResponse)
            if first is not None:
                return first
            secret = new_secret(ENROLLMENT_TOKEN_PREFIX)
            row = store.EnrollmentToken(
                id=secrets.token_hex(6), display_name=display, max_uses=spec.max_uses, use_count=0,
                expire_time=convert.from_ts(spec.expire_time), labels=labels,
                privacy_level=spec.privacy_level or work_pb2.PRIVACY_LEVEL_NORMAL, secret_hash=secret_hash(secret),
                secret_prefix=credentials.secret_prefix(secret), creator=_caller().name, create_time=moment,
                revoke_time=None,
            )  # fmt: skip
            session.add(row)
            token_pb = convert.enrollment_pb(row, moment)
            await activity_log.append(
                session, "enrollment_token.created", resource=token_pb.name,
                summary=f"enrollment token {display!r} created ({spec.max_uses} use(s))", peer=peer_of(context),
            )  # fmt: skip
            _keep(
                session, method, request.request_id, enroll_pb.CreateEnrollmentTokenResponse(enrollment_token=token_pb)
            )
        await self.r.feeds.publish(ACTIVITY_FEED)
        return enroll_pb.CreateEnrollmentTokenResponse(enrollment_token=token_pb, secret=secret)

    async def GetEnrollmentToken(
        self, request: enroll_pb.GetEnrollmentTokenRequest, context: Context
    ) -> enroll_pb.GetEnrollmentTokenResponse:
        token_id = validation.name_id(request.name, "enrollmentTokens", validation.TOKEN_ID, "name")
        async with self.r.sessions() as session:
            row = await session.get(store.EnrollmentToken, token_id)
            if row is None:
                raise not_found("EnrollmentToken", request.name)
            workers = await self._workers_of(session, [token_id])
        return enroll_pb.GetEnrollmentTokenResponse(
            enrollment_token=convert.enrollment_pb(row, now(), workers.get(token_id, []))
        )

    async def ListEnrollmentTokens(
        self, request: enroll_pb.ListEnrollmentTokensRequest, context: Context
    ) -> enroll_pb.ListEnrollmentTokensResponse:
        size = validation.page_size(request.page_size)
        tree = filtering.parse(request.filter, ENROLLMENT_FILTER)
        _, desc = validation.order_by(request.order_by, {"create_time": "create_time"}, "create_time desc")
        async with self.r.sessions() as session:
            rows = (await session.scalars(select(store.EnrollmentToken))).all()
            workers = await self._workers_of(session, [r.id for r in rows])
        moment = now()
        tokens = [convert.enrollment_pb(r, moment, workers.get(r.id, [])) for r in rows]

        def lookup(t: res.EnrollmentToken) -> Callable[[str], Any]:
            def get(field: str) -> Any:
                if field.startswith("labels."):
                    return t.labels.get(field.removeprefix("labels."))
                if field == "expire_time":
                    return t.expire_time.ToDatetime(tzinfo=UTC)
                return getattr(t, field)

            return get

        tokens = [t for t in tokens if filtering.matches(tree, lookup(t))]
        tokens.sort(key=lambda t: (t.create_time.ToDatetime(), t.name), reverse=desc)
        page, token = _page(tokens, size, request.page_token, f"{request.filter}|{request.order_by}")
        return enroll_pb.ListEnrollmentTokensResponse(enrollment_tokens=page, next_page_token=token)

    async def RevokeEnrollmentToken(
        self, request: enroll_pb.RevokeEnrollmentTokenRequest, context: Context
    ) -> enroll_pb.RevokeEnrollmentTokenResponse:
        token_id = validation.name_id(request.name, "enrollmentTokens", validation.TOKEN_ID, "name")
        validation.request_id(request.request_id)
        async with self.r.sessions() as session, session.begin():
            row = await session.get(store.EnrollmentToken, token_id, with_for_update=True)
            if row is None:
                raise not_found("EnrollmentToken", request.name)
            if row.revoke_time is None:
                row.revoke_time = now()
                await activity_log.append(
                    session, "enrollment_token.revoked", resource=request.name, summary="enrollment token revoked",
                    peer=peer_of(context),
                )  # fmt: skip
            workers = await self._workers_of(session, [token_id])
            answer = enroll_pb.RevokeEnrollmentTokenResponse(
                enrollment_token=convert.enrollment_pb(row, now(), workers.get(token_id, []))
            )
        await self.r.feeds.publish(ACTIVITY_FEED)
        return answer

    async def EnrollAgent(
        self, request: enroll_pb.EnrollAgentRequest, context: Context
    ) -> enroll_pb.EnrollAgentResponse:
        bad = []
        if not request.token:
            bad.append(("token", "required"))
        if request.worker_id and not validation.WORKER_ID.fullmatch(request.worker_id):
            bad.append(("worker_id", "1–63 lower case letters, digits or hyphens"))
        if not request.hostname or len(request.hostname) > 253 or any(ord(c) < 33 for c in request.hostname):
            bad.append(("hostname", "required: the machine's hostname, at most 253 characters"))
        for field, value in (("agent_version", request.agent_version), ("platform", request.platform)):
            if len(value) > 100:
                bad.append((field, "at most 100 characters"))
        if len(request.tools) > 64:
            bad.append(("tools", "at most 64 tools"))
        if bad:
            raise invalid_argument(bad)
        display = validation.display_name(request.display_name, "display_name")
        validation.request_id(request.request_id)
        worker_id = request.worker_id or _worker_id_from(request.hostname)
        moment = now()
        async with self.r.sessions() as session, session.begin():
            token = await session.scalar(
                select(store.EnrollmentToken)
                .where(store.EnrollmentToken.secret_hash == secret_hash(request.token))
                .with_for_update()
            )
            if token is None:
                raise unauthenticated("invalid enrollment token", "ENROLLMENT_INVALID")
            credential = credentials.derived_secret(
                AGENT_CREDENTIAL_PREFIX, request.token, "enroll", request.request_id
            )
            if request.request_id:
                earlier = await session.scalar(
                    select(store.Worker).where(
                        store.Worker.enrollment_token_id == token.id,
                        store.Worker.enroll_request_id == request.request_id,
                    )
                )
                if earlier is not None:
                    fresh = (moment - earlier.create_time).total_seconds() < credentials.RETRY_WINDOW_S
                    if fresh and earlier.credential_hash == secret_hash(credential) and earlier.revoke_time is None:
                        return enroll_pb.EnrollAgentResponse(
                            worker=convert.worker_pb(earlier, None), agent_credential=credential
                        )
                    raise unauthenticated("invalid enrollment token", "ENROLLMENT_INVALID")
            state = credentials.token_state(
                moment, token.revoke_time, token.expire_time, token.use_count, token.max_uses
            )
            if state != TokenState.ACTIVE:
                raise unauthenticated("invalid enrollment token", "ENROLLMENT_INVALID")
            if await session.get(store.Worker, worker_id) is not None:
                raise already_exists("Worker", f"workers/{worker_id}")
            token.use_count += 1
            row = store.Worker(
                id=worker_id, display_name=display or request.hostname, hostname=request.hostname,
                agent_version=request.agent_version, platform=request.platform, tools=convert.tools_json(request.tools),
                labels=dict(token.labels), agent_labels={}, privacy_level=token.privacy_level, capacity_slots=0,
                declared_slots=0, draining=False, disabled=False, deleted=False,
                credential_hash=secret_hash(credential),
                enrollment_token_id=token.id, enroll_request_id=request.request_id or None, tool_stats=[],
                heartbeat_interval_ms=0, session_id="", create_time=moment, update_time=moment, revoke_time=None,
                connect_time=None, last_heartbeat_time=None, version=1,
            )  # fmt: skip
            session.add(row)
            await session.flush()
            await activity_log.worker_event(session, row, presence.EventType.ADDED)
            await activity_log.append(
                session, "worker.enrolled", resource=f"workers/{worker_id}", worker=f"workers/{worker_id}",
                summary=f"worker {worker_id} enrolled", details={"enrollment_token": f"enrollmentTokens/{token.id}"},
                peer=peer_of(context), actor=Principal(PrincipalKind.AGENT, f"workers/{worker_id}"), api_token="",
            )  # fmt: skip
            answer = enroll_pb.EnrollAgentResponse(worker=convert.worker_pb(row, None), agent_credential=credential)
        await self.r.feeds.publish(ACTIVITY_FEED, WORKER_FEED)
        return answer


def _worker_id_from(hostname: str) -> str:
    base = "".join(c if c.isalnum() else "-" for c in hostname.lower().split(".")[0]).strip("-")
    base = "-".join(part for part in base.split("-") if part)[:63] or "worker"
    return base if validation.WORKER_ID.fullmatch(base) else "worker"


# -- WorkerService -----------------------------------------------------------------------------------------------------


def _worker_lookup(worker: res.Worker) -> Callable[[str], Any]:
    def get(field: str) -> Any:
        if field.startswith("labels."):
            return worker.labels.get(field.removeprefix("labels."))
        if field.startswith("effective_labels."):
            return worker.effective_labels.get(field.removeprefix("effective_labels."))
        if field == "tools.kind":
            return [t.kind for t in worker.tools]
        return getattr(worker, field)

    return get


class WorkerServicer(worker_grpc.WorkerServiceServicer):
    """The worker catalog."""

    def __init__(self, registry: Registry) -> None:
        self.r = registry

    async def _load(self, session: AsyncSession, name: str, field: str = "name", *, lock: bool = False) -> store.Worker:
        worker_id = validation.name_id(name, "workers", validation.WORKER_ID, field)
        row = await session.get(store.Worker, worker_id, with_for_update=lock)
        if row is None or row.deleted:
            raise not_found("Worker", name)
        return row

    async def _pb(self, row: store.Worker) -> res.Worker:
        found = await self.r.presence_store.reports([row.id])
        return convert.worker_pb(row, found.get(row.id))

    async def GetWorker(self, request: worker_pb.GetWorkerRequest, context: Context) -> worker_pb.GetWorkerResponse:
        async with self.r.sessions() as session:
            row = await self._load(session, request.name)
        return worker_pb.GetWorkerResponse(worker=await self._pb(row))

    async def ListWorkers(
        self, request: worker_pb.ListWorkersRequest, context: Context
    ) -> worker_pb.ListWorkersResponse:
        size = validation.page_size(request.page_size)
        tree = filtering.parse(request.filter, WORKER_FILTER)
        column, desc = validation.order_by(
            request.order_by,
            {"name": "name", "display_name": "display_name", "last_heartbeat_time": "last_heartbeat_time"},
            "name",
        )
        async with self.r.sessions() as session:
            sequence = await store.last_sequence(session, store.WorkerEvent)
            rows = (await session.scalars(select(store.Worker).where(store.Worker.deleted.is_(False)))).all()
        live = await self.r.presence_store.reports([r.id for r in rows])
        workers = [convert.worker_pb(r, live.get(r.id)) for r in rows]
        workers = [w for w in workers if filtering.matches(tree, _worker_lookup(w))]
        workers.sort(
            key=lambda w: (
                w.last_heartbeat_time.ToJsonString() if column == "last_heartbeat_time" else str(getattr(w, column)),
                w.name,
            ),
            reverse=desc,
        )
        page, token = _page(workers, size, request.page_token, f"{request.filter}|{request.order_by}")
        return worker_pb.ListWorkersResponse(workers=page, next_page_token=token, sequence=sequence)

    async def UpdateWorker(
        self, request: worker_pb.UpdateWorkerRequest, context: Context
    ) -> worker_pb.UpdateWorkerResponse:
        paths = _mask(
            list(request.update_mask.paths),
            {"display_name", "labels", "privacy_level", "draining", "disabled", "capacity_slots"},
            {f.name for f in res.Worker.DESCRIPTOR.fields}
            - {"display_name", "labels", "privacy_level", "draining", "disabled", "capacity_slots"},
        )
        spec = request.worker
        display = validation.display_name(spec.display_name, "worker.display_name")
        labels = validation.labels(spec.labels, "worker.labels") if "labels" in paths else {}
        if "privacy_level" in paths and spec.privacy_level not in (1, 2):
            raise invalid_argument([("worker.privacy_level", "PRIVACY_LEVEL_NORMAL or PRIVACY_LEVEL_SENSITIVE")])
        if "capacity_slots" in paths and not 0 <= spec.capacity_slots <= 1024:
            raise invalid_argument([("worker.capacity_slots", "between 0 and 1024")])
        validation.request_id(request.request_id)
        method = "UpdateWorker"
        cut = False
        async with self.r.sessions() as session, session.begin():
            first = await _recall(session, method, request.request_id, worker_pb.UpdateWorkerResponse)
            if first is not None:
                return first
            row = await self._load(session, spec.name, "worker.name", lock=True)
            _etag(spec.etag, row.version, "worker", spec.name)
            if "display_name" in paths:
                row.display_name = display
            if "labels" in paths:
                row.labels = labels
            if "privacy_level" in paths:
                row.privacy_level = spec.privacy_level
            if "draining" in paths:
                row.draining = spec.draining
            if "capacity_slots" in paths:
                row.capacity_slots = spec.capacity_slots
            if "disabled" in paths:
                cut = spec.disabled and not row.disabled
                row.disabled = spec.disabled
            row.version += 1
            row.update_time = now()
            live = await self.r.presence_store.reports([row.id])
            await activity_log.worker_event(session, row, presence.EventType.UPDATED, live.get(row.id))
            await activity_log.append(
                session, "worker.updated", resource=spec.name, worker=spec.name, summary=f"worker {row.id} updated",
                details={"fields": sorted(paths)}, peer=peer_of(context),
            )  # fmt: skip
            answer = worker_pb.UpdateWorkerResponse(worker=convert.worker_pb(row, live.get(row.id)))
            _keep(session, method, request.request_id, answer)
        if cut:
            await self.r.auth.revocations.publish([spec.name])
        await self.r.feeds.publish(ACTIVITY_FEED, WORKER_FEED)
        return answer

    async def DeleteWorker(
        self, request: worker_pb.DeleteWorkerRequest, context: Context
    ) -> worker_pb.DeleteWorkerResponse:
        worker_id = validation.name_id(request.name, "workers", validation.WORKER_ID, "name")
        validation.request_id(request.request_id)
        async with self.r.sessions() as session, session.begin():
            row = await session.get(store.Worker, worker_id, with_for_update=True)
            if row is None:
                raise not_found("Worker", request.name)
            if row.deleted:
                return worker_pb.DeleteWorkerResponse()
            _etag(request.etag, row.version, "worker", request.name)
            row.deleted = True
            row.credential_hash = None
            row.revoke_time = row.revoke_time or now()
            row.version += 1
            row.update_time = now()
            await activity_log.worker_event(session, row, presence.EventType.REMOVED)
            await activity_log.append(
                session, "worker.deleted", resource=request.name, worker=request.name,
                summary=f"worker {worker_id} deleted and its credential revoked", peer=peer_of(context),
            )  # fmt: skip
        await self.r.auth.revocations.publish([request.name])
        await self.r.feeds.publish(ACTIVITY_FEED, WORKER_FEED)
        return worker_pb.DeleteWorkerResponse()

    async def RevokeWorker(
        self, request: worker_pb.RevokeWorkerRequest, context: Context
    ) -> worker_pb.RevokeWorkerResponse:
        if len(request.reason) > 500:
            raise invalid_argument([("reason", "at most 500 characters")])
        validation.request_id(request.request_id)
        async with self.r.sessions() as session, session.begin():
            row = await self._load(session, request.name, lock=True)
            if row.revoke_time is None:
                row.revoke_time = now()
                row.version += 1
                row.update_time = now()
                await activity_log.worker_event(session, row, presence.EventType.UPDATED)
                await activity_log.append(
                    session, "worker.revoked", resource=request.name, worker=request.name,
                    level=res.ACTIVITY_LEVEL_WARNING, summary=f"worker {row.id} revoked",
                    details={"reason": request.reason}, peer=peer_of(context),
                )  # fmt: skip
            answer = worker_pb.RevokeWorkerResponse(worker=convert.worker_pb(row, None))
        await self.r.auth.revocations.publish([request.name])
        await self.r.feeds.publish(ACTIVITY_FEED, WORKER_FEED)
        return answer

    async def WatchWorkers(
        self, request: worker_pb.WatchWorkersRequest, context: Context
    ) -> AsyncIterator[worker_pb.WatchWorkersResponse]:
        if request.after_sequence < 0:
            raise invalid_argument([("after_sequence", "must not be negative")])
        tree = filtering.parse(request.filter, WORKER_FILTER)
        async with self.r.sessions() as session:
            head = await store.last_sequence(session, store.WorkerEvent)
            floor = await store.first_sequence(session, store.WorkerEvent)
            rows = (await session.scalars(select(store.Worker).where(store.Worker.deleted.is_(False)))).all()
        if request.after_sequence and floor and request.after_sequence < floor - 1:
            raise MawError(grpc.StatusCode.OUT_OF_RANGE, "after_sequence is older than the retained change log")
        live = await self.r.presence_store.reports([r.id for r in rows])
        matching = {
            f"workers/{r.id}"
            for r in rows
            if filtering.matches(tree, _worker_lookup(convert.worker_pb(r, live.get(r.id))))
        }
        last = request.after_sequence or head
        while True:
            async with self.r.sessions() as session:
                events = (
                    await session.scalars(
                        select(store.WorkerEvent)
                        .where(store.WorkerEvent.sequence > last)
                        .order_by(store.WorkerEvent.sequence)
                        .limit(500)
                    )
                ).all()
            out: list[worker_pb.WorkerEvent] = []
            for event in events:
                last = event.sequence
                snapshot = res.Worker.FromString(event.snapshot)
                kind = event.type
                if tree is not None:
                    was = snapshot.name in matching
                    now_matches = kind != presence.EventType.REMOVED and filtering.matches(
                        tree, _worker_lookup(snapshot)
                    )
                    if now_matches:
                        matching.add(snapshot.name)
                        kind = presence.EventType.ADDED if not was else kind
                    elif was:
                        matching.discard(snapshot.name)
                        kind, snapshot = presence.EventType.REMOVED, res.Worker(name=snapshot.name)
                    else:
                        continue
                out.append(
                    worker_pb.WorkerEvent(
                        sequence=event.sequence,
                        type=kind,  # type: ignore[arg-type]
                        worker=snapshot,
                        time=ts(event.time),
                    )
                )
            if out:
                yield worker_pb.WatchWorkersResponse(events=out)
            if len(events) < 500:
                await self.r.feeds.wait(WORKER_FEED, 1.0)


# -- internal: WorkerIntakeService, CredentialIntakeService, ActivityIntakeService ------------------------------


class WorkerIntakeServicer(wintake_grpc.WorkerIntakeServiceServicer):
    """Agent authentication and presence reports from the scheduler."""

    def __init__(self, registry: Registry) -> None:
        self.r = registry

    async def AuthenticateAgent(
        self, request: wintake_pb.AuthenticateAgentRequest, context: Context
    ) -> wintake_pb.AuthenticateAgentResponse:
        if not request.agent_credential:
            raise invalid_argument([("agent_credential", "required")])
        row = await verifier.verify_agent(self.r, request.agent_credential)
        found = await self.r.presence_store.reports([row.id])
        return wintake_pb.AuthenticateAgentResponse(worker=convert.worker_pb(row, found.get(row.id)))

    async def ReportWorkers(
        self, request: wintake_pb.ReportWorkersRequest, context: Context
    ) -> wintake_pb.ReportWorkersResponse:
        if len(request.reports) > MAX_BATCH:
            raise validation.too_many("reports", MAX_BATCH)
        ids = [
            validation.name_id(report.worker, "workers", validation.WORKER_ID, f"reports[{i}].worker")
            for i, report in enumerate(request.reports)
        ]
        out: list[res.Worker] = []
        changed_any = False
        async with self.r.sessions() as session, session.begin():
            rows = {
                r.id: r
                for r in (
                    await session.scalars(select(store.Worker).where(store.Worker.id.in_(ids)).with_for_update())
                ).all()
            }
            for worker_id, report in zip(ids, request.reports, strict=True):
                row = rows.get(worker_id)
                if row is None or row.deleted:
                    continue
                try:
                    applied, flipped = await self.r.presence_store.apply(worker_id, report)
                except Exception:  # Redis away: the durable fields still land; presence waits for Redis
                    applied, flipped = True, False
                durable = applied and _apply_durable(row, report)
                interval = report.heartbeat_interval.ToTimedelta().total_seconds() or presence.DEFAULT_HEARTBEAT_S
                if applied and report.HasField("last_heartbeat_time"):
                    self.r.heartbeats[worker_id] = convert.from_ts(report.last_heartbeat_time)
                live = report if report.connection_state == wintake_pb.CONNECTION_STATE_CONNECTED else None
                if durable or flipped or (applied and await self.r.presence_store.coalesced(worker_id, interval)):
                    if durable:
                        row.update_time = now()
                        row.version += 1
                    await activity_log.worker_event(session, row, presence.EventType.UPDATED, live)
                    changed_any = True
                out.append(
                    convert.worker_pb(
                        row, live if applied else (await self.r.presence_store.reports([worker_id])).get(worker_id)
                    )
                )
        if changed_any:
            await self.r.feeds.publish(WORKER_FEED)
        return wintake_pb.ReportWorkersResponse(workers=out)


def _apply_durable(row: store.Worker, report: wintake_pb.WorkerReport) -> bool:
    """Copy the catalog fields of a report; True when something durable changed."""
    values: dict[str, Any] = {
        "hostname": report.hostname or row.hostname,
        "agent_version": report.agent_version or row.agent_version,
        "platform": report.platform or row.platform,
        "tools": convert.tools_json(report.tools) if report.tools else row.tools,
        "agent_labels": dict(report.agent_labels),
        "declared_slots": report.declared_slots,
        "tool_stats": convert.stats_json(report.tool_stats) if report.tool_stats else row.tool_stats,
        "session_id": report.session_id,
        "heartbeat_interval_ms": int(report.heartbeat_interval.ToTimedelta().total_seconds() * 1000),
    }
    if report.HasField("connect_time"):
        values["connect_time"] = convert.from_ts(report.connect_time)
    changed = False
    for key, value in values.items():
        if getattr(row, key) != value:
            setattr(row, key, value)
            changed = True
    return changed


class CredentialIntakeServicer(cintake_grpc.CredentialIntakeServiceServicer):
    """API-token checks for the other services."""

    def __init__(self, registry: Registry) -> None:
        self.r = registry

    async def AuthenticateApiToken(
        self, request: cintake_pb.AuthenticateApiTokenRequest, context: Context
    ) -> cintake_pb.AuthenticateApiTokenResponse:
        if not request.secret:
            raise invalid_argument([("secret", "required")])
        auth, role = await verifier.verify_api_token(self.r, request.secret)
        return cintake_pb.AuthenticateApiTokenResponse(
            user=auth.principal.name,
            api_token=auth.api_token,
            role=role,  # type: ignore[arg-type]
            expire_time=ts(auth.expire_time),
        )


class ActivityIntakeServicer(aintake_grpc.ActivityIntakeServiceServicer):
    """Activity entries from the scheduler and the evaluator (idempotent by entry id)."""

    def __init__(self, registry: Registry) -> None:
        self.r = registry

    async def AppendActivity(
        self, request: aintake_pb.AppendActivityRequest, context: Context
    ) -> aintake_pb.AppendActivityResponse:
        caller = _caller().name.removeprefix("services/")
        if len(request.records) > MAX_BATCH:
            raise validation.too_many("records", MAX_BATCH)
        bad: list[tuple[str, str]] = []
        seen: set[str] = set()
        for i, record in enumerate(request.records):
            entry = record.entry
            if not record.entry_id or len(record.entry_id) > 200:
                bad.append((f"records[{i}].entry_id", "required, at most 200 characters"))
            if entry.service and entry.service != caller:
                bad.append((f"records[{i}].entry.service", f"must be the caller's ({caller})"))
            if (
                not entry.verb
                or len(entry.verb) > 100
                or not all(c.islower() or c in "._" or c.isdigit() for c in entry.verb)
            ):
                bad.append((f"records[{i}].entry.verb", "required: `<kind>.<verb>` in lower snake case"))
            if len(entry.summary) > 2000:
                bad.append((f"records[{i}].entry.summary", "at most 2000 characters"))
            for field in ("resource", "task", "subtask", "worker", "trace_id"):
                if len(getattr(entry, field)) > 300:
                    bad.append((f"records[{i}].entry.{field}", "at most 300 characters"))
            seen.add(record.entry_id)
        if bad:
            raise invalid_argument(bad[:50])
        from google.protobuf import json_format
        from sqlalchemy.dialects.postgresql import insert

        async with self.r.sessions() as session, session.begin():
            await store.lock_log(session, "activity")
            for record in request.records:
                entry = record.entry
                await session.execute(
                    insert(store.Activity)
                    .values(
                        entry_id=record.entry_id,
                        time=convert.from_ts(entry.time) if entry.HasField("time") else now(),
                        actor_kind=entry.actor.kind or res.ACTOR_KIND_SERVICE,
                        actor_name=entry.actor.name or caller,
                        actor_api_token=entry.actor.api_token,
                        actor_peer=entry.actor.peer,
                        verb=entry.verb,
                        resource=entry.resource,
                        task=entry.task,
                        subtask=entry.subtask,
                        worker=entry.worker,
                        level=entry.level or res.ACTIVITY_LEVEL_INFO,
                        summary=redact(entry.summary),
                        details=activity_log.scrub(json_format.MessageToDict(entry.details)),
                        service=caller,
                        trace_id=entry.trace_id,
                    )
                    .on_conflict_do_nothing(index_elements=["entry_id"])
                )
        await self.r.feeds.publish(ACTIVITY_FEED)
        return aintake_pb.AppendActivityResponse(entry_ids=[r.entry_id for r in request.records])


# -- ActivityService ---------------------------------------------------------------------------------------------


class ActivityServicer(activity_grpc.ActivityServiceServicer):
    """The activity log: list and watch."""

    def __init__(self, registry: Registry) -> None:
        self.r = registry

    async def ListActivity(
        self, request: activity_pb.ListActivityRequest, context: Context
    ) -> activity_pb.ListActivityResponse:
        size = validation.page_size(request.page_size)
        tree = filtering.parse(request.filter, ACTIVITY_FILTER)
        _, ascending_flag = validation.order_by(
            request.order_by or "sequence desc", {"sequence": "sequence"}, "sequence desc"
        )
        descending = ascending_flag
        query_key = f"{request.filter}|{request.order_by}"
        after = validation.page_token(request.page_token, query_key)
        condition = store.activity_condition(tree)
        async with self.r.sessions() as session:
            head = await store.last_sequence(session, store.Activity)
            query = select(store.Activity).where(condition, store.Activity.sequence <= head)
            if after:
                query = query.where(store.Activity.sequence < after if descending else store.Activity.sequence > after)
            order = store.Activity.sequence.desc() if descending else store.Activity.sequence.asc()
            rows = (await session.scalars(query.order_by(order).limit(size + 1))).all()
        entries = [convert.activity_pb(r) for r in rows[:size]]
        token = validation.next_page_token(rows[size - 1].sequence, query_key) if len(rows) > size else ""
        return activity_pb.ListActivityResponse(activity_entries=entries, next_page_token=token, sequence=head)

    async def WatchActivity(
        self, request: activity_pb.WatchActivityRequest, context: Context
    ) -> AsyncIterator[activity_pb.WatchActivityResponse]:
        if request.after_sequence < 0:
            raise invalid_argument([("after_sequence", "must not be negative")])
        tree = filtering.parse(request.filter, ACTIVITY_FILTER)
        condition = store.activity_condition(tree)
        async with self.r.sessions() as session:
            head = await store.last_sequence(session, store.Activity)
        last = request.after_sequence or head
        while True:
            async with self.r.sessions() as session:
                top = await store.last_sequence(session, store.Activity)
                rows = (
                    await session.scalars(
                        select(store.Activity)
                        .where(store.Activity.sequence > last, store.Activity.sequence <= top, condition)
                        .order_by(store.Activity.sequence)
                        .limit(500)
                    )
                ).all()
            if rows:
                yield activity_pb.WatchActivityResponse(activity_entries=[convert.activity_pb(r) for r in rows])
            if len(rows) == 500:
                last = rows[-1].sequence
                continue
            last = max(last, top)
            await self.r.feeds.wait(ACTIVITY_FEED, 1.0)
