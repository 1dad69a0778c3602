"""Access tokens (EdDSA JWTs the registry signs, every service verifies) and service credentials."""

from __future__ import annotations

import hmac
import logging
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ..config import ServiceSettings
from ..errors import unauthenticated
from .credentials import secret_hash

_log = logging.getLogger("maw.auth")

_ISSUER = "maw-registry"
_AUDIENCE = "maw"


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
