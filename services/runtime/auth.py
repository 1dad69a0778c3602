"""Authentication for every maw service: one interceptor, four kinds of credential, instant revocation.

Every call but health and reflection carries ``authorization: Bearer <credential>``, one of:

- an **access token**: a short-lived EdDSA JWT the registry signs; every service verifies it locally with
  the public key and checks, in Redis, that neither its session nor its user was revoked after it was issued;
- a **personal API token** (``maw_pat_…``) or an **agent credential** (``maw_agt_…``): opaque secrets only the
  registry can check (it keeps their hashes). Other services ask the registry over an internal call and cache
  the answer for a few seconds;
- a **service credential** (``maw_svc_…``): each service has its own; every service knows the SHA-256 of each
  and checks it locally.

Revocation is published on the Redis channel :data:`REVOCATION_CHANNEL`; every process drops its cached
answers for the revoked credential at once and ends the open streams that authenticated with it
(PERMISSION_DENIED). A Redis key per revoked id backs the channel for processes that were not listening.

The authorisation rules live in :mod:`services.runtime.authz`; missing rule = denied. Rate limits are token
buckets in Redis per principal; when Redis is down they fail open (logged), so a Redis restart never locks
anyone out.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import hashlib
import hmac
import inspect
import json
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import grpc
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from redis.asyncio import Redis
from redis.exceptions import RedisError

from . import authz
from .config import ServiceSettings
from .errors import MawError, permission_denied, resource_exhausted, unauthenticated, unavailable
from .principal import ANONYMOUS, Principal, PrincipalKind, bind_principal, unbind_principal

_log = logging.getLogger("maw.auth")

REVOCATION_CHANNEL = "maw:revocations"
_REVOKED_KEY = "maw:revoked:"
_ISSUER = "maw-registry"
_AUDIENCE = "maw"

# Prefixes, not secrets: they make maw's secrets recognisable (logs.redact masks them).
API_TOKEN_PREFIX = "maw_pat_"  # noqa: S105
AGENT_CREDENTIAL_PREFIX = "maw_agt_"
ENROLLMENT_TOKEN_PREFIX = "maw_enr_"  # noqa: S105
REFRESH_TOKEN_PREFIX = "maw_rft_"  # noqa: S105
SERVICE_CREDENTIAL_PREFIX = "maw_svc_"


class AuthMethod:
    """How a caller proved who it is (mirrors ``maw.registry.v1.AuthMethod``)."""

    NONE = 0
    ACCESS_TOKEN = 1
    API_TOKEN = 2
    AGENT_CREDENTIAL = 3
    SERVICE = 4


@dataclass(frozen=True)
class Authenticated:
    """The outcome of checking one credential."""

    principal: Principal
    method: int = AuthMethod.NONE
    expire_time: datetime | None = None
    api_token: str = ""


UNAUTHENTICATED_CALL = Authenticated(ANONYMOUS)
_current: contextvars.ContextVar[Authenticated] = contextvars.ContextVar("maw_auth", default=UNAUTHENTICATED_CALL)


def current_authentication() -> Authenticated:
    """How the caller of the current RPC authenticated (method, expiry, API token used)."""
    return _current.get()


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


# -- access tokens -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AccessClaims:
    """What a verified access token says."""

    user: str
    role: str
    session: str
    issued_at: float
    expire_time: datetime


def generate_key_pair(private_path: Path, public_path: Path) -> None:
    """Write a new Ed25519 key pair as PEM (private key file mode 0600)."""
    key = Ed25519PrivateKey.generate()
    private_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    private_path.chmod(0o600)
    public_path.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )


class JwtCodec:
    """Signs (registry only) and verifies access tokens."""

    def __init__(self, public_key: Ed25519PublicKey | None, private_key: Ed25519PrivateKey | None = None) -> None:
        self._public = public_key
        self._private = private_key

    @classmethod
    def from_settings(cls, settings: ServiceSettings, *, signer: bool) -> JwtCodec:
        """Load the keys named by the settings; a signer without configured keys gets an ephemeral pair."""
        private: Ed25519PrivateKey | None = None
        public: Ed25519PublicKey | None = None
        if signer and settings.jwt_private_key_file:
            loaded = serialization.load_pem_private_key(Path(settings.jwt_private_key_file).read_bytes(), None)
            if not isinstance(loaded, Ed25519PrivateKey):
                raise ValueError("MAW_JWT_PRIVATE_KEY_FILE must hold an Ed25519 key")
            private = loaded
        if settings.jwt_public_key_file:
            pub = serialization.load_pem_public_key(Path(settings.jwt_public_key_file).read_bytes())
            if not isinstance(pub, Ed25519PublicKey):
                raise ValueError("MAW_JWT_PUBLIC_KEY_FILE must hold an Ed25519 key")
            public = pub
        if signer and private is None:
            _log.warning("no MAW_JWT_PRIVATE_KEY_FILE: signing with an ephemeral key only this process trusts")
            private = Ed25519PrivateKey.generate()
        if private is not None and public is None:
            public = private.public_key()
        if public is None:
            _log.warning("no MAW_JWT_PUBLIC_KEY_FILE: access tokens cannot be verified here")
        return cls(public, private)

    def issue(self, user: str, role: str, session: str, ttl_s: int) -> tuple[str, datetime]:
        """A signed access token for ``user`` acting as ``role`` in ``session``; returns it and its expiry."""
        if self._private is None:
            raise RuntimeError("this process holds no signing key")
        now = time.time()
        expires = int(now) + ttl_s
        claims = {
            "iss": _ISSUER,
            "aud": _AUDIENCE,
            "sub": user,
            "role": role,
            "sid": session,
            "iat": int(now),
            "t": now,
            "exp": expires,
            "jti": uuid.uuid4().hex,
        }
        return jwt.encode(claims, self._private, algorithm="EdDSA"), datetime.fromtimestamp(expires, UTC)

    def verify(self, token: str) -> AccessClaims:
        """The claims of a valid token; UNAUTHENTICATED for a bad signature, wrong audience or expiry."""
        if self._public is None:
            raise unauthenticated("access tokens cannot be verified by this service", "NO_VERIFICATION_KEY")
        try:
            claims = jwt.decode(
                token,
                self._public,
                algorithms=["EdDSA"],
                audience=_AUDIENCE,
                issuer=_ISSUER,
                options={"require": ["exp", "iat", "sub", "sid", "role"]},
            )
        except jwt.ExpiredSignatureError as exc:
            raise unauthenticated("access token expired; refresh it", "TOKEN_EXPIRED") from exc
        except jwt.PyJWTError as exc:
            raise unauthenticated("invalid access token", "TOKEN_INVALID") from exc
        return AccessClaims(
            user=str(claims["sub"]),
            role=str(claims["role"]),
            session=str(claims["sid"]),
            issued_at=float(claims.get("t", claims["iat"])),
            expire_time=datetime.fromtimestamp(int(claims["exp"]), UTC),
        )


# -- service credentials -------------------------------------------------------------------------------------


class ServiceCredentials:
    """Checks service credentials against the known hashes (``name:sha256hex,…``)."""

    def __init__(self, hashes: str) -> None:
        self._by_hash: dict[str, str] = {}
        for item in hashes.split(","):
            name, _, digest = item.strip().partition(":")
            if name and digest:
                self._by_hash[digest.strip().lower()] = name.strip()

    def check(self, secret: str) -> str | None:
        """The service whose credential ``secret`` is, or None."""
        digest = secret_hash(secret)
        found = None
        for known, name in self._by_hash.items():
            if hmac.compare_digest(known, digest):
                found = name
        return found


# -- opaque credentials (registry knows them) ---------------------------------------------------------------


class CredentialVerifier(Protocol):
    """Checks the opaque credentials only the registry can check."""

    async def api_token(self, secret: str) -> Authenticated:
        """The user an API token acts for; raises UNAUTHENTICATED when it is not valid."""
        ...

    async def agent(self, secret: str) -> Authenticated:
        """The worker an agent credential belongs to; UNAUTHENTICATED / PERMISSION_DENIED when not valid."""
        ...


_ROLE_NAMES = {1: "viewer", 2: "operator", 3: "admin"}


class RemoteVerifier:
    """Asks the registry (internal RPCs with this service's credential)."""

    def __init__(self, settings: ServiceSettings) -> None:
        self._settings = settings
        self._channel: grpc.aio.Channel | None = None

    def _open(self) -> grpc.aio.Channel:
        if self._channel is None:
            from .internal import internal_channel

            self._channel = internal_channel(self._settings, self._settings.registry_addr)
        return self._channel

    async def _call(self, call: Callable[[], Awaitable[Any]]) -> Any:
        try:
            return await call()
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
                raise unauthenticated(exc.details() or "invalid credential", "CREDENTIAL_INVALID") from exc
            if exc.code() == grpc.StatusCode.PERMISSION_DENIED:
                raise permission_denied(exc.details() or "credential refused", "CREDENTIAL_REVOKED") from exc
            _log.warning("registry could not check a credential: %s", exc.code().name)
            raise unavailable("the registry cannot check credentials right now", 1.0) from exc

    async def api_token(self, secret: str) -> Authenticated:
        from maw.registry.v1 import credential_intake_service_pb2 as pb
        from maw.registry.v1 import credential_intake_service_pb2_grpc as pb_grpc

        stub = pb_grpc.CredentialIntakeServiceStub(self._open())
        request = pb.AuthenticateApiTokenRequest(secret=secret)
        reply = await self._call(lambda: stub.AuthenticateApiToken(request, timeout=5))
        expire = reply.expire_time.ToDatetime(tzinfo=UTC) if reply.HasField("expire_time") else None
        principal = Principal(PrincipalKind.USER, reply.user, _ROLE_NAMES.get(reply.role, ""), reply.api_token)
        return Authenticated(principal, AuthMethod.API_TOKEN, expire, reply.api_token)

    async def agent(self, secret: str) -> Authenticated:
        from maw.registry.v1 import worker_intake_service_pb2 as pb
        from maw.registry.v1 import worker_intake_service_pb2_grpc as pb_grpc

        stub = pb_grpc.WorkerIntakeServiceStub(self._open())
        request = pb.AuthenticateAgentRequest(agent_credential=secret)
        reply = await self._call(lambda: stub.AuthenticateAgent(request, timeout=5))
        name = reply.worker.name
        return Authenticated(Principal(PrincipalKind.AGENT, name, "", name), AuthMethod.AGENT_CREDENTIAL)

    async def close(self) -> None:
        """Close the channel to the registry."""
        if self._channel is not None:
            await self._channel.close()


# -- revocation ----------------------------------------------------------------------------------------------


class Revocations:
    """Who was revoked when: published on Redis pub/sub, remembered in Redis keys, cached in process.

    Ids are principal or credential names: ``users/{user}``, ``sessions/{session}``,
    ``users/{user}/apiTokens/{token}``, ``workers/{worker}``. Listeners registered with :meth:`listen`
    (open streams, credential caches) hear every revocation that reaches this process.
    """

    _CACHE_TTL_S = 5.0
    _CACHE_MAX = 50_000

    def __init__(self, redis: Redis, key_ttl_s: int) -> None:
        self._redis = redis
        self._key_ttl_s = key_ttl_s
        self._known: dict[str, tuple[float | None, float]] = {}
        self._listeners: list[Callable[[Mapping[str, float]], None]] = []
        self._task: asyncio.Task[None] | None = None
        self._subscribed = asyncio.Event()
        self._warned_at = 0.0

    def listen(self, listener: Callable[[Mapping[str, float]], None]) -> None:
        """Call ``listener`` with ``{id: revoked_at}`` for every revocation heard."""
        self._listeners.append(listener)

    def apply(self, ids: Mapping[str, float]) -> None:
        """Record revocations heard (or made) by this process and tell the listeners."""
        now = time.monotonic()
        for rid, at in ids.items():
            self._known[rid] = (at, now)
        for listener in self._listeners:
            listener(ids)

    async def publish(self, ids: Iterable[str]) -> None:
        """Revoke ``ids`` now, in every process: Redis keys, then the channel, then this process."""
        at = time.time()
        revoked = {rid: at for rid in ids}
        if not revoked:
            return
        self.apply(revoked)
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for rid in revoked:
                    pipe.set(_REVOKED_KEY + rid, repr(at), ex=self._key_ttl_s)
                pipe.publish(REVOCATION_CHANNEL, json.dumps({"ids": revoked}))
                await pipe.execute()
        except (RedisError, OSError) as exc:
            # The durable state (PostgreSQL) already says revoked; only other processes' caches lag.
            _log.error("could not publish a revocation to Redis: %s", type(exc).__name__)

    async def revoked_at(self, ids: Iterable[str]) -> float | None:
        """The latest revocation time of any of ``ids``, or None."""
        now = time.monotonic()
        wanted = list(ids)
        missing = [rid for rid in wanted if rid not in self._known or now - self._known[rid][1] > self._CACHE_TTL_S]
        if missing:
            try:
                values = await self._redis.mget([_REVOKED_KEY + rid for rid in missing])
            except (RedisError, OSError) as exc:
                self._warn(exc)
                values = [None] * len(missing)
            if len(self._known) > self._CACHE_MAX:
                self._known.clear()
            for rid, value in zip(missing, values, strict=True):
                self._known[rid] = (float(value) if value is not None else None, now)
        times = [at for rid in wanted if (at := self._known.get(rid, (None, 0.0))[0]) is not None]
        return max(times) if times else None

    def _warn(self, exc: BaseException) -> None:
        if time.monotonic() - self._warned_at > 30:
            self._warned_at = time.monotonic()
            _log.warning("Redis unavailable for revocation checks (failing open): %s", type(exc).__name__)

    async def start(self) -> None:
        """Start listening on the revocation channel (waits briefly for the first subscription)."""
        self._task = asyncio.create_task(self._run(), name="maw-revocations")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._subscribed.wait(), timeout=5)

    async def stop(self) -> None:
        """Stop listening."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        backoff = 0.2
        while True:
            pubsub = self._redis.pubsub()
            try:
                await pubsub.subscribe(REVOCATION_CHANNEL)
                # Whatever was published while we were not listening: forget cached answers.
                self._known.clear()
                for listener in self._listeners:
                    listener({})
                self._subscribed.set()
                backoff = 0.2
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if message is None or message.get("type") != "message":
                        continue
                    try:
                        payload = json.loads(message["data"])
                        ids = {str(k): float(v) for k, v in payload["ids"].items()}
                    except (ValueError, KeyError, TypeError, AttributeError):
                        _log.warning("ignored a malformed revocation message")
                        continue
                    self.apply(ids)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis went away: retry with backoff, keep serving
                self._warn(exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]


# -- rate limits ---------------------------------------------------------------------------------------------

_BUCKET_SCRIPT = """
local now_parts = redis.call('TIME')
local now = tonumber(now_parts[1]) + tonumber(now_parts[2]) / 1000000
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local state = redis.call('HMGET', KEYS[1], 't', 'v')
local tokens = tonumber(state[2])
local stamp = tonumber(state[1])
if tokens == nil or stamp == nil then
  tokens = burst
  stamp = now
end
tokens = math.min(burst, tokens + math.max(0, now - stamp) * rate)
local need = math.max(cost, 1)
local wait = 0
if tokens >= need then
  tokens = tokens - cost
else
  wait = (need - tokens) / rate
end
redis.call('HSET', KEYS[1], 't', tostring(now), 'v', tostring(tokens))
redis.call('PEXPIRE', KEYS[1], math.ceil(burst / rate * 1000) + 1000)
return tostring(wait)
"""


class RateLimiter:
    """Token buckets in Redis, updated atomically by one Lua script; fails open when Redis is down."""

    def __init__(self, redis: Redis) -> None:
        self._script = redis.register_script(_BUCKET_SCRIPT)
        self._warned_at = 0.0

    async def take(self, key: str, rate_per_s: float, burst: int, cost: int = 1) -> float:
        """Take ``cost`` tokens from bucket ``key``; returns 0 when allowed, else seconds to wait.

        ``cost=0`` only checks that a token is left (used to count failures only).
        """
        try:
            wait = await self._script(keys=["maw:rl:" + key], args=[rate_per_s, burst, cost])
        except (RedisError, OSError) as exc:
            if time.monotonic() - self._warned_at > 30:
                self._warned_at = time.monotonic()
                _log.warning("rate limits off: Redis unavailable (%s)", type(exc).__name__)
            return 0.0
        return float(wait)


# -- the authenticator and its interceptor ------------------------------------------------------------------


@dataclass
class _Cached:
    auth: Authenticated
    until: float


@dataclass(eq=False)
class _StreamWatch:
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
        self._streams: dict[str, set[_StreamWatch]] = {}
        self.revocations.listen(self._on_revoked)

    async def start(self) -> None:
        """Start following revocations."""
        await self.revocations.start()

    async def stop(self) -> None:
        """Stop following revocations and close the channel to the registry."""
        await self.revocations.stop()
        if isinstance(self.verifier, RemoteVerifier):
            await self.verifier.close()

    def interceptor(self) -> grpc.aio.ServerInterceptor:
        """The server interceptor that authenticates and authorises every call."""
        return AuthInterceptor(self)

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

    def watch_stream(self, principal: Principal) -> _StreamWatch:
        """Register an open stream so a revocation of its principal or credential ends it."""
        ids = tuple({principal.name, principal.credential_id} - {""})
        watch = _StreamWatch(ids, asyncio.current_task())
        for rid in ids:
            self._streams.setdefault(rid, set()).add(watch)
        return watch

    def unwatch_stream(self, watch: _StreamWatch) -> None:
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


# -- the interceptor -----------------------------------------------------------------------------------------


def _bind(auth: Authenticated) -> tuple[contextvars.Token[Principal], contextvars.Token[Authenticated]]:
    return bind_principal(auth.principal), _current.set(auth)


def _unbind(tokens: tuple[contextvars.Token[Principal], contextvars.Token[Authenticated]]) -> None:
    # A stream finalised from another context cannot reset; the context dies with it anyway.
    with contextlib.suppress(ValueError):
        unbind_principal(tokens[0])
        _current.reset(tokens[1])


def _revoked_error() -> MawError:
    return permission_denied("credential revoked; the stream is closed", "CREDENTIAL_REVOKED")


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Authenticates every call but health/reflection, checks :mod:`authz`, binds the principal."""

    def __init__(self, authenticator: Authenticator) -> None:
        self._auth = authenticator

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method
        if handler is None or authz.is_open(method):
            return handler
        metadata = handler_call_details.invocation_metadata
        kwargs = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(self._unary(handler.unary_unary, method, metadata), **kwargs)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(self._unary(handler.stream_unary, method, metadata), **kwargs)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(self._stream(handler.unary_stream, method, metadata), **kwargs)
        assert handler.stream_stream is not None
        return grpc.stream_stream_rpc_method_handler(self._stream(handler.stream_stream, method, metadata), **kwargs)

    def _unary(self, behaviour: Callable[..., Awaitable[Any]], method: str, metadata: Any) -> Callable[..., Any]:
        async def handler(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            auth = await self._auth.admit(method, metadata)
            tokens = _bind(auth)
            try:
                return await behaviour(request, context)
            finally:
                _unbind(tokens)

        return handler

    def _stream(self, behaviour: Callable[..., Any], method: str, metadata: Any) -> Callable[..., Any]:
        authenticator = self._auth
        if not inspect.isasyncgenfunction(behaviour):

            async def plain(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                auth = await authenticator.admit(method, metadata)
                tokens = _bind(auth)
                watch = authenticator.watch_stream(auth.principal)
                watch.busy = True
                try:
                    return await behaviour(request, context)
                except asyncio.CancelledError:
                    if not watch.fired or watch.task is None:
                        raise
                    watch.task.uncancel()
                    raise _revoked_error() from None
                finally:
                    authenticator.unwatch_stream(watch)
                    _unbind(tokens)

            return plain

        async def streaming(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
            auth = await authenticator.admit(method, metadata)
            tokens = _bind(auth)
            watch = authenticator.watch_stream(auth.principal)
            try:
                async for item in _until_revoked(behaviour(request, context), watch):
                    yield item
            finally:
                authenticator.unwatch_stream(watch)
                _unbind(tokens)

        return streaming


async def _until_revoked(inner: AsyncIterator[Any], watch: _StreamWatch) -> AsyncIterator[Any]:
    """Relay ``inner``'s items until it ends or ``watch`` fires (then PERMISSION_DENIED).

    The servicer runs in the call's own task (its context variables and ``current_task()`` stay its own); a
    revocation cancels that task only while the servicer is working, and otherwise stops the stream before
    the next step, so the cancellation is never mistaken for the client going away.
    """
    try:
        while True:
            if watch.fired:
                raise _revoked_error()
            watch.busy = True
            try:
                item = await inner.__anext__()
            except StopAsyncIteration:
                return
            except asyncio.CancelledError:
                if not watch.fired or watch.task is None:
                    raise
                watch.task.uncancel()
                raise _revoked_error() from None
            finally:
                watch.busy = False
            yield item
    finally:
        aclose: Callable[[], Awaitable[object]] | None = getattr(inner, "aclose", None)
        if aclose is not None:
            with contextlib.suppress(Exception):
                await aclose()


__all__ = [
    "AGENT_CREDENTIAL_PREFIX",
    "API_TOKEN_PREFIX",
    "ENROLLMENT_TOKEN_PREFIX",
    "REFRESH_TOKEN_PREFIX",
    "REVOCATION_CHANNEL",
    "SERVICE_CREDENTIAL_PREFIX",
    "AccessClaims",
    "AuthInterceptor",
    "AuthMethod",
    "Authenticated",
    "Authenticator",
    "CredentialVerifier",
    "JwtCodec",
    "RateLimiter",
    "RemoteVerifier",
    "Revocations",
    "ServiceCredentials",
    "bearer",
    "current_authentication",
    "generate_key_pair",
    "new_secret",
    "secret_hash",
]
