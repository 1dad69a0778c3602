"""deploy/: container images, compose for one host, Kubernetes manifests, and the gateway rendered for both.

Docker cannot build or run images on this machine, so these tests check what can be checked without it:
every file parses and matches its published schema (compose-spec, Kubernetes OpenAPI in strict mode),
everything the files name exists in the repository, the security and probe settings are there, and the
gateway config rendered for compose and Kubernetes passes `envoy --mode validate`.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from maw_agent.config import parse_config

from deploy import render_gateway
from deploy.docker import healthcheck
from services.evaluator import DEFINITION as EVALUATOR
from services.registry import DEFINITION as REGISTRY
from services.runtime.auth import SERVICE_CREDENTIAL_PREFIX, JwtCodec, ServiceCredentials
from services.runtime.config import ServiceSettings
from services.scheduler import DEFINITION as SCHEDULER

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
COMPOSE_FILE = DEPLOY / "compose" / "docker-compose.yml"
K8S = DEPLOY / "k8s"
DEFINITIONS = {d.name: d for d in (REGISTRY, SCHEDULER, EVALUATOR)}
K8S_VERSION = "1.30"  # the oldest Kubernetes the manifests promise (docs/deploy.md)
# Files under deploy/k8s that are not applied as resources by kustomization.yaml.
K8S_NOT_RESOURCES = {"kustomization.yaml", "envoy.yaml", "secret.example.yaml"}


def _bin(name: str) -> str:
    return shutil.which(name) or str(Path(sys.executable).parent / name)


def _load_all(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def _compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE_FILE.read_text())
    return data


def _k8s_docs() -> list[dict[str, Any]]:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    return [doc for name in kustomization["resources"] for doc in _load_all(K8S / name)]


def _of_kind(kind: str) -> dict[str, dict[str, Any]]:
    return {doc["metadata"]["name"]: doc for doc in _k8s_docs() if doc["kind"] == kind}


def _dockerfile_copies(dockerfile: Path) -> list[tuple[list[str], str]]:
    """(sources, destination) of every COPY that reads the build context (not another stage)."""
    copies = []
    for line in dockerfile.read_text().splitlines():
        words = line.split()
        if words[:1] == ["COPY"] and not any(w.startswith("--from") for w in words):
            args = [w for w in words[1:] if not w.startswith("--")]
            copies.append((args[:-1], args[-1]))
    return copies


def _final_user(dockerfile: Path) -> str:
    users = [line.split()[1] for line in dockerfile.read_text().splitlines() if line.startswith("USER ")]
    return users[-1] if users else "root"


# -- every file ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    sorted(p for p in DEPLOY.rglob("*") if p.suffix in {".yml", ".yaml"}),
    ids=lambda p: str(p.relative_to(DEPLOY)),
)
def test_every_deploy_yaml_file_parses(path: Path) -> None:
    assert _load_all(path), f"{path} holds no document"


# -- images ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.agent"])
def test_dockerfile_copies_only_paths_that_exist_and_runs_unprivileged(dockerfile: str) -> None:
    path = DEPLOY / "docker" / dockerfile
    copies = _dockerfile_copies(path)
    assert copies
    for sources, _ in copies:
        for source in sources:
            assert (ROOT / source).exists(), f"{dockerfile} copies {source}, which is not in the repository"
    user = _final_user(path)
    assert user.split(":")[0] not in {"root", "0"}, f"{dockerfile} runs as {user}"
    # BuildKit's per-Dockerfile ignore file keeps .venv, .git and data out of the build context, and
    # must not exclude what the Dockerfile copies.
    ignore = (DEPLOY / "docker" / f"{dockerfile}.dockerignore").read_text().splitlines()
    assert "**" in ignore
    for sources, _ in copies:
        for source in sources:
            assert any(line.startswith(f"!{source}") for line in ignore), f"{source} is excluded from the context"


def test_service_image_has_no_agent_and_agent_image_installs_only_from_agent_dir() -> None:
    service_sources = {s for sources, _ in _dockerfile_copies(DEPLOY / "docker" / "Dockerfile") for s in sources}
    assert "services" in service_sources
    assert not any(s.startswith("agent") for s in service_sources)
    agent_file = DEPLOY / "docker" / "Dockerfile.agent"
    agent_sources = {s for sources, _ in _dockerfile_copies(agent_file) for s in sources}
    assert not any(s.startswith(("services", "requirements/server")) for s in agent_sources)
    installs = [line for line in agent_file.read_text().splitlines() if "pip install" in line]
    assert installs and all(line.rstrip().endswith("./agent") for line in installs)
    assert (ROOT / "agent" / "pyproject.toml").exists()


# -- compose --------------------------------------------------------------------------------------------


def test_compose_file_matches_the_compose_specification() -> None:
    result = subprocess.run(
        [_bin("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(COMPOSE_FILE)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_builds_from_dockerfiles_and_runs_modules_that_exist() -> None:
    services = _compose()["services"]
    for name, service in services.items():
        if "build" in service:
            context = (COMPOSE_FILE.parent / service["build"]["context"]).resolve()
            assert context == ROOT, f"{name} builds from {context}"
            assert (context / service["build"]["dockerfile"]).is_file()
        else:
            assert re.fullmatch(r"(postgres|redis|envoyproxy/envoy):[\w.-]+", service["image"]), service["image"]
    for name in DEFINITIONS:
        command = services[name]["command"]
        assert command == ["python", "-m", f"services.{name}"]
        assert (ROOT / "services" / name / "__main__.py").is_file()
    # The healthcheck script the compose file runs is the one the image copies to that path.
    copies = dict((tuple(s), d) for s, d in _dockerfile_copies(DEPLOY / "docker" / "Dockerfile"))
    assert copies[("deploy/docker/healthcheck.py",)] == "/app/healthcheck.py"


def test_compose_service_ports_env_and_healthchecks_agree() -> None:
    services = _compose()["services"]
    for name, definition in DEFINITIONS.items():
        service = services[name]
        env = service["environment"]
        assert env["MAW_PORT"] == str(definition.default_port)
        assert env["MAW_HOST"] == "0.0.0.0"
        assert env["DATABASE_URL"].startswith("postgresql://") and "@postgres:5432/" in env["DATABASE_URL"]
        assert env["REDIS_URL"] == "redis://redis:6379/0"
        probe = ["CMD", "python", "/app/healthcheck.py", f"127.0.0.1:{env['MAW_PORT']}"]
        assert service["healthcheck"]["test"] == probe
        assert service["depends_on"]["postgres"]["condition"] == "service_healthy"
        assert service["depends_on"]["redis"]["condition"] == "service_healthy"
        assert service["read_only"] is True and service["cap_drop"] == ["ALL"]
        # Scaling a service (compose up --scale) needs it to publish no fixed host port.
        assert "ports" not in service
    for infra in ("postgres", "redis"):
        assert "healthcheck" in services[infra] and services[infra]["volumes"]
    # Only the private key's owner (the registry) gets it.
    holders = [name for name, s in services.items() if "jwt_private_key" in s.get("secrets", [])]
    assert holders == ["registry"]


def test_compose_mounted_files_exist() -> None:
    for service in _compose()["services"].values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (COMPOSE_FILE.parent / source).is_file(), f"{source} is mounted but missing"
    assert "secrets/" in (COMPOSE_FILE.parent / ".gitignore").read_text().split()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="make-secrets.sh needs openssl")
def test_make_secrets_creates_every_secret_compose_reads_in_the_form_the_services_accept(tmp_path: Path) -> None:
    compose = _compose()
    workdir = tmp_path / "compose"
    workdir.mkdir()
    shutil.copy(COMPOSE_FILE.parent / "make-secrets.sh", workdir)
    for _ in range(2):  # a second run keeps what the first made
        subprocess.run(["sh", str(workdir / "make-secrets.sh")], check=True, capture_output=True, timeout=60)
    secrets_dir = workdir / "secrets"
    assert secrets_dir.stat().st_mode & 0o077 == 0, "secrets/ must be private to its owner"
    for secret in compose["secrets"].values():
        assert (workdir / secret["file"]).is_file(), f"make-secrets.sh does not create {secret['file']}"
    codec = JwtCodec.from_settings(
        ServiceSettings(
            jwt_private_key_file=str(secrets_dir / "jwt-private.pem"),
            jwt_public_key_file=str(secrets_dir / "jwt-public.pem"),
        ),
        signer=True,
    )
    token, _ = codec.issue("users/admin", "admin", "sessions/1", 60)
    assert codec.verify(token).user == "users/admin"
    credentials = set()
    for name in DEFINITIONS:
        (env_file,) = compose["services"][name]["env_file"]
        lines = (workdir / env_file).read_text().splitlines()
        env = dict(line.split("=", 1) for line in lines)
        assert set(env) == {"MAW_SERVICE_CREDENTIAL", "MAW_SERVICE_CREDENTIAL_HASHES"}
        assert env["MAW_SERVICE_CREDENTIAL"].startswith(SERVICE_CREDENTIAL_PREFIX)
        # Every service recognises every service's credential, each as its own name.
        assert ServiceCredentials(env["MAW_SERVICE_CREDENTIAL_HASHES"]).check(env["MAW_SERVICE_CREDENTIAL"]) == name
        credentials.add(env["MAW_SERVICE_CREDENTIAL"])
    assert len(credentials) == len(DEFINITIONS)


def _compose_defaults(value: str) -> str:
    """Compose's interpolation of ``${NAME:-default}`` when NAME is unset (the operator set nothing)."""
    return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", value)


def test_compose_agent_config_is_valid_for_maw_agent() -> None:
    agent = _compose()["services"]["agent"]
    env = {name: _compose_defaults(value) for name, value in agent["environment"].items()}
    config = parse_config((COMPOSE_FILE.parent / "agent.yaml").read_text(), env=env, source="agent.yaml")
    assert config.server == "gateway:8080"
    assert config.worker == "workers/compose-agent-1"
    assert config.capacity_slots == 2
    assert str(config.credential_file) == "/run/secrets/agent_credential"
    assert "agent_credential" in agent["secrets"]


def test_compose_gateway_mounts_the_rendered_config() -> None:
    gateway = _compose()["services"]["gateway"]
    assert "./envoy.yaml:/etc/envoy/envoy.yaml:ro" in gateway["volumes"]
    assert gateway["command"][:3] == ["envoy", "-c", "/etc/envoy/envoy.yaml"]
    assert gateway["ports"] == ["${MAW_GATEWAY_PORT:-8080}:8080"]


class _HealthServer:
    def __init__(self) -> None:
        self.health = health.HealthServicer()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()


@pytest.fixture
def health_server() -> Iterator[_HealthServer]:
    server = _HealthServer()
    yield server
    server.server.stop(None)


def test_compose_healthcheck_passes_only_while_the_service_is_serving(health_server: _HealthServer) -> None:
    address = f"127.0.0.1:{health_server.port}"
    health_server.health.set("", health_pb2.HealthCheckResponse.SERVING)
    assert healthcheck.main([address]) == 0
    health_server.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    assert healthcheck.main([address]) == 1
    assert healthcheck.check(address) == f"{address}: NOT_SERVING"
    assert healthcheck.check(address, "maw.unknown.v1.Nothing") == f"{address}: NOT_FOUND"


def test_compose_healthcheck_fails_when_nothing_listens(health_server: _HealthServer) -> None:
    port = health_server.port
    health_server.server.stop(None).wait()
    assert healthcheck.check(f"127.0.0.1:{port}", timeout=1) == f"127.0.0.1:{port}: UNAVAILABLE"
    assert healthcheck.main([]) == 2


# -- gateway ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", sorted(render_gateway.TARGETS))
def test_committed_gateway_config_is_the_rendered_template(target: str) -> None:
    committed = render_gateway.TARGETS[target].output.read_text()
    assert committed == render_gateway.render(target), (
        f"{target} gateway config is stale: python -m deploy.render_gateway --target {target} --write"
    )


@pytest.mark.parametrize("target", sorted(render_gateway.TARGETS))
def test_rendered_gateway_config_passes_envoy_validation(target: str, tmp_path: Path) -> None:
    config = tmp_path / "envoy.yaml"
    config.write_text(render_gateway.render(target, "https://maw.example.com"))
    result = subprocess.run(
        [_bin("envoy"), "--mode", "validate", "-c", str(config)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def _clusters(target: str) -> dict[str, tuple[str, str, int]]:
    config = yaml.safe_load(render_gateway.render(target))
    out = {}
    for cluster in config["static_resources"]["clusters"]:
        (endpoint,) = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
        address = endpoint["endpoint"]["address"]["socket_address"]
        out[cluster["name"]] = (cluster["type"], address["address"], address["port_value"])
    return out


def test_compose_gateway_routes_to_compose_services_on_their_ports() -> None:
    services = _compose()["services"]
    for name, (kind, host, port) in _clusters("compose").items():
        assert kind == "STRICT_DNS"
        assert host in services
        assert services[host]["environment"]["MAW_PORT"] == str(port) == str(DEFINITIONS[name].default_port)


def test_k8s_gateway_routes_to_headless_services_of_ready_pods() -> None:
    services = _of_kind("Service")
    deployments = _of_kind("Deployment")
    for name, (kind, host, port) in _clusters("k8s").items():
        assert kind == "STRICT_DNS"
        service = services[host]
        assert service["spec"]["clusterIP"] == "None", f"{host} must be headless so Envoy sees every pod"
        assert [p["port"] for p in service["spec"]["ports"]] == [port]
        (container,) = deployments[name]["spec"]["template"]["spec"]["containers"]
        assert [p["containerPort"] for p in container["ports"]] == [port]


def test_render_gateway_cli_prints_config_with_the_given_cors_origins(capsys: pytest.CaptureFixture[str]) -> None:
    assert render_gateway.main(["--target", "k8s", "--cors-origins", "https://maw.example.com"]) == 0
    out = capsys.readouterr().out
    assert out == render_gateway.render("k8s", "https://maw.example.com")
    assert r"^(https://maw\.example\.com)$" in out
    assert "${" not in out
    with pytest.raises(SystemExit):
        render_gateway.main(["--target", "nomad"])


def test_local_stack_keeps_rendering_the_template_with_static_loopback_upstreams(tmp_path: Path) -> None:
    from deploy.local.stack import Stack

    config = yaml.safe_load(Stack(tmp_path).envoy_config().read_text())
    for cluster in config["static_resources"]["clusters"]:
        assert cluster["type"] == "STATIC"
        (endpoint,) = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
        assert endpoint["endpoint"]["address"]["socket_address"]["address"] == "127.0.0.1"


# -- kubernetes -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path", sorted(p.name for p in K8S.glob("*.yaml") if p.name not in {"kustomization.yaml", "envoy.yaml"})
)
def test_k8s_manifest_matches_the_kubernetes_schema_strictly(path: str) -> None:
    for doc in _load_all(K8S / path):
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_k8s_kustomization_applies_every_manifest_and_generates_the_gateway_config() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    manifests = {p.name for p in K8S.glob("*.yaml")} - K8S_NOT_RESOURCES
    assert set(kustomization["resources"]) == manifests
    (generator,) = kustomization["configMapGenerator"]
    assert generator["files"] == ["envoy.yaml"]
    volumes = _of_kind("Deployment")["gateway"]["spec"]["template"]["spec"]["volumes"]
    assert {"name": "config", "configMap": {"name": generator["name"]}} in volumes
    kinds = {doc["kind"] for doc in _k8s_docs()}
    assert {"Namespace", "ConfigMap", "Deployment", "Service", "PodDisruptionBudget"} <= kinds
    assert all(doc["metadata"].get("namespace", "maw") == "maw" for doc in _k8s_docs())


def test_k8s_deployments_are_replicated_probed_bounded_and_unprivileged() -> None:
    deployments = _of_kind("Deployment")
    assert set(deployments) == {*DEFINITIONS, "gateway"}
    for name, deployment in deployments.items():
        assert deployment["spec"]["replicas"] >= 2, name
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["runAsUser"] != 0, name
        assert pod["automountServiceAccountToken"] is False, name
        for container in pod["containers"]:
            security = container["securityContext"]
            assert security["allowPrivilegeEscalation"] is False, name
            assert security["readOnlyRootFilesystem"] is True, name
            assert security["capabilities"]["drop"] == ["ALL"], name
            for bound in ("requests", "limits"):
                assert set(container["resources"][bound]) == {"cpu", "memory"}, f"{name} {bound}"
            assert "readinessProbe" in container and "livenessProbe" in container, name


def test_k8s_services_are_ready_by_grpc_health_on_their_own_port() -> None:
    deployments = _of_kind("Deployment")
    for name, definition in DEFINITIONS.items():
        (container,) = deployments[name]["spec"]["template"]["spec"]["containers"]
        port = definition.default_port
        assert container["command"] == ["python", "-m", f"services.{name}"]
        assert container["image"].split(":")[0] == "maw"
        assert {"name": "MAW_PORT", "value": str(port)} in container["env"]
        assert container["readinessProbe"]["grpc"] == {"port": port}
        assert container["startupProbe"]["grpc"] == {"port": port}
        # Liveness must not follow dependency health (NOT_SERVING while PostgreSQL is down), or a
        # database outage would restart every pod: it checks only that the server accepts connections.
        assert container["livenessProbe"]["tcpSocket"] == {"port": port}


def test_k8s_every_service_selects_a_deployment_and_a_named_port() -> None:
    deployments = _of_kind("Deployment")
    for name, service in _of_kind("Service").items():
        selector = service["spec"]["selector"].items()
        matches = [d for d in deployments.values() if selector <= d["spec"]["template"]["metadata"]["labels"].items()]
        assert len(matches) == 1, f"Service {name} selects {len(matches)} deployments"
        (container,) = matches[0]["spec"]["template"]["spec"]["containers"]
        port_names = {p["name"] for p in container["ports"]}
        assert all(p["targetPort"] in port_names for p in service["spec"]["ports"]), name


def test_k8s_scheduler_has_a_disruption_budget_selecting_its_pods() -> None:
    budget = _of_kind("PodDisruptionBudget")["scheduler"]
    labels = _of_kind("Deployment")["scheduler"]["spec"]["template"]["metadata"]["labels"]
    assert budget["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert budget["spec"]["maxUnavailable"] == 1


def test_k8s_commits_no_secret_and_the_template_has_every_key_the_pods_read() -> None:
    assert "Secret" not in {doc["kind"] for doc in _k8s_docs()}
    template = {doc["metadata"]["name"]: doc for doc in _load_all(K8S / "secret.example.yaml")}
    for secret in template.values():
        assert all("REPLACE_ME" in value for value in secret["stringData"].values())
    config_maps = _of_kind("ConfigMap")
    for deployment in _of_kind("Deployment").values():
        pod = deployment["spec"]["template"]["spec"]
        for container in pod["containers"]:
            for source in container.get("envFrom", []):
                assert source["configMapRef"]["name"] in config_maps
            for env in container.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["key"] in template[ref["name"]]["stringData"], ref
        for volume in pod["volumes"]:
            if "secret" in volume:
                keys = template[volume["secret"]["secretName"]]["stringData"]
                assert all(item["key"] in keys for item in volume["secret"].get("items", []))


# -- docs -----------------------------------------------------------------------------------------------


def test_deploy_docs_name_every_service_setting() -> None:
    docs = (ROOT / "docs" / "deploy.md").read_text()
    for name, field in ServiceSettings.model_fields.items():
        alias = field.validation_alias
        env = alias.choices[0] if alias is not None and hasattr(alias, "choices") else f"MAW_{name.upper()}"
        assert f"`{env}`" in docs, f"docs/deploy.md does not document {env}"
