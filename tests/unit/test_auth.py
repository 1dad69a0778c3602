"""The shared auth layer's pure parts: the authz table, credential parsing, JWTs, service credentials, stream cuts."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from services.runtime import authz
from services.runtime.auth import (
    JwtCodec,
    ServiceCredentials,
    StreamWatch,
    bearer,
    generate_key_pair,
    new_secret,
    secret_hash,
    until_revoked,
)
from services.runtime.config import ServiceSettings
from services.runtime.errors import MawError
from services.runtime.principal import Principal, PrincipalKind


def test_every_rpc_of_every_service_has_exactly_one_rule() -> None:
    assert authz.missing_rules() == []
    assert authz.stale_rules() == []


def test_an_rpc_without_a_rule_is_denied_to_everyone() -> None:
    assert authz.rule_for("maw.registry.v1.NewService/NewRpc") is None


def test_health_and_reflection_are_open_and_maw_rpcs_are_not() -> None:
    assert authz.is_open("/grpc.health.v1.Health/Check")
    assert authz.is_open("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo")
    assert not authz.is_open("/maw.registry.v1.AuthService/WhoAmI")


@pytest.mark.parametrize(
    ("method", "role", "allowed"),
    [
        ("maw.scheduler.v1.TaskService/ListTasks", "viewer", True),
        ("maw.scheduler.v1.TaskService/CreateTask", "viewer", False),
        ("maw.scheduler.v1.TaskService/CreateTask", "operator", True),
        ("maw.evaluator.v1.CheckpointService/DecideCheckpoint", "operator", True),
        ("maw.registry.v1.EnrollmentService/CreateEnrollmentToken", "operator", True),
        ("maw.registry.v1.UserService/CreateUser", "operator", False),
        ("maw.registry.v1.UserService/CreateUser", "admin", True),
        ("maw.registry.v1.WorkerIntakeService/ReportWorkers", "admin", False),
        ("maw.agent.v1.AgentService/Connect", "admin", False),
        ("maw.scheduler.v1.TaskService/ListTasks", "superuser", False),
    ],
)
def test_roles_are_ordered_viewer_operator_admin(method: str, role: str, allowed: bool) -> None:
    rule = authz.rule_for(method)
    assert rule is not None
    assert rule.allows(Principal(PrincipalKind.USER, "users/u", role)) is allowed


def test_agents_reach_only_their_stream_and_services_only_internal_and_read_rpcs() -> None:
    agent = Principal(PrincipalKind.AGENT, "workers/w")
    service = Principal(PrincipalKind.SERVICE, "services/scheduler")
    methods = authz.all_methods()
    rules = {m: authz.rule_for(m) for m in methods}
    assert [m for m, r in rules.items() if r and not r.public and r.allows(agent)] == [
        "maw.agent.v1.AgentService/Connect"
    ]
    internal = {m for m in methods if "Intake" in m or "VerdictService" in m}
    peers = [service, Principal(PrincipalKind.SERVICE, "services/evaluator")]
    # Each internal RPC admits a service (the judgement loop's two halves admit only their peer).
    assert internal and all(any(rules[m].allows(p) for p in peers) for m in internal)  # type: ignore[union-attr]
    for m in internal:
        assert not rules[m].allows(Principal(PrincipalKind.USER, "users/a", "admin"))  # type: ignore[union-attr]
    assert not rules["maw.scheduler.v1.TaskService/CreateTask"].allows(service)  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("metadata", "expected"),
    [
        ((("authorization", "Bearer abc"),), "abc"),
        ((("Authorization", "bearer  abc "),), "abc"),
        ((("authorization", b"Bearer abc"),), "abc"),
        ((("authorization", "Basic abc"),), ""),
        ((), ""),
        (None, ""),
    ],
)
def test_bearer_credentials_are_read_from_the_authorization_header(metadata: object, expected: str) -> None:
    assert bearer(metadata) == expected  # type: ignore[arg-type]


@pytest.fixture
def codec(tmp_path: Path) -> JwtCodec:
    generate_key_pair(tmp_path / "k.pem", tmp_path / "k.pub")
    assert (tmp_path / "k.pem").stat().st_mode & 0o077 == 0
    settings = ServiceSettings(
        jwt_private_key_file=str(tmp_path / "k.pem"), jwt_public_key_file=str(tmp_path / "k.pub")
    )
    return JwtCodec.from_settings(settings, signer=True)


def _reason(err: MawError) -> str:
    from google.rpc import error_details_pb2

    info = err.details[0]
    assert isinstance(info, error_details_pb2.ErrorInfo)
    return str(info.reason)


def test_an_access_token_round_trips_with_its_claims(codec: JwtCodec) -> None:
    token, expiry = codec.issue("users/ada", "operator", "s1", 60)
    claims = codec.verify(token)
    assert (claims.user, claims.role, claims.session, claims.expire_time) == ("users/ada", "operator", "s1", expiry)


def test_an_expired_access_token_is_unauthenticated(codec: JwtCodec) -> None:
    token, _ = codec.issue("users/ada", "operator", "s1", -5)
    with pytest.raises(MawError) as err:
        codec.verify(token)
    assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
    assert _reason(err.value) == "TOKEN_EXPIRED"


def test_a_tampered_or_foreign_access_token_is_unauthenticated(codec: JwtCodec, tmp_path: Path) -> None:
    token, _ = codec.issue("users/ada", "viewer", "s1", 60)
    header, payload, signature = token.split(".")
    flipped = signature[:-2] + ("A" if signature[-2] != "A" else "B") + signature[-1]
    generate_key_pair(tmp_path / "other.pem", tmp_path / "other.pub")
    other = JwtCodec.from_settings(ServiceSettings(jwt_private_key_file=str(tmp_path / "other.pem")), signer=True)
    foreign, _ = other.issue("users/ada", "admin", "s1", 60)
    for bad in (f"{header}.{payload}.{flipped}", foreign, "a.b.c"):
        with pytest.raises(MawError) as err:
            codec.verify(bad)
        assert err.value.code == grpc.StatusCode.UNAUTHENTICATED


def test_a_service_credential_is_known_only_by_its_hash() -> None:
    secret = new_secret("maw_svc_")
    credentials = ServiceCredentials(f"scheduler:{secret_hash(secret)}, evaluator:{'0' * 64}")
    assert credentials.check(secret) == "scheduler"
    assert credentials.check(secret + "x") is None
    assert ServiceCredentials("").check(secret) is None


async def _endless(closed: asyncio.Event, pause: float) -> AsyncIterator[int]:
    try:
        n = 0
        while True:
            yield n
            n += 1
            await asyncio.sleep(pause)
    finally:
        closed.set()


async def test_a_stream_revoked_between_messages_ends_with_permission_denied_and_is_closed() -> None:
    closed = asyncio.Event()
    watch = StreamWatch(("workers/w",), asyncio.current_task())
    seen: list[int] = []
    with pytest.raises(MawError) as err:
        async for item in until_revoked(_endless(closed, 0.0), watch):
            seen.append(item)
            if len(seen) == 3:
                watch.fire()
    assert err.value.code == grpc.StatusCode.PERMISSION_DENIED
    assert seen == [0, 1, 2]
    assert closed.is_set()


async def test_a_stream_revoked_while_its_servicer_waits_is_interrupted_at_once() -> None:
    closed = asyncio.Event()

    async def consume() -> list[int]:
        watch = StreamWatch(("workers/w",), asyncio.current_task())
        asyncio.get_running_loop().call_later(0.1, watch.fire)
        return [item async for item in until_revoked(_endless(closed, 30.0), watch)]

    started = asyncio.get_running_loop().time()
    with pytest.raises(MawError) as err:
        await consume()
    assert err.value.code == grpc.StatusCode.PERMISSION_DENIED
    assert asyncio.get_running_loop().time() - started < 5
    assert closed.is_set()


async def test_a_stream_that_ends_by_itself_ends_normally() -> None:
    async def three() -> AsyncIterator[int]:
        for n in range(3):
            yield n

    watch = StreamWatch(("workers/w",), asyncio.current_task())
    assert [i async for i in until_revoked(three(), watch)] == [0, 1, 2]
