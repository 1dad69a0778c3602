"""Pure rules about credentials: roles, token states, deterministic retry secrets, password hashing.

Secrets are 256 random bits with a recognisable prefix (``maw_pat_``, ``maw_rft_``, ``maw_enr_``,
``maw_agt_``); the registry stores only their SHA-256 (see services.runtime.auth.secret_hash). Passwords are
low-entropy, so they get argon2id (argon2-cffi's defaults).

A retried RefreshToken or EnrollAgent (same ``request_id``) must return the same secret as the first call,
yet the secret is never stored. So the new secret is derived, not drawn: HMAC-SHA256 keyed with the secret
the caller presented (the old refresh token, the enrollment token), over the purpose and the request id.
Only a caller who holds the presented secret *and* the request id can re-derive it, and the registry
accepts the retry only while the first answer is young (see :data:`RETRY_WINDOW_S`).
"""

from __future__ import annotations

import base64
import enum
import hashlib
import hmac
from datetime import datetime

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from services.runtime.auth import new_secret

RETRY_WINDOW_S = 300.0
_HASHER = PasswordHasher()
# Compared against when the user does not exist, so a wrong name costs as much time as a wrong password.
_DUMMY_HASH = _HASHER.hash("maw-no-such-user-dummy-password")


class Role(enum.IntEnum):
    """``maw.registry.v1.Role`` values."""

    VIEWER = 1
    OPERATOR = 2
    ADMIN = 3

    @property
    def label(self) -> str:
        """The name principals carry (``viewer``, ``operator``, ``admin``)."""
        return self.name.lower()


class TokenState(enum.IntEnum):
    """``maw.registry.v1.TokenState`` values."""

    ACTIVE = 1
    EXPIRED = 2
    REVOKED = 3
    EXHAUSTED = 4


def effective_role(token_role: int, owner_role: int) -> Role:
    """An API token acts with the lower of its own role and its owner's current role."""
    return Role(min(token_role, owner_role))


def token_state(
    now: datetime,
    revoke_time: datetime | None,
    expire_time: datetime | None,
    use_count: int = 0,
    max_uses: int = 0,
) -> TokenState:
    """Where a token stands now (revocation wins over expiry, expiry over exhaustion)."""
    if revoke_time is not None:
        return TokenState.REVOKED
    if expire_time is not None and expire_time <= now:
        return TokenState.EXPIRED
    if max_uses and use_count >= max_uses:
        return TokenState.EXHAUSTED
    return TokenState.ACTIVE


def derived_secret(prefix: str, presented_secret: str, purpose: str, request_id: str) -> str:
    """The secret a call with ``request_id`` returns; random when there is no request id."""
    if not request_id:
        return new_secret(prefix)
    mac = hmac.new(presented_secret.encode(), f"{purpose}\0{request_id}".encode(), hashlib.sha256).digest()
    return prefix + base64.urlsafe_b64encode(mac).decode().rstrip("=")


def secret_prefix(secret: str) -> str:
    """The first characters of a secret, shown to recognise it (the prefix plus 4 characters)."""
    return secret[:12]


def hash_password(password: str) -> str:
    """argon2id hash of ``password`` (slow on purpose: call it off the event loop)."""
    return _HASHER.hash(password)


def verify_password(stored_hash: str | None, password: str) -> bool:
    """Whether ``password`` matches; spends the same time when the user does not exist."""
    try:
        return _HASHER.verify(stored_hash or _DUMMY_HASH, password) and stored_hash is not None
    except (VerificationError, InvalidHashError):
        return False
