"""AuthService: login, refresh, logout, personal API tokens, WhoAmI."""

from __future__ import annotations

import asyncio
import secrets
import uuid
from datetime import timedelta
from typing import Any

from maw.registry.v1 import auth_service_pb2 as auth_pb
from maw.registry.v1 import auth_service_pb2_grpc as auth_grpc
from maw.registry.v1 import resources_pb2 as res

from services.runtime import replay
from services.runtime.auth import (
    API_TOKEN_PREFIX,
    REFRESH_TOKEN_PREFIX,
    current_authentication,
    new_secret,
    secret_hash,
)
from services.runtime.errors import (
    invalid_argument,
    not_found,
    permission_denied,
    resource_exhausted,
    unauthenticated,
)
from services.runtime.principal import Principal, PrincipalKind

from . import activity_log, convert, credentials, filtering, filters, store, validation
from ._servicing import (
    Context,
    acting_role,
    caller,
    caller_user_id,
    is_admin,
    paged,
    peer_host,
    peer_of,
    role_value,
    user_id_of,
)
from .convert import now, ts
from .credentials import Role
from .feeds import ACTIVITY_FEED
from .registry import Registry

PEER_LOGIN_FACTOR = 5


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
        user_id = caller_user_id()
        if not request.refresh_token and not request.all_sessions:
            raise invalid_argument([("refresh_token", "required unless all_sessions is true")])
        moment = now()
        ended: list[str] = []
        async with self.r.sessions() as session, session.begin():
            if request.all_sessions:
                families = list(await store.live_sessions(session, user_id))
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
        me = caller()
        caller_id = caller_user_id()
        owner_id = user_id_of(request.parent, "parent") if request.parent else caller_id
        if owner_id != caller_id and not is_admin(me):
            raise permission_denied("only admins may create tokens for someone else", "NOT_OWNER")
        spec = request.api_token
        role = role_value(spec.role, "api_token.role")
        display = validation.display_name(spec.display_name, "api_token.display_name")
        expiry = convert.from_ts(spec.expire_time) if spec.HasField("expire_time") else None
        if expiry is not None and expiry <= now():
            raise invalid_argument([("api_token.expire_time", "must be in the future")])
        validation.request_id(request.request_id)
        if role > acting_role(me):
            raise invalid_argument([("api_token.role", "may not exceed the role you act with")])
        method = "CreateApiToken"
        async with self.r.sessions() as session, session.begin():
            first = await replay.recall(
                session, method, caller().name, request.request_id, auth_pb.CreateApiTokenResponse
            )
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
            await replay.keep(
                session, method, caller().name, request.request_id, auth_pb.CreateApiTokenResponse(api_token=token_pb)
            )
        await self.r.feeds.publish(ACTIVITY_FEED)
        return auth_pb.CreateApiTokenResponse(api_token=token_pb, secret=secret)

    async def ListApiTokens(
        self, request: auth_pb.ListApiTokensRequest, context: Context
    ) -> auth_pb.ListApiTokensResponse:
        me = caller()
        caller_id = caller_user_id()
        parent = request.parent or f"users/{caller_id}"
        owner = None if parent == "users/-" else user_id_of(parent, "parent")
        if owner != caller_id and not is_admin(me):
            raise permission_denied("only admins may list someone else's tokens", "NOT_OWNER")
        size = validation.page_size(request.page_size)
        tree = filtering.parse(request.filter, filters.API_TOKENS)
        column, desc = validation.order_by(
            request.order_by, {"create_time": "create_time", "display_name": "display_name"}, "create_time desc"
        )
        async with self.r.sessions() as session:
            rows = await store.api_tokens(session, owner)
        moment = now()
        tokens = [convert.api_token_pb(r, moment) for r in rows]
        tokens = [t for t in tokens if filtering.matches(tree, filters.api_token_lookup(t))]
        tokens.sort(key=lambda t: _token_sort_key(t, column), reverse=desc)
        page, token = paged(tokens, size, request.page_token, f"{parent}|{request.filter}|{request.order_by}")
        return auth_pb.ListApiTokensResponse(api_tokens=page, next_page_token=token)

    async def RevokeApiToken(
        self, request: auth_pb.RevokeApiTokenRequest, context: Context
    ) -> auth_pb.RevokeApiTokenResponse:
        me = caller()
        caller_id = caller_user_id()
        owner_id, token_id = _api_token_name(request.name)
        validation.request_id(request.request_id)
        if owner_id != caller_id and not is_admin(me):
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
            role=acting_role(principal),  # type: ignore[arg-type]
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
