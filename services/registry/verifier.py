"""Checking opaque credentials (API tokens, agent credentials) against the registry's own tables."""

from __future__ import annotations

from services.runtime.auth import Authenticated, AuthMethod, secret_hash
from services.runtime.errors import permission_denied, unauthenticated
from services.runtime.principal import Principal, PrincipalKind

from . import credentials, store
from .convert import now
from .registry import Registry


async def verify_api_token(registry: Registry, secret: str) -> tuple[Authenticated, int]:
    """The user an API token acts for; UNAUTHENTICATED when unknown, expired, revoked or disabled."""
    async with registry.sessions() as session:
        found = await store.api_token_by_hash(session, secret_hash(secret))
    moment = now()
    if found is None:
        raise unauthenticated("invalid API token", "CREDENTIAL_INVALID")
    token, user = found
    state = credentials.token_state(moment, token.revoke_time, token.expire_time)
    if state != credentials.TokenState.ACTIVE or user.disabled:
        raise unauthenticated("API token is not active", "CREDENTIAL_INVALID")
    registry.api_token_uses[token.id] = moment
    role = credentials.effective_role(token.role, user.role)
    name = f"users/{user.id}/apiTokens/{token.id}"
    principal = Principal(PrincipalKind.USER, f"users/{user.id}", role.label, name)
    return Authenticated(principal, AuthMethod.API_TOKEN, token.expire_time, name), int(role)


async def verify_agent(registry: Registry, secret: str) -> store.Worker:
    """The worker of an agent credential; UNAUTHENTICATED if unknown, PERMISSION_DENIED if refused."""
    async with registry.sessions() as session:
        row = await store.worker_by_credential(session, secret_hash(secret))
    if row is None:
        raise unauthenticated("invalid agent credential", "CREDENTIAL_INVALID")
    if row.revoke_time is not None or row.deleted:
        raise permission_denied(f"workers/{row.id} is revoked", "WORKER_REVOKED")
    if row.disabled:
        raise permission_denied(f"workers/{row.id} is disabled", "WORKER_DISABLED")
    return row


class LocalVerifier:
    """The registry's CredentialVerifier: its own tables, no network hop."""

    def __init__(self, registry: Registry) -> None:
        self._registry = registry

    async def api_token(self, secret: str) -> Authenticated:
        """The principal of an API token."""
        auth, _ = await verify_api_token(self._registry, secret)
        return auth

    async def agent(self, secret: str) -> Authenticated:
        """The principal of an agent credential."""
        row = await verify_agent(self._registry, secret)
        name = f"workers/{row.id}"
        return Authenticated(Principal(PrincipalKind.AGENT, name, "", name), AuthMethod.AGENT_CREDENTIAL)
