"""The mesh as operators and browsers meet it: health, reflection, the gateway, hostile requests."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from deploy.local import Stack
from services.evaluator import DEFINITION as EVALUATOR
from services.registry import DEFINITION as REGISTRY
from services.runtime import migrate
from services.runtime.contracts import services_in
from services.scheduler import DEFINITION as SCHEDULER
from tests import grpcweb

DEFINITIONS = {d.name: d for d in (REGISTRY, SCHEDULER, EVALUATOR)}
SERVING = health_pb2.HealthCheckResponse.SERVING


def _maw_services(name: str) -> list[str]:
    return [c.full_name for pkg in DEFINITIONS[name].proto_packages for c in services_in(pkg)]


def _grpcurl(*args: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("grpcurl") or str(__import__("pathlib").Path(sys.executable).parent / "grpcurl")
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("name", sorted(DEFINITIONS))
async def test_each_service_reports_serving_for_itself_and_each_of_its_services(
    channels: dict[str, grpc.aio.Channel], name: str
) -> None:
    stub = health_pb2_grpc.HealthStub(channels[name])
    for service in ["", *_maw_services(name)]:
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert reply.status == SERVING, service


async def test_health_of_an_unknown_service_name_is_not_found(channels: dict[str, grpc.aio.Channel]) -> None:
    stub = health_pb2_grpc.HealthStub(channels["registry"])
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.Check(health_pb2.HealthCheckRequest(service="maw.nope.v1.Nothing"), timeout=5)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("name", sorted(DEFINITIONS))
async def test_health_is_serving_through_the_gateway(channels: dict[str, grpc.aio.Channel], name: str) -> None:
    stub = health_pb2_grpc.HealthStub(channels["gateway"])
    service = _maw_services(name)[0]
    reply = await stub.Check(
        health_pb2.HealthCheckRequest(service=service), metadata=(("x-maw-service", name),), timeout=5
    )
    assert reply.status == SERVING


@pytest.mark.parametrize("name", sorted(DEFINITIONS))
def test_grpcurl_lists_the_maw_services_by_reflection(stack: Stack, name: str) -> None:
    result = _grpcurl("-plaintext", f"127.0.0.1:{stack.ports.service(name)}", "list")
    assert result.returncode == 0, result.stderr
    listed = set(result.stdout.split())
    assert set(_maw_services(name)) <= listed
    assert "grpc.health.v1.Health" in listed


def test_grpcurl_describes_and_calls_health_through_the_gateway(stack: Stack) -> None:
    target = f"127.0.0.1:{stack.ports.gateway}"
    listed = _grpcurl("-plaintext", "-H", "x-maw-service: scheduler", target, "list")
    assert listed.returncode == 0, listed.stderr
    assert set(_maw_services("scheduler")) <= set(listed.stdout.split())
    described = _grpcurl("-plaintext", target, "describe", "grpc.health.v1.Health")
    assert "rpc Check" in described.stdout, described.stderr
    checked = _grpcurl("-plaintext", "-H", "x-maw-service: evaluator", target, "grpc.health.v1.Health/Check")
    assert json.loads(checked.stdout) == {"status": "SERVING"}, checked.stderr


def _health_frame(service: str = "") -> bytes:
    return grpcweb.frame(health_pb2.HealthCheckRequest(service=service).SerializeToString())


@pytest.mark.parametrize("name", sorted(DEFINITIONS))
def test_grpc_web_call_through_envoy_gets_the_answer(stack: Stack, name: str) -> None:
    reply = grpcweb.call(
        stack.ports.gateway,
        "/grpc.health.v1.Health/Check",
        _health_frame(_maw_services(name)[0]),
        headers={"x-maw-service": name},
    )
    assert reply.http_status == 200
    assert reply.headers["content-type"].startswith("application/grpc-web")
    assert reply.grpc_status == 0, reply.grpc_message
    assert [health_pb2.HealthCheckResponse.FromString(m).status for m in reply.messages] == [SERVING]


def _access_log_entries(stack: Stack, path: str) -> list[dict[str, str]]:
    log = stack.log_dir / "envoy-access.log"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        entries = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        hits = [e for e in entries if e.get("path") == path]
        if hits:
            return hits
        time.sleep(0.2)  # Envoy flushes its access log asynchronously
    return []


@pytest.mark.parametrize(
    ("package", "cluster"),
    [
        ("maw.registry.v1", "registry"),
        ("maw.scheduler.v1", "scheduler"),
        ("maw.agent.v1", "scheduler"),
        ("maw.evaluator.v1", "evaluator"),
    ],
)
def test_gateway_routes_each_package_to_its_service(stack: Stack, package: str, cluster: str) -> None:
    path = f"/{package}.RoutingProbe/Probe{int(time.time() * 1e6)}"
    reply = grpcweb.call(stack.ports.gateway, path, grpcweb.frame(b""))
    assert reply.grpc_status == grpc.StatusCode.UNIMPLEMENTED.value[0]
    assert [e["upstream"] for e in _access_log_entries(stack, path)] == [cluster]


def test_cors_preflight_allows_only_the_configured_origin(stack: Stack) -> None:
    import http.client

    def preflight(origin: str) -> dict[str, str]:
        conn = http.client.HTTPConnection("127.0.0.1", stack.ports.gateway, timeout=5)
        conn.request(
            "OPTIONS",
            "/grpc.health.v1.Health/Check",
            headers={
                "origin": origin,
                "access-control-request-method": "POST",
                "access-control-request-headers": "content-type,x-grpc-web",
            },
        )
        response = conn.getresponse()
        response.read()
        conn.close()
        return {k.lower(): v for k, v in response.getheaders()}

    allowed = f"http://localhost:{stack.ports.gateway}"
    assert preflight(allowed).get("access-control-allow-origin") == allowed
    assert "access-control-allow-origin" not in preflight("https://evil.example")


def _still_serving(stack: Stack) -> None:
    reply = grpcweb.call(stack.ports.gateway, "/grpc.health.v1.Health/Check", _health_frame())
    assert reply.grpc_status == 0
    assert all(child.alive() for child in stack.children.values())


def test_grpc_web_with_a_wrong_content_type_is_an_error_not_a_crash(stack: Stack) -> None:
    reply = grpcweb.call(
        stack.ports.gateway, "/grpc.health.v1.Health/Check", _health_frame(), content_type="text/plain"
    )
    assert reply.http_status >= 400 or (reply.grpc_status or 0) != 0
    _still_serving(stack)


def test_grpc_web_truncated_frame_gets_a_grpc_error(stack: Stack) -> None:
    # The server waits for the rest of the message until the call's deadline (docs/gateway.md).
    whole = _health_frame("maw.registry.v1.AuthService")
    reply = grpcweb.call(
        stack.ports.gateway, "/grpc.health.v1.Health/Check", whole[:-4], headers={"grpc-timeout": "1S"}
    )
    assert reply.grpc_status == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
    _still_serving(stack)


def test_grpc_web_garbage_payload_gets_a_grpc_error(stack: Stack) -> None:
    reply = grpcweb.call(stack.ports.gateway, "/grpc.health.v1.Health/Check", grpcweb.frame(b"\xff" * 64))
    assert reply.grpc_status == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "request" in reply.grpc_message
    _still_serving(stack)


def test_oversized_message_is_refused_with_resource_exhausted(stack: Stack) -> None:
    limit = 4 * 1024 * 1024
    with (
        grpc.insecure_channel(
            f"127.0.0.1:{stack.ports.registry}", options=[("grpc.max_send_message_length", 2 * limit)]
        ) as channel,
        pytest.raises(grpc.RpcError) as err,
    ):
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="x" * (limit + 1)), timeout=10)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_oversized_grpc_web_message_is_refused_without_a_crash(stack: Stack) -> None:
    reply = grpcweb.call(
        stack.ports.gateway, "/grpc.health.v1.Health/Check", _health_frame("x" * (5 * 1024 * 1024)), timeout=30
    )
    assert reply.http_status == 413 or reply.grpc_status == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    _still_serving(stack)


@pytest.mark.parametrize("name", sorted(DEFINITIONS))
def test_each_schema_is_migrated_to_its_head(stack: Stack, name: str) -> None:
    definition = DEFINITIONS[name]
    assert definition.migrations is not None
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(
        migrate.alembic_config(definition.migrations, stack.database_url, definition.schema)
    ).get_current_head()
    assert head is not None
    assert migrate.current_revision(definition.migrations, stack.database_url, definition.schema) == head


def test_rendered_envoy_config_is_valid(stack: Stack) -> None:
    config = stack.envoy_config()
    envoy = shutil.which("envoy") or str(__import__("pathlib").Path(sys.executable).parent / "envoy")
    result = subprocess.run([envoy, "--mode", "validate", "-c", str(config)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
