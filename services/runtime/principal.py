"""Who is calling: the authenticated principal of the current RPC.

The auth interceptor (services.runtime.auth) authenticates every call and stores its principal here;
servicers read it with :func:`current_principal`. Keeping the type here, apart from the interceptor,
lets domain code depend on *who* without depending on *how* callers are authenticated.
"""

from __future__ import annotations

import contextvars
import enum
from dataclasses import dataclass


class PrincipalKind(enum.StrEnum):
    """The kinds of caller maw knows."""

    ANONYMOUS = "anonymous"
    USER = "user"
    AGENT = "agent"
    SERVICE = "service"


@dataclass(frozen=True)
class Principal:
    """An authenticated caller.

    ``name`` is a resource name: ``users/{user}``, ``workers/{worker}`` (agents) or
    ``services/{service}``; ``role`` is ``admin``, ``operator`` or ``viewer`` for users (and for API
    tokens, the token's scope), empty otherwise; ``credential_id`` names the token or credential used,
    so its revocation can be matched to open streams.
    """

    kind: PrincipalKind
    name: str
    role: str = ""
    credential_id: str = ""


ANONYMOUS = Principal(PrincipalKind.ANONYMOUS, "")

_current: contextvars.ContextVar[Principal] = contextvars.ContextVar("maw_principal", default=ANONYMOUS)


def current_principal() -> Principal:
    """The principal of the RPC being served (ANONYMOUS outside an authenticated call)."""
    return _current.get()


def bind_principal(principal: Principal) -> contextvars.Token[Principal]:
    """Make ``principal`` current for the rest of this RPC; returns a token for :func:`unbind_principal`."""
    return _current.set(principal)


def unbind_principal(token: contextvars.Token[Principal]) -> None:
    """Undo :func:`bind_principal`."""
    _current.reset(token)
