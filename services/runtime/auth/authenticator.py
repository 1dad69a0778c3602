"""The per-process authenticator: checks credentials, caches opaque ones, applies revocations to open streams."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from redis.asyncio import Redis

from .. import authz
from ..config import ServiceSettings
from ..errors import permission_denied, resource_exhausted, unauthenticated
from ..principal import Principal, PrincipalKind
from .credentials import (
    AGENT_CREDENTIAL_PREFIX,
    API_TOKEN_PREFIX,
    SERVICE_CREDENTIAL_PREFIX,
    UNAUTHENTICATED_CALL,
    Authenticated,
    AuthMethod,
    bearer,
    secret_hash,
)
from .ratelimit import RateLimiter
from .revocation import Revocations
from .tokens import JwtCodec, ServiceCredentials
from .verifier import CredentialVerifier, RemoteVerifier


@dataclass
class _Cached:
    auth: Authenticated
    until: float


@dataclass(eq=False)
class StreamWatch:
    """An open stream that a revocation of one of ``ids`` must end."""

    ids: tuple[str, ...]
    task: asyncio.Task[Any] | None
    fired: bool = False
    busy: bool = False

    def fire(self) -> None:
        """End the stream: interrupt the servicer if it is working, or stop before its next step."""
        if self.fired:
            return
        self.fired = True
        if self.busy and self.task is not None:
            self.task.cancel()


class Authenticator:
    """Everything a service needs to authenticate calls; one per process (``Resources.auth``)."""

    def __init__(self, service: str, settings: ServiceSettings, redis: Redis) -> None:
        self.service = service
        self.settings = settings
        self.jwt = JwtCodec.from_settings(settings, signer=service == "registry")
        self.services = ServiceCredentials(settings.service_credential_hashes)
        self.revocations = Revocations(redis, settings.access_token_ttl_s + 120)
        self.limiter = RateLimiter(redis)
        self.verifier: CredentialVerifier = RemoteVerifier(settings)
        self._cache: dict[str, _Cached] = {}
        self._streams: dict[str, set[StreamWatch]] = {}
        self.revocations.listen(self._on_revoked)

    async def start(self) -> None:
        """Start following revocations."""
        await self.revocations.start()

    async def stop(self) -> None:
        """Stop following revocations and close the channel to the registry."""
        await self.revocations.stop()
        if isinstance(self.verifier, RemoteVerifier):
            await self.verifier.close()

    # -- revocation effects

    def _on_revoked(self, ids: Mapping[str, float]) -> None:
        if not ids:
            self._cache.clear()
            return
        for key, cached in list(self._cache.items()):
            principal = cached.auth.principal
            if principal.name in ids or principal.credential_id in ids:
                self._cache.pop(key, None)
        for rid in ids:
            for watch in list(self._streams.get(rid, ())):
                watch.fire()

    def watch_stream(self, principal: Principal) -> StreamWatch:
        """Register an open stream so a revocation of its principal or credential ends it."""
        ids = tuple({principal.name, principal.credential_id} - {""})
        watch = StreamWatch(ids, asyncio.current_task())
        for rid in ids:
            self._streams.setdefault(rid, set()).add(watch)
        return watch

    def unwatch_stream(self, watch: StreamWatch) -> None:
        """Forget a stream that ended."""
        for rid in watch.ids:
            watchers = self._streams.get(rid)
            if watchers is not None:
                watchers.discard(watch)
                if not watchers:
                    del self._streams[rid]

    # -- checking credentials

    async def authenticate(self, credential: str) -> Authenticated:
        """Check ``credential``; UNAUTHENTICATED (or PERMISSION_DENIED for a revoked worker) when not valid."""
        if not credential:
            raise unauthenticated("missing credential: send `authorization: Bearer <token>`", "CREDENTIAL_MISSING")
        if credential.startswith(SERVICE_CREDENTIAL_PREFIX):
            name = self.services.check(credential)
            if name is None:
                raise unauthenticated("invalid service credential", "CREDENTIAL_INVALID")
            return Authenticated(
                Principal(PrincipalKind.SERVICE, f"services/{name}", "", f"services/{name}"), AuthMethod.SERVICE
            )
        if credential.startswith((API_TOKEN_PREFIX, AGENT_CREDENTIAL_PREFIX)):
            return await self._opaque(credential)
        if credential.count(".") == 2:
            claims = self.jwt.verify(credential)
            revoked = await self.revocations.revoked_at([claims.user, f"sessions/{claims.session}"])
            if revoked is not None and claims.issued_at <= revoked:
                raise unauthenticated("access token revoked; log in again", "TOKEN_REVOKED")
            principal = Principal(PrincipalKind.USER, claims.user, claims.role, f"sessions/{claims.session}")
            return Authenticated(principal, AuthMethod.ACCESS_TOKEN, claims.expire_time)
        raise unauthenticated("unrecognised credential", "CREDENTIAL_INVALID")

    async def _opaque(self, secret: str) -> Authenticated:
        key = secret_hash(secret)
        now = time.monotonic()
        cached = self._cache.get(key)
        if cached is not None and cached.until > now:
            expire = cached.auth.expire_time
            if expire is None or expire > datetime.now(UTC):
                return cached.auth
        if secret.startswith(API_TOKEN_PREFIX):
            auth = await self.verifier.api_token(secret)
        else:
            auth = await self.verifier.agent(secret)
        if len(self._cache) > 10_000:
            self._cache.clear()
        self._cache[key] = _Cached(auth, now + self.settings.credential_cache_ttl_s)
        return auth

    async def admit(self, method: str, metadata: Iterable[tuple[str, str | bytes]] | None) -> Authenticated:
        """Authenticate and authorise one call of ``method`` (``/package.Service/Method``)."""
        rule = authz.rule_for(method)
        if rule is not None and rule.public:
            return UNAUTHENTICATED_CALL
        auth = await self.authenticate(bearer(metadata))
        principal = auth.principal
        if rule is None or not rule.allows(principal):
            raise permission_denied(f"{principal.name} may not call {method.lstrip('/')}", "PERMISSION_DENIED")
        if principal.kind != PrincipalKind.SERVICE:
            wait = await self.limiter.take(
                principal.name, self.settings.rate_limit_per_s, self.settings.rate_limit_burst
            )
            if wait > 0:
                raise resource_exhausted(f"rate limit of {principal.name} reached", wait)
        return auth
