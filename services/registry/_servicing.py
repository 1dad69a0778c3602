"""What the registry's servicers share: who is calling, from where, and the checks of names, masks and pages."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any, TypeVar

import grpc
from google.protobuf.message import Message
from maw.registry.v1 import resources_pb2 as res

from services.runtime.errors import MawError, invalid_argument, permission_denied
from services.runtime.principal import Principal, PrincipalKind, current_principal

from . import validation
from .activity_log import peer_host as host_of

M = TypeVar("M", bound=Message)
Context = grpc.aio.ServicerContext[Any, Any]

_ROLE_PREFIX = res.Role.DESCRIPTOR.values_by_number[res.ROLE_UNSPECIFIED].name.removesuffix("UNSPECIFIED")
# Principals carry their role as a label (``viewer``, ``operator``, ``admin``).
ROLE_BY_LABEL = {v.name.removeprefix(_ROLE_PREFIX).lower(): v.number for v in res.Role.DESCRIPTOR.values if v.number}
MAX_BATCH = 1000


def peer_of(context: Context) -> str:
    """The caller's peer address (``ipv4:host:port``)."""
    peer: str = context.peer() or ""
    return peer


def peer_host(context: Context) -> str:
    """The caller's host, without the port (login limits per peer address)."""
    return host_of(peer_of(context))


def caller() -> Principal:
    """Who is calling."""
    return current_principal()


def caller_user_id() -> str:
    """The calling user's id; PERMISSION_DENIED for any other kind of caller."""
    principal = caller()
    if principal.kind != PrincipalKind.USER:
        raise permission_denied("only users may do this", "USER_REQUIRED")
    return principal.name.removeprefix("users/")


def is_admin(principal: Principal) -> bool:
    """Whether ``principal`` is a user acting as admin."""
    return principal.kind == PrincipalKind.USER and principal.role == "admin"


def acting_role(principal: Principal) -> int:
    """The ``Role`` ``principal`` acts with (ROLE_UNSPECIFIED when it has none)."""
    return ROLE_BY_LABEL.get(principal.role, res.ROLE_UNSPECIFIED)


def user_id_of(name: str, field: str = "name") -> str:
    """The user id of ``users/{user}`` (``users/me`` is the caller)."""
    if name == "users/me":
        return caller_user_id()
    return validation.name_id(name, "users", validation.USER_ID, field)


def role_value(value: int, field: str) -> int:
    """A Role given in a request; INVALID_ARGUMENT on ``field`` unless it names one."""
    if value == res.ROLE_UNSPECIFIED or value not in res.Role.values():
        raise invalid_argument([(field, "must be ROLE_VIEWER, ROLE_OPERATOR or ROLE_ADMIN")])
    return value


def paged(items: list[M], size: int, token: str, query: str) -> tuple[list[M], str]:
    """One page of an in-memory listing and the token of the next (empty at the end)."""
    start = validation.page_token(token, query)
    chunk = items[start : start + size]
    more = start + size < len(items)
    return chunk, validation.next_page_token(start + size, query) if more else ""


def update_mask(paths: list[str], allowed: Collection[str], output_only: Collection[str] = ()) -> set[str]:
    """The paths of an update mask; INVALID_ARGUMENT when empty or naming a field that cannot change."""
    if not paths:
        raise invalid_argument([("update_mask", "required: name the fields to change")])
    bad = [(f"update_mask.paths[{i}]", f"{p!r} cannot be updated") for i, p in enumerate(paths) if p not in allowed]
    if any(p in output_only for p in paths):
        bad = [(f"update_mask.paths[{i}]", f"{p!r} is output only") for i, p in enumerate(paths) if p in output_only]
    if bad:
        raise invalid_argument(bad)
    return set(paths)


def check_etag(given: str, version: int, kind: str, name: str) -> None:
    """ABORTED when the caller's etag is not the row's current version (an empty etag always passes)."""
    if given and given != str(version):
        raise MawError(grpc.StatusCode.ABORTED, f"{kind} {name} changed meanwhile (etag mismatch); read it again")
