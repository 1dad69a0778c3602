"""Authentication for every maw service: one interceptor, four kinds of credential, instant revocation."""

from .authenticator import Authenticator, StreamWatch
from .credentials import (
    AGENT_CREDENTIAL_PREFIX,
    API_TOKEN_PREFIX,
    ENROLLMENT_TOKEN_PREFIX,
    REFRESH_TOKEN_PREFIX,
    SERVICE_CREDENTIAL_PREFIX,
    UNAUTHENTICATED_CALL,
    Authenticated,
    AuthMethod,
    bearer,
    current_authentication,
    new_secret,
    secret_hash,
)
from .interceptor import AuthInterceptor, until_revoked
from .ratelimit import RateLimiter
from .revocation import REVOCATION_CHANNEL, Revocations
from .tokens import AccessClaims, JwtCodec, ServiceCredentials, generate_key_pair
from .verifier import CredentialVerifier, RemoteVerifier

__all__ = [
    "AGENT_CREDENTIAL_PREFIX",
    "API_TOKEN_PREFIX",
    "ENROLLMENT_TOKEN_PREFIX",
    "REFRESH_TOKEN_PREFIX",
    "REVOCATION_CHANNEL",
    "SERVICE_CREDENTIAL_PREFIX",
    "UNAUTHENTICATED_CALL",
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
    "StreamWatch",
    "bearer",
    "current_authentication",
    "generate_key_pair",
    "new_secret",
    "secret_hash",
    "until_revoked",
]
