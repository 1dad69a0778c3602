"""Credential basics: secret prefixes, how a caller authenticated, the current call's authentication."""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from maw.registry.v1 import auth_service_pb2

from ..principal import ANONYMOUS, Principal, bind_principal, unbind_principal

# Prefixes, not secrets: they make maw's secrets recognisable (logs.redact masks them).
API_TOKEN_PREFIX = "maw_pat_"  # noqa: S105
AGENT_CREDENTIAL_PREFIX = "maw_agt_"
ENROLLMENT_TOKEN_PREFIX = "maw_enr_"  # noqa: S105
REFRESH_TOKEN_PREFIX = "maw_rft_"  # noqa: S105
SERVICE_CREDENTIAL_PREFIX = "maw_svc_"


class AuthMethod:
    """How a caller proved who it is: the values of ``maw.registry.v1.AuthMethod``."""

    NONE = auth_service_pb2.AUTH_METHOD_UNSPECIFIED
    ACCESS_TOKEN = auth_service_pb2.AUTH_METHOD_ACCESS_TOKEN
    API_TOKEN = auth_service_pb2.AUTH_METHOD_API_TOKEN
    AGENT_CREDENTIAL = auth_service_pb2.AUTH_METHOD_AGENT_CREDENTIAL
    SERVICE = auth_service_pb2.AUTH_METHOD_SERVICE


@dataclass(frozen=True)
class Authenticated:
    """The outcome of checking one credential."""

    principal: Principal
    method: int = AuthMethod.NONE
    expire_time: datetime | None = None
    api_token: str = ""


UNAUTHENTICATED_CALL = Authenticated(ANONYMOUS)
_current: contextvars.ContextVar[Authenticated] = contextvars.ContextVar("maw_auth", default=UNAUTHENTICATED_CALL)

AuthBinding = tuple[contextvars.Token[Principal], contextvars.Token[Authenticated]]


def current_authentication() -> Authenticated:
    """How the caller of the current RPC authenticated (method, expiry, API token used)."""
    return _current.get()


def bind_authentication(auth: Authenticated) -> AuthBinding:
    """Make ``auth`` (and its principal) current for the rest of this RPC; undo with :func:`unbind_authentication`."""
    return bind_principal(auth.principal), _current.set(auth)


def unbind_authentication(binding: AuthBinding) -> None:
    """Undo :func:`bind_authentication`."""
    # A stream finalised from another context cannot reset; the context dies with it anyway.
    with contextlib.suppress(ValueError):
        unbind_principal(binding[0])
        _current.reset(binding[1])


def new_secret(prefix: str) -> str:
    """A fresh opaque secret: ``prefix`` + 256 random bits in base64url."""
    return prefix + secrets.token_urlsafe(32)


def secret_hash(secret: str) -> str:
    """SHA-256 hex of an opaque secret. Secrets carry 256 random bits, so a fast hash suffices (no salt)."""
    return hashlib.sha256(secret.encode()).hexdigest()


def bearer(metadata: Iterable[tuple[str, str | bytes]] | None) -> str:
    """The credential of ``authorization: Bearer <credential>``, or ''."""
    for key, value in metadata or ():
        if key.lower() == "authorization":
            text = value.decode(errors="replace") if isinstance(value, bytes) else value
            scheme, _, credential = text.strip().partition(" ")
            if scheme.lower() == "bearer":
                return credential.strip()
    return ""
