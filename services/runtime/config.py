"""Typed settings read from the environment, one object per process.

Every knob a service has is a field here with a default that works on a developer machine; nothing
deeper in the code reads the environment. Names are ``MAW_<FIELD>``, except the two connection URLs
that operators already know by their conventional names (``DATABASE_URL`` and ``REDIS_URL``).
"""

from __future__ import annotations

from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class ServiceSettings(BaseSettings):
    """What every maw service process needs to start."""

    model_config = SettingsConfigDict(env_prefix="MAW_", extra="ignore", frozen=True)

    host: str = Field("127.0.0.1", description="Interface the gRPC server binds to.")
    port: int = Field(0, ge=0, le=65535, description="Port of the gRPC server; 0 means the service default.")
    database_url: str = Field(
        "postgresql://maw@127.0.0.1:55432/maw",
        validation_alias=AliasChoices("DATABASE_URL", "MAW_DATABASE_URL"),
        description="PostgreSQL URL; each service uses only its own schema in it.",
    )
    redis_url: str = Field(
        "redis://127.0.0.1:56379/0",
        validation_alias=AliasChoices("REDIS_URL", "MAW_REDIS_URL"),
        description="Redis URL for ephemeral state, locks and pub/sub.",
    )
    log_level: str = Field("INFO", description="Root log level.")
    log_format: str = Field("auto", pattern="^(auto|json|text)$", description="json, text, or auto (text on a TTY).")
    max_message_bytes: int = Field(
        4 * 1024 * 1024, ge=1024, description="Largest gRPC message accepted or sent, in bytes."
    )
    shutdown_grace_s: float = Field(10.0, ge=0, description="Seconds in-flight RPCs get to finish on SIGTERM.")
    dependency_check_interval_s: float = Field(
        5.0, gt=0, description="How often health re-checks PostgreSQL and Redis."
    )
    migrate_on_start: bool = Field(True, description="Apply this service's Alembic migrations before serving.")
    db_pool_size: int = Field(10, ge=1, description="SQLAlchemy pool size per process.")
    otlp_endpoint: str = Field(
        "",
        validation_alias=AliasChoices("OTEL_EXPORTER_OTLP_ENDPOINT", "MAW_OTLP_ENDPOINT"),
        description="OTLP/gRPC collector for traces; empty exports nothing.",
    )
    # -- authentication (docs/security.md) ------------------------------------------------------------------
    jwt_public_key_file: str = Field("", description="PEM Ed25519 public key that verifies access tokens.")
    jwt_private_key_file: str = Field(
        "", description="PEM Ed25519 private key that signs access tokens (the registry only)."
    )
    access_token_ttl_s: int = Field(900, ge=10, le=86_400, description="Lifetime of an access token (JWT).")
    refresh_token_ttl_s: int = Field(7 * 86_400, ge=60, description="Lifetime of a refresh token.")
    service_credential: SecretStr = Field(
        SecretStr(""), description="This service's own credential for internal calls (maw_svc_...)."
    )
    service_credential_hashes: str = Field(
        "", description="SHA-256 hex of each service's credential: `registry:<hex>,scheduler:<hex>,...`."
    )
    registry_addr: str = Field("127.0.0.1:50051", description="Where the registry listens (internal calls).")
    scheduler_addr: str = Field("127.0.0.1:50052", description="Where the scheduler listens (internal calls).")
    evaluator_addr: str = Field("127.0.0.1:50053", description="Where the evaluator listens (internal calls).")
    admin_password: SecretStr = Field(
        SecretStr(""), description="Password of the first admin, created on the registry's first start."
    )
    credential_cache_ttl_s: float = Field(
        30.0, gt=0, description="How long a verified opaque credential is trusted without asking again."
    )
    rate_limit_per_s: float = Field(50.0, gt=0, description="Calls per second each principal may sustain.")
    rate_limit_burst: int = Field(200, ge=1, description="Calls a principal may make at once before waiting.")
    login_failures_per_min: float = Field(
        10.0, gt=0, description="Failed logins per minute allowed per user and per peer address."
    )
    login_failure_burst: int = Field(10, ge=1, description="Failed logins allowed at once per user and per peer.")
