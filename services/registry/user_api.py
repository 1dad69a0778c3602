"""UserService: people, their roles and passwords."""

from __future__ import annotations

import asyncio

from maw.registry.v1 import user_service_pb2 as user_pb
from maw.registry.v1 import user_service_pb2_grpc as user_grpc
from sqlalchemy.exc import IntegrityError

from services.runtime import replay
from services.runtime.auth import (
    current_authentication,
)
from services.runtime.errors import (
    already_exists,
    failed_precondition,
    invalid_argument,
    not_found,
    permission_denied,
)

from . import activity_log, convert, credentials, filtering, filters, store, validation
from ._servicing import (
    Context,
    caller,
    caller_user_id,
    check_etag,
    is_admin,
    paged,
    peer_of,
    role_value,
    update_mask,
    user_id_of,
)
from .convert import now
from .credentials import Role
from .feeds import ACTIVITY_FEED
from .registry import Registry


class UserServicer(user_grpc.UserServiceServicer):
    """People and their roles."""

    def __init__(self, registry: Registry) -> None:
        self.r = registry

    async def CreateUser(self, request: user_pb.CreateUserRequest, context: Context) -> user_pb.CreateUserResponse:
        user_id = validation.user_id(request.user_id, "user_id")
        role = role_value(request.user.role, "user.role")
        display = validation.display_name(request.user.display_name, "user.display_name")
        email = validation.email(request.user.email, "user.email")
        password = validation.password(request.password, "password")
        validation.request_id(request.request_id)
        method = "CreateUser"
        async with self.r.sessions() as session:
            first = await replay.recall(session, method, caller().name, request.request_id, user_pb.CreateUserResponse)
            if first is not None:
                return first
        hashed = await asyncio.to_thread(credentials.hash_password, password)
        moment = now()
        try:
            async with self.r.sessions() as session, session.begin():
                if await session.get(store.User, user_id) is not None:
                    raise already_exists("User", f"users/{user_id}")
                if email and await store.user_id_by_email(session, email):
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
                await replay.keep(session, method, caller().name, request.request_id, answer)
        except IntegrityError:
            raise already_exists("User", f"users/{user_id}") from None
        await self.r.feeds.publish(ACTIVITY_FEED)
        return answer

    async def GetUser(self, request: user_pb.GetUserRequest, context: Context) -> user_pb.GetUserResponse:
        user_id = user_id_of(request.name)
        async with self.r.sessions() as session:
            row = await session.get(store.User, user_id)
        if row is None:
            raise not_found("User", request.name)
        return user_pb.GetUserResponse(user=convert.user_pb(row))

    async def ListUsers(self, request: user_pb.ListUsersRequest, context: Context) -> user_pb.ListUsersResponse:
        size = validation.page_size(request.page_size)
        tree = filtering.parse(request.filter, filters.USERS)
        column, desc = validation.order_by(
            request.order_by, {"name": "name", "display_name": "display_name", "create_time": "create_time"}, "name"
        )
        async with self.r.sessions() as session:
            rows = await store.all_users(session)
        users = [convert.user_pb(r) for r in rows]
        users = [u for u in users if filtering.matches(tree, filters.user_lookup(u))]
        users.sort(key=lambda u: (str(getattr(u, column)) if column != "create_time" else u.create_time.ToDatetime(),
                                  u.name), reverse=desc)  # fmt: skip
        page, token = paged(users, size, request.page_token, f"{request.filter}|{request.order_by}")
        return user_pb.ListUsersResponse(users=page, next_page_token=token)

    async def UpdateUser(self, request: user_pb.UpdateUserRequest, context: Context) -> user_pb.UpdateUserResponse:
        me = caller()
        user_id = user_id_of(request.user.name, "user.name")
        paths = update_mask(
            list(request.update_mask.paths),
            {"display_name", "email", "role", "disabled"},
            {"name", "create_time", "update_time", "last_login_time", "etag"},
        )
        validation.request_id(request.request_id)
        if user_id != caller_user_id() and not is_admin(me):
            raise permission_denied("only admins may change other users", "NOT_OWNER")
        if paths & {"role", "disabled"} and not is_admin(me):
            raise permission_denied("only admins may change roles or disable users", "ADMIN_REQUIRED")
        display = validation.display_name(request.user.display_name, "user.display_name")
        email = validation.email(request.user.email, "user.email") if "email" in paths else None
        role = role_value(request.user.role, "user.role") if "role" in paths else 0
        method = "UpdateUser"
        revoke = False
        async with self.r.sessions() as session, session.begin():
            first = await replay.recall(session, method, caller().name, request.request_id, user_pb.UpdateUserResponse)
            if first is not None:
                return first
            row = await session.get(store.User, user_id, with_for_update=True)
            if row is None:
                raise not_found("User", request.user.name)
            check_etag(request.user.etag, row.version, "user", request.user.name)
            demotes = ("role" in paths and role < Role.ADMIN) or ("disabled" in paths and request.user.disabled)
            if (
                demotes
                and row.role == Role.ADMIN
                and not row.disabled
                and await store.active_admins(session, Role.ADMIN) <= 1
            ):
                raise failed_precondition("LAST_ADMIN", request.user.name, "cannot demote or disable the last admin")
            if email and email != row.email and await store.user_id_by_email(session, email):
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
            await replay.keep(session, method, caller().name, request.request_id, answer)
        if revoke:
            await self.r.auth.revocations.publish([f"users/{user_id}"])
        await self.r.feeds.publish(ACTIVITY_FEED)
        return answer

    async def DeleteUser(self, request: user_pb.DeleteUserRequest, context: Context) -> user_pb.DeleteUserResponse:
        user_id = validation.name_id(request.name, "users", validation.USER_ID, "name")
        validation.request_id(request.request_id)
        method = "DeleteUser"
        async with self.r.sessions() as session, session.begin():
            if (
                await replay.recall(session, method, caller().name, request.request_id, user_pb.DeleteUserResponse)
                is not None
            ):
                return user_pb.DeleteUserResponse()
            row = await session.get(store.User, user_id, with_for_update=True)
            if row is None:
                raise not_found("User", request.name)
            check_etag(request.etag, row.version, "user", request.name)
            if row.role == Role.ADMIN and not row.disabled and await store.active_admins(session, Role.ADMIN) <= 1:
                raise failed_precondition("LAST_ADMIN", request.name, "cannot delete the last admin")
            await session.delete(row)
            await activity_log.append(
                session, "user.deleted", resource=request.name, summary=f"user {user_id} deleted",
                peer=peer_of(context),
            )  # fmt: skip
            await replay.keep(session, method, caller().name, request.request_id, user_pb.DeleteUserResponse())
        await self.r.auth.revocations.publish([request.name])
        await self.r.feeds.publish(ACTIVITY_FEED)
        return user_pb.DeleteUserResponse()

    async def SetPassword(self, request: user_pb.SetPasswordRequest, context: Context) -> user_pb.SetPasswordResponse:
        me = caller()
        caller_id = caller_user_id()
        user_id = user_id_of(request.name)
        password = validation.password(request.new_password, "new_password")
        validation.request_id(request.request_id)
        own = user_id == caller_id
        if not own and not is_admin(me):
            raise permission_denied("only admins may set someone else's password", "NOT_OWNER")
        if own and not request.current_password:
            raise invalid_argument([("current_password", "required to change your own password")])
        method = "SetPassword"
        async with self.r.sessions() as session:
            if (
                await replay.recall(session, method, caller().name, request.request_id, user_pb.SetPasswordResponse)
                is not None
            ):
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
            families = await store.live_sessions(session, user_id)
            for family in families:
                if f"sessions/{family.id}" != keep:
                    family.revoke_time = now()
                    ended.append(f"sessions/{family.id}")
            await activity_log.append(
                session, "user.password_changed", resource=f"users/{user_id}", summary="password changed",
                details={"sessions_ended": len(ended)}, peer=peer_of(context),
            )  # fmt: skip
            await replay.keep(session, method, caller().name, request.request_id, user_pb.SetPasswordResponse())
        await self.r.auth.revocations.publish(ended)
        await self.r.feeds.publish(ACTIVITY_FEED)
        return user_pb.SetPasswordResponse()
